"""What a finished run hands to the runs started from it (`sr_jax.training.records` has the formats): the
rows its tables trained (with its pretrained run's), the map from an item's text to its id row, and each
trained domain's sample of z (`alignment`)."""

from __future__ import annotations

import jax
import numpy as np

from sr_jax import distributed
from sr_jax.data.store import column_chunks
from sr_jax.model.rows import layout, row_order
from sr_jax.text import text_identity
from sr_jax.training import alignment, records
from sr_jax.training.spec import RunSpec


def trained_so_far(spec: RunSpec, steps: int) -> dict[str, np.ndarray]:
    """table -> [rows] bool: the rows trained before this run (its pretrained run's) or by its first `steps`
    steps (those of its result: its best validated step, or its last)."""
    return {table: spec.trained_rows[table] | rows for table, rows in spec.rows_read(steps).items()}


def write_handover(spec: RunSpec, params, trained: dict[str, np.ndarray]) -> None:
    """Writes the trained rows (`trained_so_far` at the result's step), the text map (process 0) and the
    alignment reference (every process computes it: multi-host) of `params`, the run's result."""
    cfg = spec.config
    if distributed.is_primary():
        records.write_trained_rows(spec.workdir, trained)
        if cfg.model.use_text:
            _write_text_map(spec, params)
    alignment.write_reference(
        spec.workdir,
        lambda batch: spec.program.adapted(params, batch, spec.text),
        spec.train_columns,
        spec.dataset.meta.num_domains,
        cfg.train.seed,
        cfg.data.eval_batch_size,
        spec.global_eval_batch,
        write=distributed.is_primary(),
    )


def _write_text_map(spec: RunSpec, params) -> None:
    """Fits and saves the map from an item's text features to its id row, on the items this run trained that
    have a text (read from its training columns, already in memory; hashed id tables have no row of their own
    per item: no map)."""
    if spec.config.model.id_buckets:
        return
    table = row_order(np.asarray(jax.device_get(params["l0"]["id_tables"]["item"])), *layout(spec.config.model))
    seen, text_of = np.zeros(len(table), bool), np.full(len(table), -1, np.int64)  # each item's first text row
    columns = spec.train_columns
    for (_, ids), (_, rows) in zip(column_chunks(columns["item_id"]), column_chunks(columns["item_text"])):
        items, first = np.unique(ids, return_index=True)
        new = ~seen[items]
        seen[items[new]], text_of[items[new]] = True, rows[first[new]]
    items = np.flatnonzero(seen)
    texts = text_of[items]
    keep = (items > 0) & (texts >= 0)
    if keep.sum() < 2:
        return
    pooled = spec.dataset.text_cache(text_identity(spec.config.data.text_encoder)[0])[0]  # memory-mapped
    kernel, bias = records.fit_text_map(pooled[texts[keep]], table[items[keep]], spec.config.train.seed)
    records.write_text_map(spec.workdir, kernel, bias)
