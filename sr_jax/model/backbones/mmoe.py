"""MMoE (Ma et al., KDD 2018, "Modeling Task Relationships in Multi-task Learning with Multi-gate
Mixture-of-Experts"): E shared expert MLPs run on every example; each task (here each domain) mixes them with its
own softmax gate over the input. The gates and towers are L2's (`foundation.DomainHeads`); this module is the
experts. With `num_experts=1` it is Shared-Bottom. Faithful: the paper's model with domains as tasks."""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from sr_jax.config import ModelConfig
from sr_jax.model.backbones.common import BackboneInput, BackboneOutput
from sr_jax.model.layers import StackedMLP


class MMoE(nnx.Module):
    def __init__(self, cfg: ModelConfig, num_domains: int, width: int, *, rngs: nnx.Rngs):
        self.experts = StackedMLP(cfg.num_experts, width, cfg.expert_hidden, rngs=rngs)

    def __call__(self, inputs: BackboneInput, dtype: jnp.dtype, train: bool) -> BackboneOutput:
        """-> every expert's output [B, E, h] (L2's gates mix them, reading x_hat)"""
        return BackboneOutput(self.experts.all_layers(inputs.x_hat, dtype))
