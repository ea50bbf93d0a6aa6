"""The multi-task backbones of L1: what turns x_hat into a stack of expert outputs for L2's gates.

    mmoe   shared experts (Ma et al., KDD 2018); with num_experts=1 it is Shared-Bottom
    ple    progressive layered extraction (Tang et al., RecSys 2020): `ple_levels` levels of shared experts
           plus each domain's own experts; one level is CGC
    star   the star-topology network (Sheng et al., CIKM 2021): partitioned normalisation, then layers whose
           weights are a shared matrix times the domain's matrix, element-wise; its auxiliary network
           (`StarAuxiliary`) adds a logit from the domain indicator in L2
    sarnet SAR-Net (Shen et al., CIKM 2021): each domain's feature transfer (x W_k + b_k), then shared and the
           domain's own experts mixed by a gate on [x, domain embedding], plus a debias expert on the domain
           embedding alone (its bias features) added to the mix; its attention over cross-scenario behaviour
           sequences has no input here (the history aspect is pooled in L0)
    adaptdhm AdaptDHM (Li et al., 2022): a shared MLP, then each example routed to the cluster whose centroid is
           nearest (cosine), whatever its domain, and through that cluster's layer (h + relu(W_c h + b_c)); the
           centroids follow their examples as moving averages in training (batch statistics, like STAR's)
    m3oe   M3oE (Zhang et al., SIGIR 2024) with one task: a mixture of shared experts and a mixture of the
           domain's own experts, each under the domain's softmax gate, fused by the domain's learned weights
    epnet, ppnet, hamur, m2m, adasparse   a shared network scaled, pruned or given generated weights (`gated.py`)

Each is called as backbone(x_hat, domain, dtype, train) -> (experts [B, E, h], gate input [B, g]): E expert
outputs per example, which L2 mixes with its domain's softmax gate (read from the gate input), or takes
as they are when E = 1. Per-domain parameters (PLE's domain experts and gates, STAR's domain factors and
statistics) sit on a leading domain axis like the rest of the model, so fine-tuning gives a new domain
fresh, trainable rows.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from sr_jax.config import ModelConfig
from sr_jax.model.domain_adaptation import standardise
from sr_jax.model.gated import HAMUR, M2M, AdaSparse, EPNet, PPNet
from sr_jax.model.layers import Array, StackedDense, StackedMLP, by_group, normal, zeros


def num_outputs(cfg: ModelConfig) -> int:
    """E: how many expert outputs the backbone gives each example."""
    return {"mmoe": cfg.num_experts, "ple": cfg.num_experts + cfg.domain_experts}.get(cfg.backbone, 1)


class SharedExperts(nnx.Module):
    """MMoE's experts: E shared MLPs, every one on every example."""

    def __init__(self, cfg: ModelConfig, num_domains: int, width: int, *, rngs: nnx.Rngs):
        self.experts = StackedMLP(cfg.num_experts, width, cfg.expert_hidden, rngs=rngs)

    def __call__(self, x_hat: Array, domain: Array, dtype: jnp.dtype, train: bool) -> tuple[Array, Array]:
        return self.experts.all_layers(x_hat, dtype), x_hat


class ExtractionLevel(nnx.Module):
    """One PLE level: shared experts on the shared input, the example's own domain's experts on its domain
    input; below the last level, gates mix both kinds into the next level's two inputs."""

    def __init__(self, cfg: ModelConfig, num_domains: int, width: int, last: bool, *, rngs: nnx.Rngs):
        self.shared = StackedMLP(cfg.num_experts, width, cfg.expert_hidden, rngs=rngs)
        self.own = nnx.List(
            [StackedMLP(num_domains, width, cfg.expert_hidden, rngs=rngs) for _ in range(cfg.domain_experts)]
        )
        experts = cfg.num_experts + cfg.domain_experts
        self.domain_gate = None if last else StackedDense(num_domains, width, experts, rngs=rngs)
        self.shared_gate = None if last else StackedDense(1, width, experts, rngs=rngs)

    def __call__(self, h_domain: Array, h_shared: Array, domain: Array, dtype: jnp.dtype):
        """-> experts [B, E, h], and the next level's (domain input, shared input) [B, h] (None at the last)"""
        own = [stack.own_layer(h_domain, domain, dtype) for stack in self.own]
        experts = jnp.concatenate([self.shared.all_layers(h_shared, dtype), jnp.stack(own, axis=1)], axis=1)
        if self.domain_gate is None:
            return experts, None

        def mix(logits):
            return jnp.einsum("be,beh->bh", jax.nn.softmax(logits.astype(jnp.float32), -1).astype(dtype), experts)

        next_domain = mix(self.domain_gate.own_layer(h_domain, domain, dtype))
        next_shared = mix(self.shared_gate.all_layers(h_shared, dtype)[:, 0])
        return experts, (next_domain, next_shared)


