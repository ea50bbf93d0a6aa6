"""The S&R Multi-Domain Foundation model, with its parameters grouped by level.

    l0  FeatureEncoder       ids, sparse fields, text projection            (encoding)
    l1  SharedAdaptation     aspect gating fusion, domain adaptive layer,   (shared by all domains)
                             the backbone's experts (`model/backbones/`)
    l2  DomainHeads          one expert gate and one tower per domain       (task-specific)

A parameter's level is the first key of its path (`params["l1"]["backbone"]...`), so selecting,
freezing or restoring a level is a filter on that key (`sr_jax.model.levels`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from sr_jax.config import ConfigError, ModelConfig, validate_model
from sr_jax.data.schema import DatasetMeta
from sr_jax.model.backbones import BackboneInput, StarAuxiliary, gate_width, make_backbone, num_outputs
from sr_jax.model.backbones.common import mix
from sr_jax.model.domain_adaptation import (
    AlignmentReference,
    DomainAdaptiveLayer,
    js_regularizer,
    mmd_regularizer,
    standardise,
)
from sr_jax.model.encoding import SIDES, Aspects, FeatureEncoder, TextTable, side_aspects
from sr_jax.model.fusion import AspectGate
from sr_jax.model.layers import Array, StackedDense, StackedMLP, normal
from sr_jax.model.match import TEXTS, ContentMatch


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
        self.backbone = make_backbone(cfg, num_domains, width, rngs=rngs)

    def fuse(self, sides: dict[str, Aspects], domain: Array) -> tuple[dict[str, Array], dict[str, Array]]:
        """Each side's aspects -> (its fused vector h [B, d], its aspect weights [B, A]), per side. A side's
        vector depends on that side's features and the domain only: the towers of the two-tower view."""
        e_d = self.domain_embedding[...][domain]
        fused, weights = zip(*(self.gates[s](sides[s], e_d) for s in SIDES))
        return dict(zip(SIDES, fused)), dict(zip(SIDES, weights))

    def __call__(self, fused: dict[str, Array], domain: Array, train: bool, key: Array, reference):
        """-> (x_hat [B, 3d], expert outputs [B, E, h], L2's gate input [B, g], aux)"""
        cfg, dtype = self.cfg, jnp.dtype(self.cfg.dtype)
        x = jnp.concatenate([fused[s] for s in SIDES], axis=1)
        x_hat, z = self.adapter(x, domain, dtype) if self.adapter is not None else (x, standardise(x))
        if cfg.regularizer == "js":
            reg = js_regularizer(z, domain, self.num_domains, cfg.reg_temperature, reference)
        elif cfg.regularizer == "mmd":
            reg = mmd_regularizer(z, domain, self.num_domains, cfg.mmd_bandwidth, cfg.mmd_max_examples, key, reference)
        else:
            reg = jnp.zeros((), jnp.float32)
        e_d = self.domain_embedding[...][domain]
        out = self.backbone(BackboneInput(x_hat, x, domain, e_d), dtype, train)
        gate_input = x_hat if out.gate_input is None else out.gate_input
        return x_hat, out.experts, gate_input, {"reg": reg, "adapted": z}


