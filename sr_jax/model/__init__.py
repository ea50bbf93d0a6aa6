"""The model and its functional API.

    graphdef, params = sr_jax.model.init(config.model, meta, text_dim, seed=0)   # or abstract(): shapes only
    logits, aux = sr_jax.model.apply(graphdef, params, batch, text)    # pure, jit-able
    out = sr_jax.model.predict(graphdef, params, batch, text)          # {"logit", "probability", ...}

`params` is a plain nested dict of arrays (levels `l0`, `l1`, `l2` at the top): it is what optax
updates, orbax saves and sharding rules annotate. It also holds STAR's batch statistics (`stats_mask`),
which training writes back from `apply(..., train=True)` instead of optimizing.
"""

from __future__ import annotations

from typing import Any

import chex
import jax
import jax.numpy as jnp
from flax import nnx

from sr_jax.calibration import apply as calibrate
from sr_jax.config import ModelConfig
from sr_jax.data.schema import DatasetMeta
from sr_jax.model.domain_adaptation import AlignmentReference
from sr_jax.model.encoding import TextTable
from sr_jax.model.foundation import SRFoundationModel
from sr_jax.model.levels import LEVELS, leaf_levels, level_of

Params = dict[str, Any]


def init_params(
    cfg: ModelConfig, meta: DatasetMeta, text_dim: int, seed: int = 0, num_domains: int | None = None
) -> Params:
    """Fresh parameters: a pure function, to be called under jit (eager NNX init compiles every initializer)."""
    model = SRFoundationModel(cfg, meta, text_dim, rngs=nnx.Rngs(seed), num_domains=num_domains)
    return nnx.to_pure_dict(nnx.state(model))


def abstract(
    cfg: ModelConfig, meta: DatasetMeta, text_dim: int, num_domains: int | None = None
) -> tuple[nnx.GraphDef, Params]:
    """The static graph and the parameters' shapes and dtypes, without computing anything."""
    model = nnx.eval_shape(lambda: SRFoundationModel(cfg, meta, text_dim, rngs=nnx.Rngs(0), num_domains=num_domains))
    graphdef, state = nnx.split(model)
    return graphdef, nnx.to_pure_dict(state)


def init(
    cfg: ModelConfig, meta: DatasetMeta, text_dim: int, seed: int = 0, num_domains: int | None = None
) -> tuple[nnx.GraphDef, Params]:
    """Builds the model: (static graph, parameters)."""
    graphdef, _ = abstract(cfg, meta, text_dim, num_domains)
    return graphdef, jax.jit(lambda: init_params(cfg, meta, text_dim, seed, num_domains))()


def per_domain(cfg: ModelConfig, meta: DatasetMeta, text_dim: int, params: Params) -> Params:
    """A tree like `params` (the model's, for meta's K domains) of bools: True where a leaf's first axis
    indexes domains (its rows are the domain-embedding row, the adapter's W_k, the gate and tower of
    domain k). Found by comparing with the shapes of a model with K + 1 domains, so a new per-domain
    parameter needs no registration."""
    _, more = abstract(cfg, meta, text_dim, num_domains=meta.num_domains + 1)
    return jax.tree.map(lambda a, b: a.shape != b.shape, params, more)


def apply(
    graphdef: nnx.GraphDef,
    params: Params,
    batch: dict[str, jax.Array],
    text: TextTable,
    table_rows=None,
    *,
    train: bool = False,
    key: jax.Array | None = None,
    reference: AlignmentReference | None = None,
):
    """(logits [B] float32, aux) where aux = {"reg": scalar, "adapted": [B, 3d] (z, the Domain Adaptive Layer's
    output: what L_reg aligns),
    "aspect_weights": {side: [B, A]}, "expert_weights": [B, E]}, and with `train=True` also "stats": the
    batch statistics after this batch (STAR's partitioned normalisation; {} for other models), a
    params-shaped subtree to write back with `with_stats`. `table_rows` (optional) are the embedding rows
    to read per table, as `table_rows` gives them; `key` draws the MMD subsample; `reference`: the
    pretrained domains' distributions that fine-tuning aligns against."""
    model = nnx.merge(graphdef, params)
    run = nnx.capture(model, nnx.Intermediate)
    (logits, aux), sown = run(batch, text, table_rows, train=train, key=key, reference=reference)
    aux.update(sown_totals(sown))
    chex.assert_shape(logits, batch["label"].shape if "label" in batch else (batch["domain"].shape[0],))
    if train:
        aux["stats"] = nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))
    return logits, aux


