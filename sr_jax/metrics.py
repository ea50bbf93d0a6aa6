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


def weighted_auc(labels: np.ndarray, scores: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """[R] ROC AUC of each row of `weights` [R, n] (an example counted that many times: a bootstrap replicate);
    ties count half, as in `auc`; nan where a replicate has one class."""
    order = np.argsort(scores, kind="stable")
    s, y = np.asarray(scores)[order], np.asarray(labels)[order].astype(bool)
    w = np.asarray(weights, np.float64)[:, order]
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]]) if len(s) else np.zeros(0, np.int64)
    pos = np.add.reduceat(np.where(y, w, 0.0), starts, axis=1)
    neg = np.add.reduceat(np.where(y, 0.0, w), starts, axis=1)
    below = np.cumsum(neg, axis=1) - neg
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.sum(pos * (below + 0.5 * neg), axis=1) / (pos.sum(1) * neg.sum(1))


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


def probabilities(logits: np.ndarray) -> np.ndarray:
    """sigmoid(logits) in float64, without overflow."""
    return np.exp(-np.logaddexp(0.0, -np.asarray(logits, np.float64)))


def probability_metrics(labels: np.ndarray, logits: np.ndarray) -> dict[str, float]:
    """What says whether sigmoid(logits) can be used as click probabilities: log loss, PCOC and ECE."""
    return {"log_loss": log_loss_from_logits(labels, logits), **calibration(labels, probabilities(logits))}


def ranking(labels: np.ndarray, scores: np.ndarray, lists: np.ndarray, k: int = 10) -> dict[str, float]:
    """NDCG@k, HR@k and MRR over candidate lists (`lists`: the list id of each example, e.g. a user's
    impressions for one query in one domain; binary relevance), averaged over the lists that hold at least one
    positive and one negative, whose count is `lists`. Ties are broken against the positives (a negative of
    the same score ranks first), so equal scores never look like a good ranking."""
    labels = np.asarray(labels).astype(bool)
    scores = np.asarray(scores, np.float64)
    ids, inverse = np.unique(np.asarray(lists), return_inverse=True)
    order = np.lexsort((labels, -scores, inverse))  # by list, score descending, negatives first on ties
    g, y = inverse[order], labels[order]
    start = np.flatnonzero(np.r_[True, g[1:] != g[:-1]])
    rank = np.arange(len(g)) - np.repeat(start, np.diff(np.r_[start, len(g)])) + 1  # 1-based rank in its list
    positives = np.bincount(g, weights=y, minlength=len(ids))
    sizes = np.bincount(g, minlength=len(ids))
    usable = (positives > 0) & (positives < sizes)
    if not usable.any():
        return {f"ndcg@{k}": float("nan"), f"hr@{k}": float("nan"), "mrr": float("nan"), "lists": 0}
    gain = np.where(y & (rank <= k), 1.0 / np.log2(rank + 1), 0.0)
    dcg = np.bincount(g, weights=gain, minlength=len(ids))
    ideal_hits = np.minimum(positives, k).astype(int)
    ideal = np.cumsum(1.0 / np.log2(np.arange(2, k + 2)))[np.maximum(ideal_hits - 1, 0)]
    hits = np.bincount(g, weights=y & (rank <= k), minlength=len(ids))
    first = np.full(len(ids), np.inf)
    np.minimum.at(first, g[y], rank[y])
    return {
        f"ndcg@{k}": float(np.mean(dcg[usable] / ideal[usable])),
        f"hr@{k}": float(np.mean(hits[usable] > 0)),
        "mrr": float(np.mean(1.0 / first[usable])),
        "lists": int(usable.sum()),
    }


def calibration(labels: np.ndarray, probs: np.ndarray, bins: int = 10) -> dict[str, float]:
    """PCOC (the mean predicted click probability over the observed CTR: 1 is calibrated) and ECE (the
    examples-weighted mean |mean prediction - CTR| over `bins` equal-width probability bins)."""
    y = np.asarray(labels, np.float64)
    p = np.asarray(probs, np.float64)
    bin_of = np.minimum((p * bins).astype(int), bins - 1)
    count = np.bincount(bin_of, minlength=bins)
    gap = np.abs(np.bincount(bin_of, weights=p, minlength=bins) - np.bincount(bin_of, weights=y, minlength=bins))
    return {
        "pcoc": float(p.mean() / y.mean()) if y.mean() > 0 else float("nan"),
        "ece": float(gap.sum() / max(count.sum(), 1)),
    }
