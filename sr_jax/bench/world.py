"""A benchmark world of any size: a schema with F id fields of V rows each, K domains, random batches.

The 15 "id fields" of the reference benchmark are the user, query and item ids plus 12 single-valued
sparse fields (6 user, 6 item), each with V rows and `dim` wide, so every field is an embedding table
looked up once per example. Labels, domains and text rows are random: throughput does not depend on them.
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


def random_columns(meta: DatasetMeta, size: int, seed: int = 0) -> dict[str, np.ndarray]:
    """`size` random examples in the store's column layout (ids uniform over 1..V-1: no missing ids)."""
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
            cols[name] = rng.integers(1, meta.vocab[name], shape, dtype=np.int32)
        else:
            field = next(f for f in meta.sparse_fields if f.column == name)
            cols[name] = rng.integers(1, field.vocab, shape, dtype=np.int32)
    return cols
