"""L0, the feature layer: id and sparse-field embeddings, dense-field vectors, the projection of text features.

Its output is, for each side (user, query, item), a stack of aspect vectors [B, A, d] and a mask
[B, A] saying which aspects the example has (id 0, text row -1, all-zero sparse fields and all-NaN dense fields
are missing; in training, `model.id_dropout` of the ids too). A dense field's value x (standardised at prepare
time) is the vector x w_f + b_f, the mean over the side's present dense fields its `dense` aspect, so every
backbone reads the numbers through the fusion, as the sparse fields. The user's history aspect pools the texts
of their earlier clicks: their mean, or (`model.history_pooling=attention`) DIN's target attention, weighted by
how each relates to the candidate item's text.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sr_jax.config import ModelConfig
from sr_jax.data.history import COLUMN as HISTORY
from sr_jax.data.pipeline import joined
from sr_jax.data.schema import SPARSE_SIDES, DatasetMeta
from sr_jax.model.match import unit_texts
from sr_jax.model.layers import Array, context_axes, context_shards, hash_ids, masked_softmax, normal
from sr_jax.model.lookup import routed_axes, routed_lookup
from sr_jax.model.rows import layout as row_layout, position as row_position

SIDES = ("user", "query", "item")


class TextTable(NamedTuple):
    """The frozen encoder's cached output for the dataset's text table, on device (in training: split by rows
    over the mesh's model axis, padded with zero rows; `summary` has no real rows unless cls gating reads it)."""

    pooled: Array  # [num_texts (padded), text_dim]
    summary: Array  # the summary token's vectors (BERT's first, a decoder's last): like pooled, or [model axis,
    # text_dim] of zeros where unused


class BatchTexts(NamedTuple):
    """The text vectors a batch reads (`FeatureEncoder.read_texts`), per text column (query_text, item_text: [B]
    rows; the user's history [B, N] where the model reads it); zeros where a row is -1."""

    pooled: dict[str, Array]  # column -> [B, text_dim] ([B, N, text_dim] for the history)
    summary: dict[str, Array]  # query_text, item_text -> [B, text_dim]: the summary token's vectors


class Aspects(NamedTuple):
    vectors: Array  # [B, A, d]
    mask: Array  # [B, A] bool
    summary: Array  # [B, text_dim]: the side's summary-token text vector (zeros without text)


def side_aspects(cfg: ModelConfig, meta: DatasetMeta) -> dict[str, tuple[str, ...]]:
    """The aspects each side fuses, in order."""
    sparse = {s: ("sparse",) if any(f.side == s for f in meta.sparse_fields) else () for s in SIDES}
    dense = {s: ("dense",) if any(f.side == s for f in meta.dense_fields) else () for s in SIDES}
    text = ("text",) if cfg.use_text else ()
    history = ("history",) if cfg.user_history > 0 else ()  # -1 (auto) is resolved by a run, read here as 0
    return {
        "user": ("id",) + sparse["user"] + dense["user"] + history,
        "query": ("id",) + text,
        "item": ("id",) + text + sparse["item"] + dense["item"],
    }


def table_key(column: str) -> tuple[str, str]:
    """The path under params["l0"] of the parameters a feature column reads: user_id -> ("id_tables", "user"),
    item.brand -> ("sparse_tables", "item_brand"), item.dense.rating -> ("dense", "item_rating")."""
    if column.endswith("_id") and "." not in column:
        return ("id_tables", column[: -len("_id")])
    side, name = column.split(".", 1)
    if name.startswith("dense."):
        return ("dense", f"{side}_{name[len('dense.') :]}")
    return ("sparse_tables", f"{side}_{name}")


def padded_rows(rows: int, multiple: int) -> int:
    """A table's row count rounded up to `model.table_row_multiple`, so that any model axis dividing that
    multiple shards it evenly (ids never reach the padding rows)."""
    return -(-rows // multiple) * multiple


class HistoryAttention(nnx.Module):
    """DIN's activation unit: a score per history item from [h, c, h * c, h - c] (h the item's projected
    text, c the candidate's), softmax over the items present -> the weighted sum of h."""

    def __init__(self, dim: int, hidden: int = 16, *, rngs: nnx.Rngs):
        self.hidden = nnx.Linear(4 * dim, hidden, rngs=rngs)
        self.score = nnx.Linear(hidden, 1, rngs=rngs)

    def __call__(self, items: Array, present: Array, candidate: Array) -> Array:
        """items [B, N, d], present [B, N] bool, candidate [B, d] -> [B, d]."""
        c = jnp.broadcast_to(candidate[:, None, :], items.shape)
        scores = self.score(jax.nn.sigmoid(self.hidden(jnp.concatenate([items, c, items * c, items - c], -1))))
        w = masked_softmax(scores[..., 0], present)
        return jnp.einsum("bn,bnd->bd", w, items)


def text_position(rows: Array, table_rows: int) -> Array:
    """Text rows (-1: none) -> where `sharding.text_rows` stores them on the context mesh (strided over the
    shards of the `text_rows` rule; the identity on one device or without a mesh)."""
    shards = context_shards("text_rows", "model")
    return jnp.where(rows >= 0, row_position(jnp.maximum(rows, 0), table_rows, shards, "strided"), -1)


class FeatureEncoder(nnx.Module):
    def __init__(self, cfg: ModelConfig, meta: DatasetMeta, text_dim: int, *, rngs: nnx.Rngs):
        self.vocab = {s: meta.vocab[f"{s}_id"] for s in SIDES}
        self.buckets = {s: min(v, cfg.id_buckets) if cfg.id_buckets else v for s, v in self.vocab.items()}
        self.aspects = side_aspects(cfg, meta)

        def table(rows: int) -> nnx.Param:
            return normal(rngs, (padded_rows(rows, cfg.table_row_multiple), cfg.dim), cfg.embedding_init_std)

        self.id_tables = nnx.Dict({s: table(self.buckets[s]) for s in SIDES})
        self.fields = {s: [f for f in meta.sparse_fields if f.side == s] for s in SPARSE_SIDES}
        self.sparse_tables = nnx.Dict({table_key(f.column)[1]: table(f.vocab) for f in meta.sparse_fields})
        # one projection per field (pooled over the present ones), so that no shape depends on how many
        # fields a dataset has: a model meets a dataset with other fields by adding or dropping some
        self.sparse_proj = nnx.Dict(
            {table_key(f.column)[1]: nnx.Linear(cfg.dim, cfg.dim, rngs=rngs) for f in meta.sparse_fields}
        )
        self.dense_fields = {s: [f for f in meta.dense_fields if f.side == s] for s in SPARSE_SIDES}
        # per dense field [2, d]: its value's direction w_f and its offset b_f
        self.dense = nnx.Dict(
            {table_key(f.column)[1]: normal(rngs, (2, cfg.dim), cfg.embedding_init_std) for f in meta.dense_fields}
        )
        text_sides = ("query", "item", *(("history",) if cfg.user_history > 0 else ())) if cfg.use_text else ()
        self.text_proj = nnx.Dict({s: nnx.Linear(text_dim, cfg.dim, rngs=rngs) for s in text_sides})
        self.text_dim = text_dim
        self.id_dropout = cfg.id_dropout
        self.lookup, self.lookup_capacity = cfg.lookup, cfg.lookup_capacity
        self.lookup_wire = jnp.dtype(cfg.lookup_wire)
        self.row_layout = row_layout(cfg)
        attend = cfg.user_history > 0 and cfg.history_pooling == "attention"
        self.history_attention = HistoryAttention(cfg.dim, rngs=rngs) if attend else None

    def table_rows(self, batch: dict[str, Array]) -> dict[tuple[str, str], Array]:
        """The stored rows every embedding lookup of `batch` reads, per table (key: the table's path under l0,
        e.g. ("id_tables", "user"); positions in `model.row_layout`, sr_jax/model/rows.py); a multi-valued field's
        rows keep its [B, L] shape."""
        rows = {("id_tables", s): hash_ids(batch[f"{s}_id"], self.vocab[s], self.buckets[s]) for s in SIDES}
        for fields in self.fields.values():
            rows.update({table_key(f.column): batch[f.column] for f in fields})
        return {k: self.position(k, r) for k, r in rows.items()}

    def position(self, key: tuple[str, str], table_rows: Array) -> Array:
        """A table's rows -> where it stores them."""
        size = (self.id_tables if key[0] == "id_tables" else self.sparse_tables)[key[1]].shape[0]
        return row_position(table_rows, size, *self.row_layout)

    def __call__(
        self,
        batch: dict[str, Array],
        texts: BatchTexts,
        table_rows: dict[tuple[str, str], Array] | None = None,
        *,
        train: bool = False,
        key: Array | None = None,
    ) -> dict[str, Aspects]:
        """`table_rows` replaces `self.table_rows(batch)`: the row-sparse update passes the gathered tables'
        rows. `train` with `key`: ids dropped at the rate `model.id_dropout`."""
        rows = self.table_rows(batch) if table_rows is None else table_rows
        looked_up = self._lookups(rows, train)
        dropping = train and self.id_dropout > 0 and key is not None
        out = {}
        for k, side in enumerate(SIDES):
            vectors, masks = [], []
            ids = batch[f"{side}_id"]
            summary = jnp.zeros((ids.shape[0], self.text_dim), jnp.float32)
            for aspect in self.aspects[side]:
                if aspect == "id":
                    # a plain gather: the store validated every id against its vocab
                    vectors.append(looked_up[("id_tables", side)])
                    present = ids != 0
                    if dropping:
                        present &= jax.random.bernoulli(jax.random.fold_in(key, k), 1 - self.id_dropout, ids.shape)
                    masks.append(present)
                elif aspect == "text":
                    summary = texts.summary[f"{side}_text"]
                    vectors.append(self.text_proj[side](texts.pooled[f"{side}_text"]))
                    masks.append(batch[f"{side}_text"] >= 0)
                elif aspect == "history":  # [B, N] text rows of earlier clicks
                    vectors.append(self._history(batch, texts))
                    masks.append((batch[HISTORY] >= 0).any(1))
                elif aspect == "dense":
                    vec, has = self._dense(side, batch)
                    vectors.append(vec)
                    masks.append(has)
                else:
                    vec, has = self._sparse(side, batch, looked_up)
                    vectors.append(vec)
                    masks.append(has)
            out[side] = Aspects(jnp.stack(vectors, 1), jnp.stack(masks, 1), summary)
        return out

    def _lookups(self, rows: dict[tuple[str, str], Array], train: bool) -> dict[tuple[str, str], Array]:
        """Every table's rows [B] or [B, L] -> their vectors [..., d]: plain gathers (XLA partitions each over a
        row-split table), or with `model.lookup=all_to_all` on a mesh that splits the tables, one routed exchange
        for all of them (`lookup.routed_lookup`). In training, at `model.lookup_capacity` and in
        `model.lookup_wire`: the ids it drops for want of capacity are sown as `lookup_dropped`, which the train
        step reports; in inference (evaluation, prediction, the served model) with room for every id and in
        float32, so nothing is dropped or rounded."""
        tables = {k: (self.id_tables if k[0] == "id_tables" else self.sparse_tables)[k[1]][...] for k in rows}
        batch = next(iter(rows.values())).shape[0]
        axes = routed_axes(batch) if self.lookup == "all_to_all" else None
        if axes is None:
            return {k: tables[k][r] for k, r in rows.items()}
        keys = list(rows)
        mesh = jax.sharding.get_abstract_mesh()
        flat = [rows[k].reshape(-1) for k in keys]
        capacity = self.lookup_capacity if train else None
        wire = self.lookup_wire if train else None  # inference reads float32: what a one-device gather reads
        vectors, dropped = routed_lookup([tables[k] for k in keys], flat, mesh, *axes, capacity, wire)
        self.sow(nnx.Intermediate, "lookup_dropped", dropped)
        return {k: v.reshape(*rows[k].shape, v.shape[-1]) for k, v in zip(keys, vectors)}

    def read_texts(self, batch: dict[str, Array], text: TextTable, train: bool) -> BatchTexts:
        """The text vectors `batch` reads (its query, item and history rows; zeros where a row is -1): those the
        input pipeline joined into it (`pipeline.join_texts`, data.text_join=host), plain gathers, or with
        `model.lookup=all_to_all` on a mesh that splits the text table over the tables' axis, one routed exchange
        (`routed_lookup`; its drops sown with the tables'), so the text table is never gathered whole (GSPMD
        all-gathers a small row-split table read by a batch split over the same axis, and all-reduces the global
        batch's vectors for a big one: 2.2 GB a device a step at 1M 384-d texts)."""
        if not self.text_proj:  # model.use_text off: no text is read
            return BatchTexts({}, {})
        columns = ["query_text", "item_text", *([HISTORY] if "history" in self.aspects["user"] else [])]
        summaries = columns[:2]
        b = batch[columns[0]].shape[0]
        if joined(columns[0], "pooled") in batch:  # data.text_join=host: the input pipeline joined them
            zeros = jnp.zeros((b, self.text_dim), jnp.float32)
            return BatchTexts(
                {c: batch[joined(c, "pooled")] for c in columns},
                {c: batch.get(joined(c, "summary"), zeros) for c in summaries},
            )
        batch = {c: text_position(batch[c], text.pooled.shape[0]) for c in columns}  # where the rows are stored
        axes = routed_axes(b) if self.lookup == "all_to_all" else None
        if axes is None or context_axes("text_rows", "model") != (axes[0],):
            read = lambda table, r: jnp.where((r >= 0)[..., None], table[jnp.maximum(r, 0)], 0.0)  # noqa: E731
            return BatchTexts(
                {c: read(text.pooled, batch[c]) for c in columns}, {c: read(text.summary, batch[c]) for c in summaries}
            )
        rows = jnp.concatenate([batch[c].reshape(b, -1) for c in columns], axis=1)  # [B, 2 + N], example-major
        has_summary = text.summary.shape == text.pooled.shape  # else [model axis, t] of zeros: nothing to read
        tables = [text.pooled, *([text.summary] if has_summary else [])]
        ids = [rows.reshape(-1), *([rows[:, : len(summaries)].reshape(-1)] if has_summary else [])]
        capacity = self.lookup_capacity if train else None
        wire = self.lookup_wire if train else None
        found, dropped = routed_lookup(tables, ids, jax.sharding.get_abstract_mesh(), *axes, capacity, wire)
        self.sow(nnx.Intermediate, "lookup_dropped", dropped)
        pooled = found[0].reshape(*rows.shape, -1)
        summary = found[1].reshape(b, len(summaries), -1) if has_summary else jnp.zeros_like(pooled)
        widths = np.cumsum([batch[c].reshape(b, -1).shape[1] for c in columns])[:-1]
        parts = dict(zip(columns, jnp.split(pooled, widths, axis=1)))
        return BatchTexts(
            {c: p.reshape(*batch[c].shape, -1) for c, p in parts.items()},
            {c: summary[:, k] for k, c in enumerate(summaries)},
        )

    def unit_texts(self, batch: dict[str, Array], texts: BatchTexts) -> dict[str, Array]:
        """The content match's side vectors (`match.unit_texts`): unit text vectors of the item, the query and
        the user's history (its mean; zero where the model reads no history)."""
        history = (texts.pooled[HISTORY], batch[HISTORY]) if "history" in self.aspects["user"] else None
        query, item = ((texts.pooled[c], batch[c]) for c in ("query_text", "item_text"))
        return unit_texts(query, item, history)

    def _history(self, batch: dict[str, Array], texts: BatchTexts) -> Array:
        """[B, d]: the projected mean of the history items' texts, or their attention-weighted sum."""
        present = batch[HISTORY] >= 0
        history = texts.pooled[HISTORY]  # [B, N, text_dim]
        if self.history_attention is None:
            weight = present.astype(jnp.float32)
            mean = jnp.einsum("bn,bnt->bt", weight, history) / jnp.maximum(weight.sum(1, keepdims=True), 1.0)
            return self.text_proj["history"](mean)
        candidate = texts.pooled["item_text"]
        return self.history_attention(self.text_proj["history"](history), present, self.text_proj["history"](candidate))

    def _dense(self, side: str, batch: dict[str, Array]) -> tuple[Array, Array]:
        """[B, d]: the mean over the side's present dense fields of x w_f + b_f; [B]: whether any is present."""
        vectors, present = [], []
        for f in self.dense_fields[side]:
            x = batch[f.column].astype(jnp.float32)
            has = ~jnp.isnan(x)
            wb = self.dense[table_key(f.column)[1]][...]
            vectors.append(jnp.where(has, x, 0.0)[:, None] * wb[0] + wb[1])
            present.append(has)
        return _present_mean(vectors, present)

    def _sparse(self, side: str, batch: dict[str, Array], looked_up) -> tuple[Array, Array]:
        """Each field's embedding (a multi-valued field's mean over its non-zero values) through the field's
        projection, then the mean over the fields the example has."""
        projected, present = [], []
        for f in self.fields[side]:
            key = table_key(f.column)
            values = batch[f.column]
            vectors = looked_up[key]
            if values.ndim == 1:
                embedded, has = vectors, values != 0
            else:
                nonzero = (values != 0).astype(jnp.float32)
                count = nonzero.sum(1, keepdims=True)
                embedded, has = jnp.einsum("bl,bld->bd", nonzero, vectors) / jnp.maximum(count, 1.0), count[:, 0] > 0
            projected.append(self.sparse_proj[key[1]](embedded))
            present.append(has)
        return _present_mean(projected, present)


def _present_mean(vectors: list[Array], present: list[Array]) -> tuple[Array, Array]:
    """Fields' vectors F x [B, d] and whether each is present F x [B] -> (their mean over the present ones [B, d],
    whether any is [B])."""
    weight = jnp.stack(present, 1).astype(jnp.float32)  # [B, F]
    pooled = jnp.einsum("bf,bfd->bd", weight, jnp.stack(vectors, 1)) / jnp.maximum(weight.sum(1, keepdims=True), 1)
    return pooled, weight.sum(1) > 0
