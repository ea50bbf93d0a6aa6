"""The S&R Multi-Domain Foundation model, with its parameters grouped by level.

    l0  FeatureEncoder       ids, sparse fields, text projection            (encoding)
    l1  SharedAdaptation     aspect gating fusion, domain adaptive layer,   (shared by all domains)
                             the backbone's experts (MMoE, PLE or STAR)
    l2  DomainHeads          one expert gate and one tower per domain       (task-specific)

A parameter's level is the first key of its path (`params["l1"]["experts"]...`), so selecting,
freezing or restoring a level is a filter on that key (`sr_jax.model.levels`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from sr_jax.config import ModelConfig
from sr_jax.data.schema import DatasetMeta
from sr_jax.model.backbones import BACKBONES, DomainExperts, StarAuxiliary, StarNetwork, num_outputs
from sr_jax.model.domain_adaptation import REGULARIZERS, DomainAdaptiveLayer, js_regularizer, mmd_regularizer
from sr_jax.model.encoding import SIDES, FeatureEncoder, TextTable, side_aspects
from sr_jax.model.fusion import AspectGate
from sr_jax.model.layers import Array, StackedDense, StackedMLP, normal


class SharedAdaptation(nnx.Module):
    """L1: fuse each side's aspects, map all domains into one space, run the shared experts."""

    def __init__(
        self, cfg: ModelConfig, aspects: dict[str, tuple[str, ...]], num_domains: int, text_dim: int, *, rngs: nnx.Rngs
    ):
        self.cfg, self.num_domains = cfg, num_domains
        width = len(SIDES) * cfg.dim
        self.domain_embedding = normal(rngs, (num_domains, cfg.gate_dim), cfg.gate_dim**-0.5)
        self.gates = nnx.Dict(
            {s: AspectGate(cfg.gating, len(aspects[s]), cfg.dim, cfg.gate_dim, text_dim, rngs=rngs) for s in SIDES}
        )
        self.adapter = DomainAdaptiveLayer(num_domains, width, rngs=rngs) if cfg.use_domain_adapter else None
        star = cfg.backbone == "star"
        self.experts = None if star else StackedMLP(cfg.num_experts, width, cfg.expert_hidden, rngs=rngs)
        self.domain_experts = DomainExperts(cfg, num_domains, width, rngs=rngs) if cfg.backbone == "ple" else None
        self.star = StarNetwork(num_domains, width, cfg.expert_hidden, rngs=rngs) if star else None

    def __call__(self, sides, domain: Array) -> tuple[Array, Array, dict]:
        """-> (x_hat [B, 3d], expert outputs [B, E, h], aux)"""
        cfg, dtype = self.cfg, jnp.dtype(self.cfg.dtype)
        e_d = self.domain_embedding[...][domain]
        fused, weights = zip(*(self.gates[s](sides[s], e_d) for s in SIDES))
        x = jnp.concatenate(fused, axis=1)
        x_hat = self.adapter(x, domain, dtype) if self.adapter is not None else x
        if cfg.regularizer == "js":
            reg = js_regularizer(x_hat, domain, self.num_domains, cfg.reg_temperature)
        elif cfg.regularizer == "mmd":
            reg = mmd_regularizer(x_hat, domain, self.num_domains, cfg.mmd_bandwidth, cfg.mmd_max_examples)
        else:
            reg = jnp.zeros((), jnp.float32)
        if self.star is not None:
            experts = self.star(x_hat, domain, dtype)
        else:
            experts = self.experts.all(x_hat, dtype)
            if self.domain_experts is not None:
                experts = jnp.concatenate([experts, self.domain_experts(x_hat, domain, dtype)], axis=1)
        return x_hat, experts, {"reg": reg, "aspect_weights": dict(zip(SIDES, weights))}


class DomainHeads(nnx.Module):
    """L2: each domain's softmax gate over the experts and its tower; an example uses its own domain's."""

    def __init__(self, cfg: ModelConfig, num_domains: int, *, rngs: nnx.Rngs):
        self.dtype = jnp.dtype(cfg.dtype)
        self.gate = StackedDense(num_domains, len(SIDES) * cfg.dim, num_outputs(cfg), rngs=rngs)
        self.tower = StackedMLP(num_domains, cfg.expert_hidden[-1], (*cfg.tower_hidden, 1), rngs=rngs, linear_out=True)
        width = len(SIDES) * cfg.dim
        self.aux = StarAuxiliary(num_domains, width, rngs=rngs) if cfg.backbone == "star" else None

    def __call__(self, x_hat: Array, experts: Array, domain: Array) -> tuple[Array, Array]:
        """-> (logits [B], expert weights [B, E])"""
        g = jax.nn.softmax(self.gate.select(x_hat, domain, self.dtype).astype(jnp.float32), axis=-1)
        mixed = jnp.einsum("be,beh->bh", g.astype(self.dtype), experts)
        logits = self.tower.select(mixed, domain, self.dtype)[:, 0].astype(jnp.float32)
        if self.aux is not None:
            logits = logits + self.aux(x_hat, domain, self.dtype).astype(jnp.float32)
        return logits, g


class SRFoundationModel(nnx.Module):
    """logits, aux = model(batch, text): batch holds a dataset split's columns, text the cached features."""

    def __init__(
        self, cfg: ModelConfig, meta: DatasetMeta, text_dim: int, *, rngs: nnx.Rngs, num_domains: int | None = None
    ):
        if cfg.regularizer not in REGULARIZERS:
            raise ValueError(f"model.regularizer={cfg.regularizer!r}: expected one of {REGULARIZERS}")
        if cfg.backbone not in BACKBONES:
            raise ValueError(f"model.backbone={cfg.backbone!r}: expected one of {BACKBONES}")
        num_domains = num_domains or meta.num_domains
        aspects = side_aspects(cfg, meta)
        self.l0 = FeatureEncoder(cfg, meta, text_dim, rngs=rngs)
        self.l1 = SharedAdaptation(cfg, aspects, num_domains, text_dim, rngs=rngs)
        self.l2 = DomainHeads(cfg, num_domains, rngs=rngs)

    def __call__(self, batch: dict[str, Array], text: TextTable, rows=None) -> tuple[Array, dict]:
        """`rows`: the embedding rows to read per table (default: the batch's; see FeatureEncoder)."""
        domain = batch["domain"]
        x_hat, experts, aux = self.l1(self.l0(batch, text, rows), domain)
        logits, aux["expert_weights"] = self.l2(x_hat, experts, domain)
        return logits, aux
