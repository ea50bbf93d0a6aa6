"""HAMUR (Li et al., CIKM 2023, "HAMUR: Hyper Adapter for Multi-Domain Recommendation"): a shared MLP with an
adapter after each layer, h + U relu(D h), whose D and U a shared hyper-network makes per example from the
domain's embedding and the example (stop-gradient); the hyper-network's last layer starts small, so each adapter
starts near the identity.

What is ours: the adapter is exactly the two generated matrices (a ReLU between them, a residual around them);
anything more in the paper's adapter (a normalisation, a factorised generation) is not here."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from sr_jax.config import ModelConfig
from sr_jax.model.backbones.common import BackboneInput, BackboneOutput
from sr_jax.model.layers import MLP, Array, Dense, normal


class HAMUR(nnx.Module):
    def __init__(self, cfg: ModelConfig, num_domains: int, width: int, *, rngs: nnx.Rngs):
        self.rank = cfg.adapter_rank
        dims = (width, *cfg.expert_hidden)
        self.mlp = MLP(width, cfg.expert_hidden, rngs=rngs)
        hyper_in = cfg.gate_dim + width
        self.hyper = Dense(hyper_in, cfg.gate_hidden, rngs=rngs)
        # one output block per layer: that layer's D [h, r] and U [r, h], flattened
        self.hyper_out = nnx.List(
            [normal(rngs, (cfg.gate_hidden, 2 * d * self.rank), 0.01 * cfg.gate_hidden**-0.5) for d in dims[1:]]
        )

    def adapters(self, x_hat: Array, e: Array) -> list[tuple[Array, Array]]:
        """Each layer's adapter weights for each example: (D [B, h, r], U [B, r, h]), made by the hyper-network
        from its domain's embedding e [B, g] and the example."""
        z = jax.nn.relu(self.hyper(jnp.concatenate([e, jax.lax.stop_gradient(x_hat)], axis=1), jnp.float32))
        out = []
        for block in self.hyper_out:
            flat = z @ block[...]
            d = flat.shape[1] // (2 * self.rank)
            down, up = jnp.split(flat, 2, axis=1)
            out.append((down.reshape(-1, d, self.rank), up.reshape(-1, self.rank, d)))
        return out

    def __call__(self, inputs: BackboneInput, dtype: jnp.dtype, train: bool) -> BackboneOutput:
        """-> [B, 1, h]"""
        h = inputs.x_hat
        for layer, (down, up) in zip(self.mlp.layers, self.adapters(inputs.x_hat, inputs.embedding)):
            h = jax.nn.relu(layer(h, dtype))
            r = jax.nn.relu(jnp.einsum("bh,bhr->br", h, down.astype(dtype)))
            h = h + jnp.einsum("br,brh->bh", r, up.astype(dtype))
        return BackboneOutput(h[:, None])