class ProgressiveExperts(nnx.Module):
    """PLE: `ple_levels` extraction levels; the last level's experts go to L2, whose domain gates read the
    domain input of that level (x_hat itself for one level: CGC)."""

    def __init__(self, cfg: ModelConfig, num_domains: int, width: int, *, rngs: nnx.Rngs):
        widths = [width] + [cfg.expert_hidden[-1]] * (cfg.ple_levels - 1)
        self.levels = nnx.List(
            [
                ExtractionLevel(cfg, num_domains, w, last=i == cfg.ple_levels - 1, rngs=rngs)
                for i, w in enumerate(widths)
            ]
        )

    def __call__(self, x_hat: Array, domain: Array, dtype: jnp.dtype, train: bool) -> tuple[Array, Array]:
        h_domain = h_shared = x_hat
        for level in self.levels:
            experts, inputs = level(h_domain, h_shared, domain, dtype)
            if inputs is not None:
                h_domain, h_shared = inputs
        return experts, h_domain


class DomainMixtures(nnx.Module):
    """M3oE with one task: the shared experts mixed by the domain's gate over them, the domain's own experts mixed
    by its gate over those, and the two mixtures fused by the domain's softmax weights (its second fusion level
    has one task to fuse, so it is the identity). -> [B, 1, h]."""

    def __init__(self, cfg: ModelConfig, num_domains: int, width: int, *, rngs: nnx.Rngs):
        self.shared = StackedMLP(cfg.num_experts, width, cfg.expert_hidden, rngs=rngs)
        self.own = nnx.List(
            [StackedMLP(num_domains, width, cfg.expert_hidden, rngs=rngs) for _ in range(cfg.domain_experts)]
        )
        self.shared_gate = StackedDense(num_domains, width, cfg.num_experts, rngs=rngs)
        self.own_gate = StackedDense(num_domains, width, cfg.domain_experts, rngs=rngs)
        self.fusion = zeros((num_domains, 2))  # each domain's weights of (shared, own): equal at the start

    def __call__(self, x_hat: Array, domain: Array, dtype: jnp.dtype, train: bool) -> tuple[Array, Array]:
        def mix(gate: StackedDense, experts: Array) -> Array:
            weights = jax.nn.softmax(gate.own_layer(x_hat, domain, dtype).astype(jnp.float32), -1)
            return jnp.einsum("be,beh->bh", weights.astype(dtype), experts)

        shared = mix(self.shared_gate, self.shared.all_layers(x_hat, dtype))
        own = mix(self.own_gate, jnp.stack([stack.own_layer(x_hat, domain, dtype) for stack in self.own], axis=1))
        fusion = jax.nn.softmax(self.fusion[...][domain], -1).astype(dtype)  # [B, 2]
        return (fusion[:, :1] * shared + fusion[:, 1:] * own)[:, None], x_hat


