import itertools

import numpy as np
import pytest

from sr_jax import metrics


def brute_auc(y, s):
    pos, neg = s[y == 1], s[y == 0]
    wins = [(p > n) + 0.5 * (p == n) for p, n in itertools.product(pos, neg)]
    return float(np.mean(wins))


def test_auc_matches_brute_force_with_ties():
    rng = np.random.default_rng(0)
    for _ in range(20):
        n = rng.integers(5, 80)
        y = rng.integers(0, 2, n)
        s = rng.integers(0, 6, n).astype(float)  # many ties
        if 0 < y.sum() < n:
            assert abs(metrics.auc(y, s) - brute_auc(y, s)) < 1e-12


def test_grouped_auc_and_gauc_match_brute_force():
    rng = np.random.default_rng(1)
    n = 600
    y, s, g = rng.integers(0, 2, n), rng.normal(size=n).round(1), rng.integers(0, 12, n)
    ids, aucs, counts = metrics.grouped_auc(y, s, g)
    weighted, total = 0.0, 0
    for gid, a, c in zip(ids, aucs, counts):
        m = g == gid
        assert c == m.sum()
        if 0 < y[m].sum() < m.sum():
            assert abs(a - brute_auc(y[m], s[m])) < 1e-12
            weighted, total = weighted + a * c, total + c
        else:
            assert np.isnan(a)
    assert abs(metrics.gauc(y, s, g) - weighted / total) < 1e-12


def test_auc_edge_cases_and_log_loss():
    assert metrics.auc(np.array([0, 1]), np.array([0.1, 0.9])) == 1.0
    assert metrics.auc(np.array([1, 0]), np.array([0.1, 0.9])) == 0.0
    assert np.isnan(metrics.auc(np.array([1, 1]), np.array([0.1, 0.9])))
    y, p = np.array([1, 0, 1]), np.array([0.8, 0.3, 0.6])
    logits = np.log(p / (1 - p))
    assert abs(metrics.log_loss_from_logits(y, logits) - (-np.log([0.8, 0.7, 0.6]).mean())) < 1e-12
    assert metrics.log_loss_from_logits(np.array([0]), np.array([800.0])) == 800.0  # no probability rounds to 1


def test_auc_ranks_logits_that_float32_probabilities_would_tie():
    """Logits 20 and 25 of different labels: both sigmoid to 1.0 in float32 (a tie, AUC 0.5); ranked as
    logits the positive is above the negative (AUC 1)."""
    labels, logits = np.array([0, 1]), np.array([20.0, 25.0], np.float32)
    probs = 1 / (1 + np.exp(-logits.astype(np.float32)))
    assert probs[0] == probs[1] == np.float32(1.0) and metrics.auc(labels, probs) == 0.5
    assert metrics.auc(labels, logits) == 1.0
    expected = (20.0 + np.log1p(np.exp(-20.0)) + np.log1p(np.exp(-25.0))) / 2  # -log(1 - p(20)), -log p(25)
    assert metrics.log_loss_from_logits(labels, logits) == pytest.approx(expected)


def test_log_loss_from_logits_equals_the_probabilities_where_they_are_exact():
    rng = np.random.default_rng(0)
    z, y = rng.normal(0, 3, 1000), rng.random(1000) < 0.4
    p = 1 / (1 + np.exp(-z))
    expected = -np.mean(y * np.log(p) + (1 - y) * np.log(1 - p))
    assert metrics.log_loss_from_logits(y, z) == pytest.approx(expected, rel=1e-9)


def test_a_metric_over_non_finite_scores_is_an_error():
    with pytest.raises(ValueError, match=r"validation: 1 score\(s\) are NaN or inf \(first: row 2"):
        metrics.check_finite(np.array([0.1, 0.2, np.nan]), "validation")


def test_ranking_metrics_over_candidate_lists():
    """List 0: the positive ranks 3rd of 5 (NDCG 1/log2(4), HR@10 1, MRR 1/3); list 1: the positive ties the top
    negative and ranks below it (ties count against positives: MRR 1/2); list 2 holds one class and is left out."""
    labels = np.array([0, 0, 1, 0, 0, 1, 0, 1, 1])
    scores = np.array([5.0, 4.0, 3.0, 2.0, 1.0, 7.0, 7.0, 0.3, 0.2])
    lists = np.array([0, 0, 0, 0, 0, 1, 1, 2, 2])
    out = metrics.ranking(labels, scores, lists, k=10)
    assert out["lists"] == 2
    assert out["ndcg@10"] == pytest.approx((1 / np.log2(4) + 1 / np.log2(3)) / 2)
    assert out["hr@10"] == 1.0 and out["mrr"] == pytest.approx((1 / 3 + 1 / 2) / 2)
    assert metrics.ranking(labels, scores, lists, k=2)["hr@2"] == 0.5  # list 0's positive is 3rd
    assert metrics.ranking(labels[7:], scores[7:], lists[7:])["lists"] == 0


def test_calibration_pcoc_and_ece():
    y = np.array([1, 0, 0, 0, 1, 1, 1, 0, 0, 1])
    calibrated = np.array([0.25] * 4 + [0.75] * 4 + [0.5] * 2)  # each bin's mean prediction is its CTR
    out = metrics.calibration(y, calibrated)
    assert out["ece"] == pytest.approx(0.0) and out["pcoc"] == pytest.approx(calibrated.mean() / y.mean())
    assert metrics.calibration(y, np.full(10, 0.9))["ece"] == pytest.approx(abs(0.9 - y.mean()))
