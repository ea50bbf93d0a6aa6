"""AdaSparse (Yang et al., CIKM 2022, "AdaSparse: Learning Adaptively Sparse Structures for Multi-Domain
Click-Through Rate Prediction"), its Fusion form: a shared MLP whose every hidden layer's neurons are weighted by a
domain-aware pruner, pi = beta x sigmoid(alpha x pruner([h; e_domain])), pi <= epsilon set to 0 (the pruned
neurons). alpha grows by `adasparse_alpha_step` each train step (the schedule that hardens the weights towards
0 / beta; once per step whatever `train.grad_accum`, and not in a frozen level), and a sparsity regularizer pulls
each layer's share of pruned neurons towards `adasparse_sparsity`.

Choices where the paper leaves room: the pruner reads a layer's input and weights that layer's output; the
regularizer's share of pruned neurons is the soft share 1 - mean sigmoid (the hard share, pi <= epsilon, has no
gradient)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from sr_jax.config import ModelConfig
from sr_jax.model.backbones.common import BackboneInput, BackboneOutput
from sr_jax.model.layers import MLP, Array, Dense


class AdaSparse(nnx.Module):
    def __init__(self, cfg: ModelConfig, num_domains: int, width: int, *, rngs: nnx.Rngs):
        dims = (width, *cfg.expert_hidden)
        self.mlp = MLP(width, cfg.expert_hidden, rngs=rngs)
        self.pruners = nnx.List([Dense(a + cfg.gate_dim, b, rngs=rngs) for a, b in zip(dims[:-1], dims[1:])])
        self.alpha = nnx.BatchStat(jnp.ones((), jnp.float32))  # follows training (train steps), not the optimizer
        self.alpha_step, self.beta, self.epsilon = cfg.adasparse_alpha_step, 2.0, 1e-2
        self.target, self.weight = cfg.adasparse_sparsity, cfg.adasparse_weight

    def weights(self, h: Array, e: Array, pruner: Dense) -> BackboneOutput:
        """-> (the neurons' weighting factors pi [B, out], their soft share of pruned neurons [])"""
        soft = jax.nn.sigmoid(self.alpha[...] * pruner(jnp.concatenate([h, e], axis=1), jnp.float32))
        pi = self.beta * soft
        return jnp.where(pi > self.epsilon, pi, 0.0), 1.0 - soft.mean()

    def __call__(self, inputs: BackboneInput, dtype: jnp.dtype, train: bool) -> BackboneOutput:
        """-> [B, 1, h]; sows its sparsity regularizer (`backbone_reg`) in training"""
        e = inputs.embedding
        h, penalty = inputs.x_hat, jnp.zeros((), jnp.float32)
        for layer, pruner in zip(self.mlp.layers, self.pruners):
            pi, pruned = self.weights(h.astype(jnp.float32), e, pruner)
            h = jax.nn.relu(layer(h, dtype)) * pi.astype(dtype)
            penalty = penalty + jnp.abs(pruned - self.target)
        if train:
            self.alpha[...] = self.alpha[...] + self.alpha_step
            self.sow(nnx.Intermediate, "backbone_reg", self.weight * penalty)
        return BackboneOutput(h[:, None])
