"""Intervals over test users: the weighted AUC a replicate needs, and the paired bootstrap that resamples users."""

import numpy as np
import pytest

from sr_jax import metrics
from sr_jax.experiments import bootstrap, report
from sr_jax.training.evaluation import SCORES


def test_weighted_auc_counts_an_example_as_often_as_its_weight():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 300)
    scores = rng.integers(0, 20, 300).astype(np.float32)  # many ties
    weights = rng.integers(0, 4, (5, 300))
    got = metrics.weighted_auc(labels, scores, np.vstack([np.ones(300), weights]))
    assert got[0] == pytest.approx(metrics.auc(labels, scores), abs=1e-12)
    for w, value in zip(weights, got[1:], strict=True):
        repeated = np.repeat(np.arange(300), w)
        assert value == pytest.approx(metrics.auc(labels[repeated], scores[repeated]), abs=1e-12)
    assert np.isnan(metrics.weighted_auc(np.ones(3), np.arange(3.0), np.ones((1, 3))))[0]


def _cell(folder, users, labels, domains, logits):
    folder.mkdir(parents=True)
    np.savez(folder / SCORES.format(split="test"), logit=logits, label=labels, domain=domains, user_id=users)
    return folder


def _world(tmp_path, copies=1, seed=0):
    """200 users with 6 impressions each (`copies` times over), 2 domains; model a sees the label through noise,
    model b is noise."""
    rng = np.random.default_rng(seed)
    users = np.repeat(np.arange(200), 6)
    labels = rng.integers(0, 2, len(users))
    domains = np.arange(len(users)) % 2
    a = labels + rng.normal(0, 1.0, len(users))
    b = rng.normal(0, 1.0, len(users))
    rep = lambda x: np.tile(x, copies)  # noqa: E731
    return (
        _cell(tmp_path / f"a{copies}", rep(users), rep(labels), rep(domains), rep(a).astype(np.float32)),
        _cell(tmp_path / f"b{copies}", rep(users), rep(labels), rep(domains), rep(b).astype(np.float32)),
    )


def _mean_domain_auc(cell):
    run = bootstrap.read_scores(cell)
    return np.mean([metrics.auc(run["label"][m], run["logit"][m]) for d in (0, 1) if (m := run["domain"] == d).any()])


def test_the_interval_covers_the_effect_and_resamples_users_not_impressions(tmp_path):
    a, b = _world(tmp_path)
    lo, hi = bootstrap.interval([a], [b], replicates=400)
    effect = _mean_domain_auc(a) - _mean_domain_auc(b)
    assert 0 < lo < effect < hi
    assert bootstrap.interval([a], [a], replicates=50) == (0.0, 0.0)
    # every impression of every user ten times: as many users, so the same interval (an impression-level
    # bootstrap would narrow it about three-fold)
    a10, b10 = _world(tmp_path, copies=10)
    assert bootstrap.interval([a10], [b10], replicates=400) == pytest.approx((lo, hi), abs=1e-9)


def test_the_interval_needs_the_same_test_rows_and_every_run_s_scores(tmp_path):
    a, b = _world(tmp_path)
    other = _cell(tmp_path / "other", np.arange(10), np.arange(10) % 2, np.zeros(10, int), np.zeros(10, np.float32))
    with pytest.raises(ValueError, match="other"):
        bootstrap.interval([a], [other])
    assert bootstrap.interval([a], [tmp_path / "no-scores"]) is None
    run = bootstrap.read_scores(b)  # the same users numbered otherwise (a fine-tune's rows against scratch's)
    renumbered = _cell(tmp_path / "renumbered", run["user_id"] * 7 + 3, run["label"], run["domain"], run["logit"])
    assert bootstrap.interval([a], [renumbered], replicates=50) == bootstrap.interval([a], [b], replicates=50)


def test_paired_runs_carry_the_interval_of_their_cells(tmp_path):
    a, b = _world(tmp_path)
    rows_a = {0: {"auc": 0.8, "cell": str(a)}, 1: {"auc": 0.82, "cell": str(a)}}
    rows_b = {0: {"auc": 0.5, "cell": str(b)}, 1: {"auc": 0.51, "cell": str(b)}}
    r = report.paired_runs(rows_a, rows_b)
    assert r["pairs"] == 2 and r["ci"][0] > 0
    assert "95% CI (users)" in report.paired_markdown([("a − b", r)])
    assert report.paired_runs({0: {"auc": 0.8}}, {0: {"auc": 0.5}})["ci"] is None