class ScenarioExperts(nnx.Module):
    """SAR-Net without its behaviour attention: feature transfer per domain, shared and own experts under a gate
    on [transferred x, domain embedding], and a debias expert on the domain embedding. -> [B, 1, h]."""

    def __init__(self, cfg: ModelConfig, num_domains: int, width: int, *, rngs: nnx.Rngs):
        self.domain_embedding = normal(rngs, (num_domains, cfg.gate_dim), cfg.gate_dim**-0.5)
        self.transfer = StackedDense(num_domains, width, width, rngs=rngs)
        self.shared = StackedMLP(cfg.num_experts, width, cfg.expert_hidden, rngs=rngs)
        self.own = nnx.List(
            [StackedMLP(num_domains, width, cfg.expert_hidden, rngs=rngs) for _ in range(cfg.domain_experts)]
        )
        self.gate = StackedDense(1, width + cfg.gate_dim, cfg.num_experts + cfg.domain_experts, rngs=rngs)
        self.debias = StackedMLP(1, cfg.gate_dim, cfg.expert_hidden, rngs=rngs)

    def __call__(self, x_hat: Array, domain: Array, dtype: jnp.dtype, train: bool) -> tuple[Array, Array]:
        e = self.domain_embedding[...][domain]
        x = self.transfer.own_layer(x_hat, domain, dtype)
        own = [stack.own_layer(x, domain, dtype) for stack in self.own]
        experts = jnp.concatenate([self.shared.all_layers(x, dtype), jnp.stack(own, axis=1)], axis=1)
        weights = jax.nn.softmax(self.gate.all_layers(jnp.concatenate([x, e.astype(x.dtype)], 1), dtype)[:, 0], -1)
        mixed = jnp.einsum("be,beh->bh", weights.astype(dtype), experts) + self.debias.all_layers(e, dtype)[:, 0]
        return mixed[:, None], x_hat


class ClusterRouting(nnx.Module):
    """AdaptDHM: a shared MLP, then each example through the layer of the cluster whose centroid is nearest
    (cosine similarity), the centroids moving averages of their examples in training. -> [B, 1, h]."""

    def __init__(self, cfg: ModelConfig, num_domains: int, width: int, *, rngs: nnx.Rngs, momentum: float = 0.99):
        h = cfg.expert_hidden[-1]
        self.shared = StackedMLP(1, width, cfg.expert_hidden, rngs=rngs)
        self.clusters = StackedDense(cfg.adaptdhm_clusters, h, h, rngs=rngs)
        self.centroids = nnx.BatchStat(jax.random.normal(rngs.params(), (cfg.adaptdhm_clusters, h)))
        self.momentum = momentum

    def route(self, h: Array) -> Array:
        """[B, h] -> the nearest centroid's index [B]"""
        unit = lambda a: a / jnp.maximum(jnp.linalg.norm(a, axis=-1, keepdims=True), 1e-6)  # noqa: E731
        return jnp.argmax(unit(h) @ unit(self.centroids[...]).T, axis=1)

    def __call__(self, x_hat: Array, domain: Array, dtype: jnp.dtype, train: bool) -> tuple[Array, Array]:
        h = self.shared.all_layers(x_hat, dtype)[:, 0]
        cluster = self.route(jax.lax.stop_gradient(h.astype(jnp.float32)))
        if train:
            onehot = jax.nn.one_hot(cluster, self.centroids.shape[0], dtype=jnp.float32)  # [B, C]
            count = onehot.sum(0)[:, None]
            mean = onehot.T @ jax.lax.stop_gradient(h.astype(jnp.float32)) / jnp.maximum(count, 1.0)
            moved = self.momentum * self.centroids[...] + (1 - self.momentum) * mean
            self.centroids[...] = jnp.where(count > 0, moved, self.centroids[...])
        out = h + jax.nn.relu(self.clusters.own_layer(h, cluster, dtype))
        return out[:, None], x_hat


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
                m = self.momentum
                self.mean[...] = jnp.where(count > 0, m * self.mean[...] + (1 - m) * mean, self.mean[...])
                self.var[...] = jnp.where(count > 0, m * self.var[...] + (1 - m) * var, self.var[...])
                self.updates[...] = self.updates[...] + (count[:, 0] > 0)
            else:
                mean, var = self.debiased()
            z = (x - mean[domain]) * jax.lax.rsqrt(var[domain] + 1e-5)
        gamma = self.scale[...] * self.domain_scale[...][domain]
        return z * gamma + self.shift[...] + self.domain_shift[...][domain]

    def debiased(self) -> tuple[Array, Array]:
        """Each domain's moving mean and variance [K, width] without the starting (0, 1)'s remaining weight
        m^n; a domain never seen keeps (0, 1)."""
        left = (self.momentum ** self.updates[...])[:, None]  # [K, 1]: the starting values' weight
        seen = left < 1.0
        denominator = jnp.where(seen, 1.0 - left, 1.0)
        mean = jnp.where(seen, self.mean[...] / denominator, 0.0)
        var = jnp.where(seen, (self.var[...] - left) / denominator, 1.0)
        return mean, jnp.maximum(var, 0.0)


