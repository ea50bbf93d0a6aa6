"""SAR-Net (Shen et al., CIKM 2021, "SAR-Net: A Scenario-Aware Ranking Network for Personalized Fair
Recommendation in Hundreds of Travel Scenarios"): each domain's feature transfer (x W_k + b_k), then shared and the
domain's own experts mixed by a gate on [transferred x, domain embedding], plus a debias expert added to the mix.

Deviations: its attention over cross-scenario behaviour sequences has no input here (the history aspect is pooled
in L0); the debias expert reads only the domain embedding, so it is a learned per-domain bias vector (the paper's
debias network also reads the scenario-specific bias features, which these datasets do not have)."""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from sr_jax.config import ModelConfig
from sr_jax.model.backbones.common import BackboneInput, BackboneOutput, mix, own_experts, shared_and_own
from sr_jax.model.layers import MLP, Dense, StackedDense, StackedMLP


class SARNet(nnx.Module):
    def __init__(self, cfg: ModelConfig, num_domains: int, width: int, *, rngs: nnx.Rngs):
        self.transfer = StackedDense(num_domains, width, width, rngs=rngs)
        self.shared = StackedMLP(cfg.num_experts, width, cfg.expert_hidden, rngs=rngs)
        self.own = own_experts(cfg, num_domains, width, rngs=rngs)
        self.gate = Dense(width + cfg.gate_dim, cfg.num_experts + cfg.domain_experts, rngs=rngs)
        self.debias = MLP(cfg.gate_dim, cfg.expert_hidden, rngs=rngs)

    def __call__(self, inputs: BackboneInput, dtype: jnp.dtype, train: bool) -> BackboneOutput:
        """-> [B, 1, h]"""
        domain, e = inputs.domain, inputs.embedding
        x = self.transfer.own_layer(inputs.x_hat, domain, dtype)
        experts = shared_and_own(self.shared, self.own, x, x, domain, dtype)
        gate = self.gate(jnp.concatenate([x, e.astype(x.dtype)], 1), dtype)
        mixed = mix(gate, experts, dtype) + self.debias(e, dtype)
        return BackboneOutput(mixed[:, None])
