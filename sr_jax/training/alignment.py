"""The alignment reference a run leaves for the runs fine-tuned from it (`reference.npz`).

A fine-tune batch usually holds one domain, so the regularizer has no pair of domains of its own to
align. At the end of training every run therefore samples, per trained domain, up to REFERENCE_ROWS
training examples (seeded) and saves their z (the Domain Adaptive Layer's normalised output, which
L_reg aligns). A fine-tune run turns them into an `AlignmentReference` (each domain's mean softmax
for JS, the rows themselves for MMD, at the fine-tune's own temperature and bandwidth) and aligns its
domains against them (`finetune.align_reference`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from sr_jax.config import ModelConfig
from sr_jax.data.pipeline import map_batches
from sr_jax.model.domain_adaptation import REFERENCE_ROWS, AlignmentReference, make_reference
from sr_jax.training.checkpoint import CheckpointError, read_record, write_record

REFERENCE = "reference.npz"


def sample_rows(domain: np.ndarray, num_domains: int, seed: int, per_domain: int = REFERENCE_ROWS) -> np.ndarray:
    """Row indices: up to `per_domain` of each domain's rows, drawn with `seed`, grouped by domain."""
    rng = np.random.default_rng([seed, 0xA11])
    picks = []
    for k in range(num_domains):
        rows = np.flatnonzero(domain == k)
        picks.append(np.sort(rng.permutation(rows)[:per_domain]))
    return np.concatenate(picks)


def write_reference(
    workdir: Path,
    adapted: Callable,
    columns: dict[str, np.ndarray],
    num_domains: int,
    seed: int,
    batch_size: int,
    put: Callable,
    write: bool = True,
) -> None:
    """Samples each domain's training rows and saves their z: `adapted(batch)` -> [B, D]. Every process
    computes (multi-host); the one with `write` saves."""
    domain = np.asarray(columns["domain"])
    rows = sample_rows(domain, num_domains, seed)
    picked = {name: np.asarray(col[rows]) for name, col in columns.items()}
    z = map_batches(lambda batch: adapted(put(batch)), picked, batch_size)
    count = np.bincount(domain[rows], minlength=num_domains)
    out = np.zeros((num_domains, REFERENCE_ROWS, z.shape[1]), np.float32)
    for k, start in enumerate(np.concatenate([[0], np.cumsum(count)[:-1]])):
        out[k, : count[k]] = z[start : start + count[k]]
    if not write:
        return
    write_record(workdir / REFERENCE, rows=out, count=count)


def read_reference(folder: Path, cfg: ModelConfig) -> AlignmentReference:
    path = Path(folder) / REFERENCE
    saved = read_record(
        path, "the pretrained run left no alignment reference (set finetune.align_reference=false or re-run it)"
    )
    rows, count = saved["rows"], saved["count"]
    if rows.shape[2] != 3 * cfg.dim:
        raise CheckpointError(f"{path}: rows of width {rows.shape[2]}, but this model's z has {3 * cfg.dim}")
    return make_reference(rows, count, cfg.reg_temperature, cfg.mmd_bandwidth)
