"""L0, the feature layer: id embeddings, sparse-field embeddings and the projection of frozen text features.

Its output is, for each side (user, query, item), a stack of aspect vectors [B, A, d] and a mask
[B, A] saying which aspects the example has (id 0, text row -1 and all-zero sparse fields are missing).
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
from flax import nnx

from sr_jax.config import ModelConfig
from sr_jax.data.schema import SPARSE_SIDES, DatasetMeta
from sr_jax.model.layers import Array, hash_ids, normal

SIDES = ("user", "query", "item")


class TextTable(NamedTuple):
    """The frozen encoder's cached output for the dataset's text table, on device."""

    pooled: Array  # [num_texts, text_dim]
    first: Array  # [num_texts, text_dim]


class Aspects(NamedTuple):
    vectors: Array  # [B, A, d]
    mask: Array  # [B, A] bool
    first_token: Array  # [B, text_dim]: the side's first-token text vector (zeros without text)


def side_aspects(cfg: ModelConfig, meta: DatasetMeta) -> dict[str, tuple[str, ...]]:
    """The aspects each side fuses, in order."""
    has_sparse = {s: any(f.side == s for f in meta.sparse_fields) for s in SIDES}
    text = ("text",) if cfg.use_text else ()
    return {
        "user": ("id",) + (("sparse",) if has_sparse["user"] else ()),
        "query": ("id",) + text,
        "item": ("id",) + text + (("sparse",) if has_sparse["item"] else ()),
    }


def padded_rows(rows: int, multiple: int) -> int:
    """A table's row count rounded up to `model.table_row_multiple`, so that any model axis dividing that
    multiple shards it evenly (ids never reach the padding rows)."""
    return -(-rows // multiple) * multiple


class FeatureEncoder(nnx.Module):
    def __init__(self, cfg: ModelConfig, meta: DatasetMeta, text_dim: int, *, rngs: nnx.Rngs):
        self.vocab = {s: meta.vocab[f"{s}_id"] for s in SIDES}
        self.buckets = {s: min(v, cfg.id_buckets) if cfg.id_buckets else v for s, v in self.vocab.items()}
        self.aspects = side_aspects(cfg, meta)

        def table(rows: int) -> nnx.Param:
            return normal(rngs, (padded_rows(rows, cfg.table_row_multiple), cfg.dim), 0.05)

        self.id_tables = nnx.Dict({s: table(self.buckets[s]) for s in SIDES})
        self.fields = {s: [f for f in meta.sparse_fields if f.side == s] for s in SPARSE_SIDES}
        self.sparse_tables = nnx.Dict({f"{f.side}_{f.name}": table(f.vocab) for f in meta.sparse_fields})
        self.sparse_proj = nnx.Dict(
            {s: nnx.Linear(len(fs) * cfg.dim, cfg.dim, rngs=rngs) for s, fs in self.fields.items() if fs}
        )
        self.text_proj = nnx.Dict(
            {s: nnx.Linear(text_dim, cfg.dim, rngs=rngs) for s in ("query", "item")} if cfg.use_text else {}
        )
        self.text_dim = text_dim

    def table_rows(self, batch: dict[str, Array]) -> dict[tuple[str, str], Array]:
        """The rows every embedding lookup of `batch` reads, per table (key: the table's path under l0, e.g.
        ("id_tables", "user")); a multi-valued field's rows keep its [B, L] shape."""
        rows = {("id_tables", s): hash_ids(batch[f"{s}_id"], self.vocab[s], self.buckets[s]) for s in SIDES}
        for side, fields in self.fields.items():
            rows.update({("sparse_tables", f"{side}_{f.name}"): batch[f"{side}.{f.name}"] for f in fields})
        return rows

    def __call__(
        self, batch: dict[str, Array], text: TextTable, table_rows: dict[tuple[str, str], Array] | None = None
    ) -> dict[str, Aspects]:
        """`table_rows` replaces `self.table_rows(batch)`: the row-sparse update passes the gathered tables'
        rows."""
        rows = self.table_rows(batch) if table_rows is None else table_rows
        out = {}
        for side in SIDES:
            vectors, masks = [], []
            ids = batch[f"{side}_id"]
            first = jnp.zeros((ids.shape[0], self.text_dim), jnp.float32)
            for aspect in self.aspects[side]:
                if aspect == "id":
                    # a plain gather: the store validated every id against its vocab
                    vectors.append(self.id_tables[side][...][rows[("id_tables", side)]])
                    masks.append(ids != 0)
                elif aspect == "text":
                    row = batch[f"{side}_text"]
                    has = row >= 0
                    pooled = jnp.where(has[:, None], text.pooled[jnp.maximum(row, 0)], 0.0)
                    first = jnp.where(has[:, None], text.first[jnp.maximum(row, 0)], 0.0)
                    vectors.append(self.text_proj[side](pooled))
                    masks.append(has)
                else:
                    vec, has = self._sparse(side, batch, rows)
                    vectors.append(vec)
                    masks.append(has)
            out[side] = Aspects(jnp.stack(vectors, 1), jnp.stack(masks, 1), first)
        return out

    def _sparse(self, side: str, batch: dict[str, Array], rows) -> tuple[Array, Array]:
        """Field embeddings (multi-valued fields mean-pooled over non-zero values), concatenated, projected."""
        embedded, present = [], []
        for f in self.fields[side]:
            values = batch[f"{side}.{f.name}"]
            looked_up = self.sparse_tables[f"{side}_{f.name}"][...][rows[("sparse_tables", f"{side}_{f.name}")]]
            if values.ndim == 1:
                embedded.append(looked_up)
                present.append(values != 0)
            else:
                nonzero = (values != 0).astype(jnp.float32)
                count = nonzero.sum(1, keepdims=True)
                embedded.append(jnp.einsum("bl,bld->bd", nonzero, looked_up) / jnp.maximum(count, 1.0))
                present.append(count[:, 0] > 0)
        has = jnp.any(jnp.stack(present, 1), axis=1)
        return self.sparse_proj[side](jnp.concatenate(embedded, 1)), has
