"""PLE (Tang et al., RecSys 2020, "Progressive Layered Extraction"): `ple_levels` extraction levels, each with
shared experts and every task's (here domain's) own experts; below the last level, each domain's gate mixes the
shared and its own experts into its next input, and the shared gate mixes experts into the next shared input.
One level is CGC. L2's domain gates read the domain input of the last level.

Deviation: the shared gate of a level mixes the shared experts and the example's own domain's experts, where
PLE's shared gate mixes the shared experts and every task's. With many domains (K x domain_experts experts per
example) the paper's form multiplies the work by K; with domains that share no examples, an example's other
domains' experts read inputs they were never trained on."""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from sr_jax.config import ModelConfig
from sr_jax.model.backbones.common import BackboneInput, BackboneOutput, mix, own_experts, shared_and_own
from sr_jax.model.layers import Array, Dense, StackedDense, StackedMLP


class ExtractionLevel(nnx.Module):
    """One PLE level: shared experts on the shared input, the example's own domain's experts on its domain
    input; below the last level, gates mix both kinds into the next level's two inputs."""

    def __init__(self, cfg: ModelConfig, num_domains: int, width: int, last: bool, *, rngs: nnx.Rngs):
        self.shared = StackedMLP(cfg.num_experts, width, cfg.expert_hidden, rngs=rngs)
        self.own = own_experts(cfg, num_domains, width, rngs=rngs)
        experts = cfg.num_experts + cfg.domain_experts
        self.domain_gate = None if last else StackedDense(num_domains, width, experts, rngs=rngs)
        self.shared_gate = None if last else Dense(width, experts, rngs=rngs)

    def __call__(self, h_domain: Array, h_shared: Array, domain: Array, dtype: jnp.dtype):
        """-> experts [B, E, h], and the next level's (domain input, shared input) [B, h] (None at the last)"""
        experts = shared_and_own(self.shared, self.own, h_shared, h_domain, domain, dtype)
        if self.domain_gate is None:
            return experts, None
        next_domain = mix(self.domain_gate.own_layer(h_domain, domain, dtype), experts, dtype)
        next_shared = mix(self.shared_gate(h_shared, dtype), experts, dtype)
        return experts, (next_domain, next_shared)


class PLE(nnx.Module):
    def __init__(self, cfg: ModelConfig, num_domains: int, width: int, *, rngs: nnx.Rngs):
        widths = [width] + [cfg.expert_hidden[-1]] * (cfg.ple_levels - 1)
        last = cfg.ple_levels - 1
        self.levels = nnx.List(
            [ExtractionLevel(cfg, num_domains, w, last=i == last, rngs=rngs) for i, w in enumerate(widths)]
        )

    def __call__(self, inputs: BackboneInput, dtype: jnp.dtype, train: bool) -> BackboneOutput:
        """-> the last level's experts [B, E, h], and its domain input: what L2's gates read"""
        h_domain = h_shared = inputs.x_hat
        for level in self.levels:
            experts, nxt = level(h_domain, h_shared, inputs.domain, dtype)
            if nxt is not None:
                h_domain, h_shared = nxt
        return BackboneOutput(experts, h_domain)
