"""Confidence intervals over test impressions: the paired bootstrap that resamples users.

A paired test over seeds says how much an effect varies with training; it says nothing of how much it would
vary on another test sample. This does: each replicate draws the test split's users with replacement (a user's
impressions stay together, as they are not independent), re-weights every run's test scores by it, and takes
the effect, the mean per-domain AUC of runs `a` minus that of runs `b` (each averaged over its runs), on the
same draw. The interval is the replicates' percentile interval. The runs' scores come from the
`scores_SPLIT.npz` that evaluation writes beside eval.json; every run must have scored the same rows.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from sr_jax import metrics
from sr_jax.training.evaluation import SCORES

CHUNK = 25  # replicates computed at once ([CHUNK, test rows] weights)


def read_scores(cell: str | Path, split: str = "test") -> dict[str, np.ndarray] | None:
    """A run's test scores (logit, label, domain, user_id), or None when it wrote none."""
    path = Path(cell) / SCORES.format(split=split)
    if not path.exists():
        return None
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


def _same_rows(runs: list[dict[str, np.ndarray]], names: list[str]) -> None:
    """Every run scored the same rows: the same labels and domains, and the same users (by which rows share a
    user: a fine-tune numbers users in its pretrained run's rows, a scratch run in its dataset's)."""
    first = {**runs[0], "user_id": _first_seen(runs[0]["user_id"])}
    for run, name in zip(runs[1:], names[1:], strict=True):
        for key in ("label", "domain", "user_id"):
            value = _first_seen(run[key]) if key == "user_id" else run[key]
            if value.shape != first[key].shape or not np.array_equal(value, first[key]):
                raise ValueError(f"{name}: its test rows ({key}) differ from {names[0]}'s: not one test sample")


def _first_seen(ids: np.ndarray) -> np.ndarray:
    """ids relabelled 0, 1, ... in order of first appearance: equal for two numberings of one grouping."""
    _, first, inverse = np.unique(ids, return_index=True, return_inverse=True)
    rank = np.empty(len(first), np.int64)
    rank[np.argsort(first)] = np.arange(len(first))
    return rank[inverse.reshape(-1)]


def mean_domain_auc(run: dict[str, np.ndarray], weights: np.ndarray) -> np.ndarray:
    """[R]: the run's mean per-domain AUC under each row of `weights` [R, rows]."""
    per_domain = [
        metrics.weighted_auc(run["label"][mask], run["logit"][mask], weights[:, mask])
        for d in np.unique(run["domain"])
        if len(np.unique(run["label"][mask := run["domain"] == d])) == 2
    ]
    return np.nanmean(np.stack(per_domain), axis=0)


def interval(
    a: list[str | Path], b: list[str | Path], replicates: int = 1000, level: float = 0.95, seed: int = 0
) -> tuple[float, float] | None:
    """The `level` percentile interval of mean-per-domain-AUC(a) − mean-per-domain-AUC(b) over `replicates`
    user resamplings of the test split; None when a run has no scores."""
    runs = [read_scores(c) for c in [*a, *b]]
    if any(r is None for r in runs) or not a or not b:
        return None
    _same_rows(runs, [str(c) for c in [*a, *b]])
    users = np.unique(runs[0]["user_id"], return_inverse=True)[1].reshape(-1)
    count = int(users.max()) + 1
    rng = np.random.default_rng(seed)
    effects = []
    for start in range(0, replicates, CHUNK):
        draws = rng.multinomial(count, np.full(count, 1.0 / count), size=min(CHUNK, replicates - start))
        weights = draws[:, users].astype(np.float64)  # each impression counts as often as its user was drawn
        side = [
            np.mean([mean_domain_auc(r, weights) for r in group], axis=0) for group in (runs[: len(a)], runs[len(a) :])
        ]
        effects.append(side[0] - side[1])
    effects = np.concatenate(effects)
    tail = (1 - level) / 2 * 100
    lo, hi = np.nanpercentile(effects, [tail, 100 - tail])
    return float(lo), float(hi)
