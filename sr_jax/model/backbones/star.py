"""STAR (Sheng et al., CIKM 2021, "One Model to Serve All: Star Topology Adaptive Recommender"): partitioned
normalisation (each domain normalised by its own statistics, scaled and shifted by shared times domain factors),
then the star-topology network, whose layers have W = W_shared * W_k (element-wise) and b = b_shared + b_k, and an
auxiliary network that adds a logit from the domain indicator (`StarAuxiliary`, added by L2).

Deviation: the paper's star-topology network ends in the logit; here L2 puts a per-domain tower above it (every
backbone's output goes through L2's towers), which adds per-domain capacity on top of the factors. The moving
statistics advance once per step, whatever `train.grad_accum` (`steps.accumulate`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from sr_jax.config import ModelConfig
from sr_jax.model.backbones.common import BackboneInput, BackboneOutput, masked_average
from sr_jax.model.domain_adaptation import standardise
from sr_jax.model.layers import MLP, Array, by_group, normal, zeros


class PartitionedNorm(nnx.Module):
    """STAR's partitioned normalisation: every example is normalised by its own domain's statistics (the
    batch's rows of that domain in training, the domain's moving averages at inference), then scaled by
    gamma * gamma_k and shifted by beta + beta_k. `per_example=True` normalises each example by its own
    features instead (a LayerNorm; the `star_norm=layer` variant, which needs no statistics).

    The moving averages start at (0, 1) and count the batches that held each domain (`updates`): inference
    removes the starting values' remaining weight m^n (as Adam debiases its moments), so a domain seen for
    20 batches is normalised by its data's statistics, not by 82% of (0, 1)."""

    def __init__(self, num_domains: int, width: int, per_example: bool, momentum: float = 0.99):
        self.scale = nnx.Param(jnp.ones((width,), jnp.float32))
        self.shift = zeros((width,))
        self.domain_scale = nnx.Param(jnp.ones((num_domains, width), jnp.float32))
        self.domain_shift = zeros((num_domains, width))
        self.per_example, self.momentum = per_example, momentum
        if not per_example:
            self.mean = nnx.BatchStat(jnp.zeros((num_domains, width), jnp.float32))
            self.var = nnx.BatchStat(jnp.ones((num_domains, width), jnp.float32))
            self.updates = nnx.BatchStat(jnp.zeros((num_domains,), jnp.float32))  # batches that held the domain

    def __call__(self, x: Array, domain: Array, train: bool) -> Array:
        x = x.astype(jnp.float32)
        if self.per_example:
            z = standardise(x)
        else:
            if train:
                onehot = jax.nn.one_hot(domain, self.mean.shape[0], dtype=jnp.float32)  # [B, K]
                count = onehot.sum(0)[:, None]
                mean = onehot.T @ x / jnp.maximum(count, 1.0)
                var = onehot.T @ jnp.square(x - mean[domain]) / jnp.maximum(count, 1.0)
                self.mean[...] = masked_average(self.mean[...], mean, count, self.momentum)
                self.var[...] = masked_average(self.var[...], var, count, self.momentum)
                self.updates[...] = self.updates[...] + (count[:, 0] > 0)
            else:
                mean, var = self.debiased()
            z = (x - mean[domain]) * jax.lax.rsqrt(var[domain] + 1e-5)
        gamma = self.scale[...] * self.domain_scale[...][domain]
        return z * gamma + self.shift[...] + self.domain_shift[...][domain]

    def debiased(self) -> BackboneOutput:
        """Each domain's moving mean and variance [K, width] without the starting (0, 1)'s remaining weight
        m^n; a domain never seen keeps (0, 1)."""
        left = (self.momentum ** self.updates[...])[:, None]  # [K, 1]: the starting values' weight
        seen = left < 1.0
        denominator = jnp.where(seen, 1.0 - left, 1.0)
        mean = jnp.where(seen, self.mean[...] / denominator, 0.0)
        var = jnp.where(seen, (self.var[...] - left) / denominator, 1.0)
        return mean, jnp.maximum(var, 0.0)


class STAR(nnx.Module):
    """Partitioned normalisation, then ReLU layers with W = W_shared * W_k and b = b_shared + b_k. The domain
    factors start at one and zero, so every domain starts from the shared network."""

    def __init__(self, cfg: ModelConfig, num_domains: int, width: int, *, rngs: nnx.Rngs):
        self.norm = PartitionedNorm(num_domains, width, per_example=cfg.star_norm == "layer")
        dims = (width, *cfg.expert_hidden)
        self.shared_kernels = nnx.List([normal(rngs, (a, b), a**-0.5) for a, b in zip(dims[:-1], dims[1:])])
        self.shared_biases = nnx.List([zeros((b,)) for b in dims[1:]])
        self.domain_kernels = nnx.List([nnx.Param(jnp.ones((num_domains, a, b))) for a, b in zip(dims[:-1], dims[1:])])
        self.domain_biases = nnx.List([zeros((num_domains, b)) for b in dims[1:]])

    def __call__(self, inputs: BackboneInput, dtype: jnp.dtype, train: bool) -> BackboneOutput:
        """-> [B, 1, h]"""
        layers = list(zip(self.shared_kernels, self.shared_biases, self.domain_kernels, self.domain_biases))

        def star(tiles, group):  # [T, rows, in], each tile through its domain's star-topology layers
            for w, b, w_k, b_k in layers:
                kernels = (w[...][None] * w_k[...][group]).astype(dtype)  # [T, in, out]
                y = jnp.einsum("tri,tio->tro", tiles.astype(dtype), kernels)
                tiles = jax.nn.relu(y + b[...] + b_k[...][group][:, None])
            return tiles

        x_hat, domain = inputs.x_hat, inputs.domain
        h = by_group(self.norm(x_hat, domain, train), domain, self.domain_kernels[0].shape[0], star)
        return BackboneOutput(h[:, None, :])


class StarAuxiliary(nnx.Module):
    """STAR's auxiliary network: a small MLP on [x_hat, domain embedding] whose output is added to the
    logit, so the domain indicator acts on the prediction directly."""

    def __init__(self, num_domains: int, width: int, *, rngs: nnx.Rngs, hidden: int = 32, indicator: int = 8):
        self.indicator = normal(rngs, (num_domains, indicator), 0.05)
        self.mlp = MLP(width + indicator, (hidden, 1), rngs=rngs, linear_out=True)

    def __call__(self, x_hat: Array, domain: Array, dtype: jnp.dtype) -> Array:
        """-> [B] logits (float32)"""
        x = jnp.concatenate([x_hat, self.indicator[...][domain]], axis=1)
        return self.mlp(x, dtype)[:, 0]
