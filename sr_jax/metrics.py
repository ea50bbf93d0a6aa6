"""Ranking and calibration metrics, exact and vectorised (numpy): AUC, GAUC, log loss.

AUC is the Mann-Whitney statistic with tied scores given their average rank, i.e. the probability
that a random positive outscores a random negative, ties counting one half. Rank logits, not probabilities:
float32's sigmoid rounds every logit above ~16.6 to 1.0 and is coarse above ~9, which makes ties that the
model never made. Scores that are not finite are an error (`check_finite`), never a number near 0.5.
"""

from __future__ import annotations

import numpy as np


def _tied_ranks(scores: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """1-based ranks of `scores` within each group, ties averaged. Returns ranks in input order."""
    order = np.lexsort((scores, groups))
    s, g = scores[order], groups[order]
    n = len(s)
    new_run = np.ones(n, bool)
    new_run[1:] = (s[1:] != s[:-1]) | (g[1:] != g[:-1])
    run_id = np.cumsum(new_run) - 1
    run_start = np.flatnonzero(new_run)
    run_end = np.append(run_start[1:], n)  # exclusive
    new_group = np.ones(n, bool)
    new_group[1:] = g[1:] != g[:-1]
    group_start = np.maximum.accumulate(np.where(new_group, np.arange(n), 0))
    # positions are 0-based within the sorted array: the average rank of a run [a, b) is (a + b + 1) / 2.
    avg = (run_start + run_end + 1) / 2.0
    ranks = np.empty(n)
    ranks[order] = avg[run_id] - group_start
    return ranks


def grouped_auc(
    labels: np.ndarray, scores: np.ndarray, groups: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """AUC per group. Returns (group ids, auc [nan where one class is absent], examples per group)."""
    labels = np.asarray(labels).astype(bool)
    scores = np.asarray(scores, np.float64)
    ids, inverse, counts = np.unique(np.asarray(groups), return_inverse=True, return_counts=True)
    ranks = _tied_ranks(scores, inverse)
    n_pos = np.bincount(inverse, weights=labels, minlength=len(ids))
    n_neg = counts - n_pos
    rank_sum = np.bincount(inverse, weights=np.where(labels, ranks, 0.0), minlength=len(ids))
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = (rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)
    return ids, np.where((n_pos > 0) & (n_neg > 0), auc, np.nan), counts


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Exact ROC AUC; nan when only one class is present."""
    return float(grouped_auc(labels, scores, np.zeros(len(labels), np.int64))[1][0])


def gauc(labels: np.ndarray, scores: np.ndarray, users: np.ndarray) -> float:
    """Group AUC: per-user AUC averaged with impression weights, over users with both classes."""
    _, aucs, counts = grouped_auc(labels, scores, users)
    ok = ~np.isnan(aucs)
    return float(np.sum(aucs[ok] * counts[ok]) / np.sum(counts[ok])) if ok.any() else float("nan")


def check_finite(scores: np.ndarray, what: str) -> None:
    """A ValueError naming `what` and the first row whose score is NaN or inf."""
    bad = ~np.isfinite(np.asarray(scores, np.float64))
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise ValueError(f"{what}: {int(bad.sum())} score(s) are NaN or inf (first: row {row}, {scores[row]})")


def log_loss_from_logits(labels: np.ndarray, logits: np.ndarray) -> float:
    """Binary cross-entropy of the click probabilities sigmoid(logits), computed from the logits (exact where a
    probability would round to 0 or 1)."""
    z = np.asarray(logits, np.float64)
    y = np.asarray(labels, np.float64)
    return float(np.mean(np.logaddexp(0.0, z) - y * z))


def log_loss(labels: np.ndarray, probs: np.ndarray, eps: float = 1e-7) -> float:
    p = np.clip(np.asarray(probs, np.float64), eps, 1 - eps)
    y = np.asarray(labels, np.float64)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))
