"""The multi-task backbones of L1: what turns x_hat into a stack of expert outputs for L2's gates.

    mmoe   shared experts (Ma et al., KDD 2018); with num_experts=1 it is Shared-Bottom
    ple    shared experts plus each domain's own experts (CGC, the one-level PLE; Tang et al., RecSys 2020)
    star   one star-topology network: partitioned normalisation, then layers whose weights are a shared
           matrix times the domain's matrix, element-wise (Sheng et al., CIKM 2021); its auxiliary
           network (`StarAuxiliary`) adds a logit from the domain indicator in L2

Each gives [B, E, h]: E expert outputs per example, which L2 mixes with its domain's softmax gate
(`SharedAdaptation` in foundation.py runs them). Per-domain parameters (PLE's domain experts, STAR's
domain factors) sit on a leading domain axis like the rest of the model, so fine-tuning gives a new
domain fresh, trainable rows.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from sr_jax.config import ModelConfig
from sr_jax.model.layers import Array, StackedMLP, normal, zeros

BACKBONES = ("mmoe", "ple", "star")


def num_outputs(cfg: ModelConfig) -> int:
    """E: how many expert outputs the backbone gives each example."""
    return {"mmoe": cfg.num_experts, "ple": cfg.num_experts + cfg.domain_experts, "star": 1}[cfg.backbone]


class DomainExperts(nnx.Module):
    """PLE's experts of each domain: E_d stacks of K MLPs; an example runs its own domain's row of each."""

    def __init__(self, cfg: ModelConfig, num_domains: int, width: int, *, rngs: nnx.Rngs):
        self.stacks = nnx.List(
            [StackedMLP(num_domains, width, cfg.expert_hidden, rngs=rngs) for _ in range(cfg.domain_experts)]
        )

    def __call__(self, x_hat: Array, domain: Array, dtype: jnp.dtype) -> Array:
        """-> [B, E_d, h]"""
        return jnp.stack([stack.select(x_hat, domain, dtype) for stack in self.stacks], axis=1)


class StarNetwork(nnx.Module):
    """STAR: LayerNorm with scale gamma * gamma_k and shift beta + beta_k (partitioned normalisation), then
    ReLU layers with W = W_shared * W_k and b = b_shared + b_k. The domain factors start at one and
    zero, so every domain starts from the shared network."""

    def __init__(self, num_domains: int, width: int, widths: tuple[int, ...], *, rngs: nnx.Rngs):
        self.norm = nnx.LayerNorm(width, rngs=rngs)
        self.norm_scale = nnx.Param(jnp.ones((num_domains, width)))
        self.norm_shift = zeros((num_domains, width))
        dims = (width, *widths)
        self.shared_kernels = nnx.List([normal(rngs, (a, b), a**-0.5) for a, b in zip(dims[:-1], dims[1:])])
        self.shared_biases = nnx.List([zeros((b,)) for b in dims[1:]])
        self.domain_kernels = nnx.List([nnx.Param(jnp.ones((num_domains, a, b))) for a, b in zip(dims[:-1], dims[1:])])
        self.domain_biases = nnx.List([zeros((num_domains, b)) for b in dims[1:]])

    def __call__(self, x_hat: Array, domain: Array, dtype: jnp.dtype) -> Array:
        """-> [B, 1, h]"""
        h = self.norm(x_hat) * self.norm_scale[...][domain] + self.norm_shift[...][domain]
        for w, b, w_k, b_k in zip(self.shared_kernels, self.shared_biases, self.domain_kernels, self.domain_biases):
            kernels = (w[...][None] * w_k[...]).astype(dtype)  # [K, in, out]
            every = jnp.einsum("bi,kio->bko", h.astype(dtype), kernels)
            h = jax.nn.relu(jnp.take_along_axis(every, domain[:, None, None], axis=1)[:, 0] + b[...] + b_k[...][domain])
        return h[:, None, :]


class StarAuxiliary(nnx.Module):
    """STAR's auxiliary network: a small MLP on [x_hat, domain embedding] whose output is added to the
    logit, so the domain indicator acts on the prediction directly."""

    def __init__(self, num_domains: int, width: int, *, rngs: nnx.Rngs, hidden: int = 32, indicator: int = 8):
        self.indicator = normal(rngs, (num_domains, indicator), 0.05)
        self.mlp = StackedMLP(1, width + indicator, (hidden, 1), rngs=rngs, linear_out=True)

    def __call__(self, x_hat: Array, domain: Array, dtype: jnp.dtype) -> Array:
        """-> [B] logits"""
        x = jnp.concatenate([x_hat, self.indicator[...][domain]], axis=1)
        return self.mlp.all(x, dtype)[:, 0, 0]
