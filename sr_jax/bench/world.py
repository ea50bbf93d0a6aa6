"""A benchmark world of any size: a schema with F id fields of V rows each, K domains, random batches.

The 15 "id fields" of the reference benchmark are the user, query and item ids plus 12 single-valued
sparse fields (6 user, 6 item), each with V rows and `dim` wide, so every field is an embedding table
looked up once per example. Labels, domains and text rows are random: throughput does not depend on them.
Ids are drawn uniformly, or skewed as real traffic is (`ID_MODES`): Zipf over a popularity-ordered vocabulary, or
all among a table's last 10% of rows (a fine-tune's batch of appended keys).
"""

from __future__ import annotations

import numpy as np

from sr_jax.data.schema import Domain, DatasetMeta, SparseField


def bench_meta(fields: int = 15, vocab: int = 100_000, domains: int = 7, num_texts: int = 10_000) -> DatasetMeta:
    if fields < 3:
        raise ValueError(f"--fields={fields}: at least the user, query and item ids (3)")
    extra = fields - 3
    sparse = [SparseField(f"u{i}", "user", vocab) for i in range(extra // 2)]
    sparse += [SparseField(f"i{i}", "item", vocab) for i in range(extra - extra // 2)]
    return DatasetMeta(
        name=f"bench-{fields}x{vocab}",
        domains=[Domain(f"d{k}", "search" if k % 2 == 0 else "rec") for k in range(domains)],
        vocab={"user_id": vocab, "query_id": vocab, "item_id": vocab},
        sparse_fields=sparse,
        splits={},
        num_texts=num_texts,
    )


ID_MODES = ("uniform", "zipf", "new-rows-last")
ZIPF_EXPONENT = 1.2


def draw_ids(rng: np.random.Generator, vocab: int, shape: tuple[int, ...], mode: str = "uniform") -> np.ndarray:
    """Ids in 1..vocab-1 (none missing): uniform; Zipf (exponent 1.2, id 1 the most frequent, the tail clipped to
    the last id); or uniform over the last 10% of ids."""
    if mode == "zipf":
        return np.minimum(rng.zipf(ZIPF_EXPONENT, shape), vocab - 1).astype(np.int32)
    if mode == "new-rows-last":
        return rng.integers(max(1, vocab - vocab // 10), vocab, shape, dtype=np.int32)
    if mode != "uniform":
        raise ValueError(f"ids {mode!r}: not one of {ID_MODES}")
    return rng.integers(1, vocab, shape, dtype=np.int32)


def random_columns(meta: DatasetMeta, size: int, seed: int = 0, ids: str = "uniform") -> dict[str, np.ndarray]:
    """`size` random examples in the store's column layout (every id and field value drawn by `draw_ids`)."""
    rng = np.random.default_rng(seed)
    cols: dict[str, np.ndarray] = {}
    for name, (dtype, row_shape) in meta.columns().items():
        shape = (size, *row_shape)
        if name == "domain":
            cols[name] = rng.integers(0, meta.num_domains, shape, dtype=np.int32)
        elif name == "label":
            cols[name] = rng.integers(0, 2, shape).astype(dtype)
        elif name.endswith("_text"):
            cols[name] = rng.integers(0, meta.num_texts, shape, dtype=np.int32)
        elif name.endswith("_id"):
            cols[name] = draw_ids(rng, meta.vocab[name], shape, ids)
        else:
            field = next(f for f in meta.sparse_fields if f.column == name)
            cols[name] = draw_ids(rng, field.vocab, shape, ids)
    return cols