class StarNetwork(nnx.Module):
    """STAR: partitioned normalisation, then ReLU layers with W = W_shared * W_k and b = b_shared + b_k. The
    domain factors start at one and zero, so every domain starts from the shared network."""

    def __init__(self, cfg: ModelConfig, num_domains: int, width: int, *, rngs: nnx.Rngs):
        self.norm = PartitionedNorm(num_domains, width, per_example=cfg.star_norm == "layer")
        dims = (width, *cfg.expert_hidden)
        self.shared_kernels = nnx.List([normal(rngs, (a, b), a**-0.5) for a, b in zip(dims[:-1], dims[1:])])
        self.shared_biases = nnx.List([zeros((b,)) for b in dims[1:]])
        self.domain_kernels = nnx.List([nnx.Param(jnp.ones((num_domains, a, b))) for a, b in zip(dims[:-1], dims[1:])])
        self.domain_biases = nnx.List([zeros((num_domains, b)) for b in dims[1:]])

    def __call__(self, x_hat: Array, domain: Array, dtype: jnp.dtype, train: bool) -> tuple[Array, Array]:
        """-> ([B, 1, h], x_hat)"""
        layers = list(zip(self.shared_kernels, self.shared_biases, self.domain_kernels, self.domain_biases))

        def star(tiles, group):  # [T, rows, in], each tile through its domain's star-topology layers
            for w, b, w_k, b_k in layers:
                kernels = (w[...][None] * w_k[...][group]).astype(dtype)  # [T, in, out]
                y = jnp.einsum("tri,tio->tro", tiles.astype(dtype), kernels)
                tiles = jax.nn.relu(y + b[...] + b_k[...][group][:, None])
            return tiles

        h = by_group(self.norm(x_hat, domain, train), domain, self.domain_kernels[0].shape[0], star)
        return h[:, None, :], x_hat


class StarAuxiliary(nnx.Module):
    """STAR's auxiliary network: a small MLP on [x_hat, domain embedding] whose output is added to the
    logit, so the domain indicator acts on the prediction directly."""

    def __init__(self, num_domains: int, width: int, *, rngs: nnx.Rngs, hidden: int = 32, indicator: int = 8):
        self.indicator = normal(rngs, (num_domains, indicator), 0.05)
        self.mlp = StackedMLP(1, width + indicator, (hidden, 1), rngs=rngs, linear_out=True)

    def __call__(self, x_hat: Array, domain: Array, dtype: jnp.dtype) -> Array:
        """-> [B] logits (float32)"""
        x = jnp.concatenate([x_hat, self.indicator[...][domain]], axis=1)
        return self.mlp.all_layers(x, dtype)[:, 0, 0]


def make_backbone(cfg: ModelConfig, num_domains: int, width: int, *, rngs: nnx.Rngs) -> nnx.Module:
    kinds = {"mmoe": SharedExperts, "ple": ProgressiveExperts, "star": StarNetwork, "m3oe": DomainMixtures,
             "epnet": EPNet, "ppnet": PPNet, "hamur": HAMUR, "m2m": M2M, "adasparse": AdaSparse,
             "sarnet": ScenarioExperts, "adaptdhm": ClusterRouting}  # fmt: skip
    return kinds[cfg.backbone](cfg, num_domains, width, rngs=rngs)


def gate_width(cfg: ModelConfig, width: int) -> int:
    """The width of what L2's domain gates read: x_hat, or PLE's last domain input."""
    return cfg.expert_hidden[-1] if cfg.backbone == "ple" and cfg.ple_levels > 1 else width
