"""AdaptDHM (Li et al., 2022, the adaptive distribution hierarchical model): a shared MLP, then each example
routed to the cluster whose centroid is nearest (cosine), whatever its domain, and through that cluster's layer
(h + relu(W_c h + b_c)). The centroids follow their examples as moving averages in training (batch statistics,
like STAR's: they advance once per step whatever `train.grad_accum`, and stay fixed in a frozen level)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from sr_jax.config import ModelConfig
from sr_jax.model.backbones.common import BackboneInput, BackboneOutput, masked_average
from sr_jax.model.layers import MLP, Array, StackedDense


class AdaptDHM(nnx.Module):
    def __init__(self, cfg: ModelConfig, num_domains: int, width: int, *, rngs: nnx.Rngs, momentum: float = 0.99):
        h = cfg.expert_hidden[-1]
        self.shared = MLP(width, cfg.expert_hidden, rngs=rngs)
        self.clusters = StackedDense(cfg.adaptdhm_clusters, h, h, rngs=rngs)
        self.centroids = nnx.BatchStat(jax.random.normal(rngs.params(), (cfg.adaptdhm_clusters, h)))
        self.momentum = momentum

    def route(self, h: Array) -> Array:
        """[B, h] -> the nearest centroid's index [B]"""
        unit = lambda a: a / jnp.maximum(jnp.linalg.norm(a, axis=-1, keepdims=True), 1e-6)  # noqa: E731
        return jnp.argmax(unit(h) @ unit(self.centroids[...]).T, axis=1)

    def __call__(self, inputs: BackboneInput, dtype: jnp.dtype, train: bool) -> BackboneOutput:
        """-> [B, 1, h]"""
        h = self.shared(inputs.x_hat, dtype)
        cluster = self.route(jax.lax.stop_gradient(h.astype(jnp.float32)))
        if train:
            onehot = jax.nn.one_hot(cluster, self.centroids.shape[0], dtype=jnp.float32)  # [B, C]
            count = onehot.sum(0)[:, None]
            mean = onehot.T @ jax.lax.stop_gradient(h.astype(jnp.float32)) / jnp.maximum(count, 1.0)
            self.centroids[...] = masked_average(self.centroids[...], mean, count, self.momentum)
        out = h + jax.nn.relu(self.clusters.own_layer(h, cluster, dtype))
        return BackboneOutput(out[:, None])