SOWN = ("lookup_dropped", "backbone_reg")  # what layers sow: routed lookups' drops, a backbone's own loss term


def sown_totals(sown) -> dict[str, jax.Array]:
    """name -> the sum of every value sown under it (by any layer, any number of times)."""
    totals: dict[str, jax.Array] = {}
    for path, value in jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(sown)):
        name = next(k.key for k in path if getattr(k, "key", None) in SOWN)
        totals[name] = totals.get(name, 0) + value
    return totals


def predict(
    graphdef: nnx.GraphDef,
    params: Params,
    batch: dict[str, jax.Array],
    text: TextTable,
    trained: dict[str, jax.Array] | None = None,
    calibration: dict[str, jax.Array] | None = None,
) -> dict[str, jax.Array]:
    """Inference: {"logit": [B] float32 (rank by it), "calibrated_logit": [B], "probability": [B], the click
    probability sigmoid(calibrated_logit)} and `apply`'s aux. The one place a score is made from the model:
    evaluation, batch scoring and the serving artifact all call it. `trained` (`model.untrained_ids=missing`):
    table column -> [rows] bool, the rows the model trained; an id or field value of another row is read as
    missing (row 0), so the gate weighs the aspects the model knows. `calibration`: the per-domain map of
    `sr_jax.calibration.arrays` (None: the identity)."""
    if trained:
        batch = {
            **batch,
            **{c: jnp.where(jnp.asarray(m)[batch[c]], batch[c], 0) for c, m in trained.items() if c in batch},
        }
    logits, aux = apply(graphdef, params, batch, text)
    logits = logits.astype(jnp.float32)
    calibrated = logits if calibration is None else calibrate(calibration, logits, batch["domain"])
    return {**aux, "logit": logits, "calibrated_logit": calibrated, "probability": jax.nn.sigmoid(calibrated)}


def sides(graphdef: nnx.GraphDef, params: Params, batch: dict[str, jax.Array], text: TextTable) -> dict[str, jax.Array]:
    """{"user", "query", "item"} -> [B, d]: each side's fused vector (aspect gating fusion of its id, text and
    sparse aspects, for the example's domain). A side's vector depends on that side's features and the domain
    only, so items and queries can be embedded apart (`sr_jax.export.embeddings`)."""
    return nnx.merge(graphdef, params).sides(batch, text)


def from_sides(graphdef: nnx.GraphDef, params: Params, fused: dict[str, jax.Array], domain: jax.Array) -> jax.Array:
    """The logits [B] (inference mode) of fused side vectors [B, d] and domains [B]: `apply`'s logits when
    `fused = sides(...)` of the same batch."""
    return nnx.merge(graphdef, params).from_sides(fused, domain)[0]


def tower_output(cfg: ModelConfig, leaf: str = "kernel") -> str:
    """The path of the towers' output kernel [K, h, 1] (the network's per-domain logit), or its `leaf="bias"` [K, 1]."""
    return f"l2/tower/layers/{len(cfg.tower_hidden)}/{leaf}"


def stats_mask(graphdef: nnx.GraphDef, params: Params) -> Params:
    """A tree like `params` of bools: True for batch statistics (not trained by the optimizer: they follow the
    data through `apply(..., train=True)`)."""
    stats = jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(nnx.state(nnx.merge(graphdef, params), nnx.BatchStat)))
    paths = {tuple(path) for path, _ in stats}
    return jax.tree_util.tree_map_with_path(lambda path, _: tuple(path) in paths, params)


def with_stats(params: Params, stats: Params) -> Params:
    """`params` with the batch statistics in `stats` (a subtree of the same paths) replaced."""
    if not isinstance(stats, dict):
        return stats
    return {k: with_stats(v, stats[k]) if k in stats else v for k, v in params.items()}


def table_rows(graphdef: nnx.GraphDef, params: Params, batch: dict[str, jax.Array]) -> dict[tuple[str, str], jax.Array]:
    """The embedding rows `batch` reads, per table (key: its path under params["l0"])."""
    return nnx.merge(graphdef, params).l0.table_rows(batch)


__all__ = [
    "LEVELS",
    "AlignmentReference",
    "Params",
    "SRFoundationModel",
    "TextTable",
    "abstract",
    "apply",
    "from_sides",
    "init",
    "init_params",
    "leaf_levels",
    "level_of",
    "per_domain",
    "predict",
    "sides",
    "stats_mask",
    "table_rows",
    "tower_output",
    "with_stats",
]
