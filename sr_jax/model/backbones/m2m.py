"""M2M (Zhang et al., CIKM 2022, "Leaving No One Behind: A Multi-Scenario Multi-Task Meta Learning Approach for
Advertiser Modeling"): shared experts, then meta units, layers whose kernels and biases are generated from the
scenario's representation (its embedding): a meta attention scores each expert (softmax over experts), and a
meta tower of residual meta layers maps their mix.

Deviations: the scenario representation is a learned embedding of the domain (the paper's also encodes scenario
features, which these datasets do not have); one task, so one meta tower."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from sr_jax.config import ModelConfig
from sr_jax.model.backbones.common import BackboneInput, BackboneOutput, mix
from sr_jax.model.layers import Array, StackedMLP, normal, zeros


class MetaUnit(nnx.Module):
    """M2M's meta unit: a dense layer whose kernel [in, out] and bias [out] are generated, per example, from the
    scenario's representation s [B, g] by a linear map (the meta learner)."""

    def __init__(self, g: int, d_in: int, d_out: int, *, rngs: nnx.Rngs):
        self.d_in, self.d_out = d_in, d_out
        self.kernel_map = normal(rngs, (g, d_in * d_out), (g * d_in) ** -0.5)
        self.bias_map = zeros((g, d_out))

    def weights(self, s: Array) -> BackboneOutput:
        """-> (kernels [B, in, out], biases [B, out])"""
        return (s @ self.kernel_map[...]).reshape(-1, self.d_in, self.d_out), s @ self.bias_map[...]

    def __call__(self, h: Array, s: Array) -> Array:
        """h [B, in] or [B, E, in] -> [B, out] or [B, E, out]"""
        kernel, bias = self.weights(s)
        if h.ndim == 2:
            return jnp.einsum("bi,bio->bo", h, kernel) + bias
        return jnp.einsum("bei,bio->beo", h, kernel) + bias[:, None]


class M2M(nnx.Module):
    def __init__(self, cfg: ModelConfig, num_domains: int, width: int, *, rngs: nnx.Rngs):
        h, g = cfg.expert_hidden[-1], cfg.gate_dim
        self.experts = StackedMLP(cfg.num_experts, width, cfg.expert_hidden, rngs=rngs)
        self.attention = MetaUnit(g, h, h, rngs=rngs)
        self.score = normal(rngs, (h,), h**-0.5)
        self.tower = nnx.List([MetaUnit(g, h, h, rngs=rngs) for _ in range(cfg.meta_layers)])

    def __call__(self, inputs: BackboneInput, dtype: jnp.dtype, train: bool) -> BackboneOutput:
        """-> [B, 1, h]"""
        s = inputs.embedding
        experts = self.experts.all_layers(inputs.x_hat, dtype).astype(jnp.float32)  # [B, E, h]
        scores = jnp.einsum("beh,h->be", jnp.tanh(self.attention(experts, s)), self.score[...])
        mixed = mix(scores, experts, jnp.float32)
        for unit in self.tower:  # residual meta layers
            mixed = jax.nn.relu(unit(mixed, s)) + mixed
        return BackboneOutput(mixed[:, None].astype(dtype))
