import itertools

import numpy as np

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
    assert abs(metrics.log_loss(y, p) - (-np.log([0.8, 0.7, 0.6]).mean())) < 1e-12
