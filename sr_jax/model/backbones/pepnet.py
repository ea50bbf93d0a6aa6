"""PEPNet (Chang et al., KDD 2023, "PEPNet: Parameter and Embedding Personalized Network for Infusing with
Personalized Prior Information"): two kinds of gate neural unit (`GateNU`, 2 x sigmoid(MLP), exactly 1 at the
start) personalise one shared network.

    epnet  EPNet: a gate on the input, from the domain's embedding and the input itself (stop-gradient), scales
           x_hat element-wise before one shared MLP
    ppnet  PPNet: one gate per layer, from the persona (the user's and the item's fused vectors, read before
           the domain adaptive layer mixes the sides) and the input (stop-gradient), scales that layer's input

Deviations: PEPNet's persona is raw user, item and author id embeddings; here it is the fused user and item
vectors (every aspect of each side: ids, text, history). The gates of one PPNet serve every domain (PEPNet's
gates also personalise each task's tower; L2's towers here are per domain already).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from sr_jax.config import ModelConfig
from sr_jax.model.backbones.common import BackboneInput, BackboneOutput
from sr_jax.model.layers import MLP, Array, Dense, zeros


class GateNU(nnx.Module):
    """PEPNet's gate neural unit: 2 x sigmoid(W2 relu(W1 x + b1) + b2) [B, out], in (0, 2), exactly 1 at the start
    (W2 and b2 start at zero)."""

    def __init__(self, d_in: int, d_out: int, hidden: int, *, rngs: nnx.Rngs):
        self.hidden = Dense(d_in, hidden, rngs=rngs)
        self.out_kernel, self.out_bias = zeros((hidden, d_out)), zeros((d_out,))

    def __call__(self, x: Array) -> Array:
        h = jax.nn.relu(self.hidden(x, jnp.float32))
        return 2.0 * jax.nn.sigmoid(h @ self.out_kernel[...] + self.out_bias[...])


class EPNet(nnx.Module):
    def __init__(self, cfg: ModelConfig, num_domains: int, width: int, *, rngs: nnx.Rngs):
        self.gate = GateNU(cfg.gate_dim + width, width, cfg.gate_hidden, rngs=rngs)
        self.mlp = MLP(width, cfg.expert_hidden, rngs=rngs)

    def __call__(self, inputs: BackboneInput, dtype: jnp.dtype, train: bool) -> BackboneOutput:
        """-> [B, 1, h]"""
        x_hat = inputs.x_hat
        e = inputs.embedding
        h = x_hat * self.gate(jnp.concatenate([e, jax.lax.stop_gradient(x_hat)], axis=1)).astype(x_hat.dtype)
        return BackboneOutput(self.mlp(h, dtype)[:, None])


class PPNet(nnx.Module):
    def __init__(self, cfg: ModelConfig, num_domains: int, width: int, *, rngs: nnx.Rngs):
        self.dim = cfg.dim
        dims = (width, *cfg.expert_hidden)
        self.mlp = MLP(width, cfg.expert_hidden, rngs=rngs)
        self.gates = nnx.List([GateNU(2 * cfg.dim + width, d, cfg.gate_hidden, rngs=rngs) for d in dims[:-1]])

    def persona(self, x: Array) -> Array:
        """The fused user and item vectors [B, 2d] (x is [user | query | item], before the DAL)."""
        return jnp.concatenate([x[:, : self.dim], x[:, -self.dim :]], axis=1)

    def __call__(self, inputs: BackboneInput, dtype: jnp.dtype, train: bool) -> BackboneOutput:
        """-> [B, 1, h]"""
        x_hat = inputs.x_hat
        gate_input = jnp.concatenate([self.persona(inputs.x), jax.lax.stop_gradient(x_hat)], axis=1)
        h = x_hat
        for layer, gate in zip(self.mlp.layers, self.gates):
            h = jax.nn.relu(layer(h * gate(gate_input).astype(h.dtype), dtype))
        return BackboneOutput(h[:, None])