class DomainHeads(nnx.Module):
    """L2: each domain's softmax gate over the experts (none when there is one expert output) and its tower;
    an example uses its own domain's."""

    def __init__(self, cfg: ModelConfig, num_domains: int, *, rngs: nnx.Rngs):
        self.dtype = jnp.dtype(cfg.dtype)
        width = len(SIDES) * cfg.dim
        experts = num_outputs(cfg)
        self.gate = StackedDense(num_domains, gate_width(cfg, width), experts, rngs=rngs) if experts > 1 else None
        self.tower = StackedMLP(num_domains, cfg.expert_hidden[-1], (*cfg.tower_hidden, 1), rngs=rngs, linear_out=True)
        self.aux = StarAuxiliary(num_domains, width, rngs=rngs) if cfg.backbone == "star" else None
        self.match = ContentMatch(num_domains) if cfg.content_match and cfg.use_text else None

    def __call__(
        self, x_hat: Array, experts: Array, gate_input: Array, domain: Array, texts: dict[str, Array] | None = None
    ) -> tuple[Array, Array]:
        """-> (logits [B] float32, expert weights [B, E]); `texts`: the content match's side vectors."""
        if self.gate is None:
            g, mixed = jnp.ones(experts.shape[:2], jnp.float32), experts[:, 0]
        else:
            scores = self.gate.own_layer(gate_input, domain, self.dtype)
            g, mixed = jax.nn.softmax(scores.astype(jnp.float32), axis=-1), mix(scores, experts, self.dtype)
        logits = self.tower.own_layer(mixed, domain, self.dtype)[:, 0]
        if self.aux is not None:
            logits = logits + self.aux(x_hat, domain, self.dtype)
        if self.match is not None:
            if texts is None:
                raise ValueError("model.content_match: the logits need the text side vectors that `sides` gives")
            logits = logits.astype(jnp.float32) + self.match(texts, domain)
        return logits, g


class SRFoundationModel(nnx.Module):
    """logits, aux = model(batch, text): batch holds a dataset split's columns, text the cached features."""

    def __init__(
        self, cfg: ModelConfig, meta: DatasetMeta, text_dim: int, *, rngs: nnx.Rngs, num_domains: int | None = None
    ):
        if problems := validate_model(cfg):
            raise ConfigError("invalid model config:\n  " + "\n  ".join(problems))
        num_domains = num_domains or meta.num_domains
        aspects = side_aspects(cfg, meta)
        self.l0 = FeatureEncoder(cfg, meta, text_dim, rngs=rngs)
        self.l1 = SharedAdaptation(cfg, aspects, num_domains, text_dim, rngs=rngs)
        self.l2 = DomainHeads(cfg, num_domains, rngs=rngs)

    def __call__(
        self,
        batch: dict[str, Array],
        text: TextTable,
        table_rows=None,
        *,
        train: bool = False,
        key: Array | None = None,
        reference: AlignmentReference | None = None,
    ) -> tuple[Array, dict]:
        """`table_rows`: the embedding rows to read per table (default: the batch's; see FeatureEncoder).
        `train`: STAR's partitioned normalisation uses (and updates) batch statistics; `key`: the MMD
        regularizer's subsample; `reference`: the pretrained domains' distributions to align against."""
        key = jax.random.key(0) if key is None else key
        texts = self.l0.read_texts(batch, text, train)
        aspects = self.l0(batch, texts, table_rows, train=train, key=jax.random.fold_in(key, 1))
        fused, weights = self.l1.fuse(aspects, batch["domain"])
        if self.l2.match is not None:
            fused = {**fused, **self.l0.unit_texts(batch, texts)}
        logits, aux = self.from_sides(fused, batch["domain"], train=train, key=key, reference=reference)
        aux["aspect_weights"] = weights
        return logits, aux

    def sides(self, batch: dict[str, Array], text: TextTable) -> dict[str, Array]:
        """The fused user, query and item vectors [B, d] of each example: what the network above them sees; with
        the content match, also each side's unit text vector [B, text_dim] (`match.TEXTS`)."""
        texts = self.l0.read_texts(batch, text, train=False)
        fused = self.l1.fuse(self.l0(batch, texts), batch["domain"])[0]
        return {**fused, **self.l0.unit_texts(batch, texts)} if self.l2.match is not None else fused

    def from_sides(
        self,
        fused: dict[str, Array],
        domain: Array,
        *,
        train: bool = False,
        key: Array | None = None,
        reference: AlignmentReference | None = None,
    ) -> tuple[Array, dict]:
        """The logits [B] from the fused side vectors (`sides`) and the domains [B]; aux as `__call__`'s."""
        key = jax.random.key(0) if key is None else key
        x_hat, experts, gate_input, aux = self.l1(fused, domain, train, key, reference)
        texts = {k: fused[k] for k in TEXTS if k in fused} or None
        logits, aux["expert_weights"] = self.l2(x_hat, experts, gate_input, domain, texts)
        return logits, aux
