"""M3oE (Zhang et al., SIGIR 2024, "M3oE: Multi-Domain Multi-Task Mixture-of-Experts Recommendation Framework")
with one task: a mixture of shared experts and a mixture of the domain's own experts, each under the domain's
softmax gate over the input, fused by the domain's learned softmax weights (initialised equal). Its second fusion
level fuses tasks; with one task it is the identity and is left out. Its AutoML search of the fusion weights is
replaced by plain gradient training of them (the paper's weights are searched, then trained)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from sr_jax.config import ModelConfig
from sr_jax.model.backbones.common import BackboneInput, BackboneOutput, mix, own_experts
from sr_jax.model.layers import StackedDense, StackedMLP, zeros


class M3oE(nnx.Module):
    def __init__(self, cfg: ModelConfig, num_domains: int, width: int, *, rngs: nnx.Rngs):
        self.shared = StackedMLP(cfg.num_experts, width, cfg.expert_hidden, rngs=rngs)
        self.own = own_experts(cfg, num_domains, width, rngs=rngs)
        self.shared_gate = StackedDense(num_domains, width, cfg.num_experts, rngs=rngs)
        self.own_gate = StackedDense(num_domains, width, cfg.domain_experts, rngs=rngs)
        self.fusion = zeros((num_domains, 2))  # each domain's weights of (shared, own): equal at the start

    def __call__(self, inputs: BackboneInput, dtype: jnp.dtype, train: bool) -> BackboneOutput:
        """-> [B, 1, h]"""
        x_hat, domain = inputs.x_hat, inputs.domain
        shared = mix(self.shared_gate.own_layer(x_hat, domain, dtype), self.shared.all_layers(x_hat, dtype), dtype)
        own = jnp.stack([stack.own_layer(x_hat, domain, dtype) for stack in self.own], axis=1)
        own = mix(self.own_gate.own_layer(x_hat, domain, dtype), own, dtype)
        fusion = jax.nn.softmax(self.fusion[...][domain], -1).astype(dtype)  # [B, 2]
        return BackboneOutput((fusion[:, :1] * shared + fusion[:, 1:] * own)[:, None])
