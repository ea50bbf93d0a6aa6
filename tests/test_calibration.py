"""Calibration (sr_jax/calibration.py): the fits, the pooled fallback, the click-rate target, and the run's
calibration carried into eval.json, re-fitting (train.calibrate) and batch scoring."""

import json

import jax.numpy as jnp
import numpy as np
import pyarrow.parquet as pq
import pytest

from helpers import config
from sr_jax import calibration, metrics
from sr_jax.config import ConfigError, validate
from sr_jax.export import trained
from sr_jax.training import trainer
from train import calibrate, predict


def _world(n=40_000, seed=0):
    """Logits of three domains whose true click probability is sigmoid(a z + b), each with its own a, b."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=n) * 2
    domain = rng.integers(0, 3, n)
    a, b = np.array([0.5, 1.5, 1.0])[domain], np.array([-1.0, 0.5, 0.0])[domain]
    labels = (rng.random(n) < 1 / (1 + np.exp(-(a * z + b)))).astype(np.int8)
    return z, labels, domain


def _apply(fitted, z, domain, names=("a", "b", "c")):
    table = {k: jnp.asarray(v) for k, v in calibration.arrays(fitted, list(names)).items()}
    return np.asarray(calibration.apply(table, jnp.asarray(z, jnp.float32), jnp.asarray(domain)), np.float64)


def test_platt_finds_each_domains_temperature_and_bias():
    z, labels, domain = _world()
    fitted = calibration.fit(z, labels, domain, ["a", "b", "c"])
    for name, (a, b) in zip("abc", [(0.5, -1.0), (1.5, 0.5), (1.0, 0.0)]):
        m = fitted["domains"][name]
        assert m["source"] == "own" and abs(m["slope"][0] - a) < 0.06 and abs(m["y"][0] - b) < 0.06, m
    calibrated = _apply(fitted, z, domain)
    raw_loss, loss = metrics.log_loss_from_logits(labels, z), metrics.log_loss_from_logits(labels, calibrated)
    assert loss < raw_loss - 0.02
    # monotone per domain: every domain's AUC is unchanged
    for k in range(3):
        mask = domain == k
        assert metrics.auc(labels[mask], calibrated[mask]) == metrics.auc(labels[mask], z[mask])


def test_platt_stays_finite_where_the_logits_are_huge_or_the_labels_separable():
    rng = np.random.default_rng(1)
    t = rng.normal(size=5000)
    labels = (rng.random(5000) < 1 / (1 + np.exp(-t))).astype(np.int8)
    plain = calibration._platt(t, labels.astype(float))  # the fit itself (`fit` would keep this one as it is)
    m = calibration.fit(t * 40 + 5, labels, np.zeros(5000, int), ["a"])["domains"]["a"]  # 40x overconfident
    a, b = plain["slope"][0], plain["y"][0]  # the same fit, seen through z = 40 t + 5
    assert m["slope"][0] == pytest.approx(a / 40, rel=0.01) and m["y"][0] == pytest.approx(b - 5 * a / 40, abs=0.01)
    separable = calibration.fit(np.where(labels > 0, 50.0, -50.0), labels, np.zeros(5000, int), ["a"])
    assert np.isfinite(separable["domains"]["a"]["slope"]).all() and np.isfinite(separable["domains"]["a"]["y"]).all()


def test_a_fit_on_few_clicks_moves_the_base_rate_rather_than_staying_near_the_model_s():
    """A model trained at 1:4 scores a 1:99 list's validation rows, 6 of 600 of them clicks (a 1% fine-tune's
    validation data): Platt's bias is all but free (its faint pull centred on the shift that matches their click
    rate), so the fit's mean prediction there is the rate. With the bias pulled toward 0 as hard as the slope
    toward 1 (the fit before), it predicted 1.8 times it."""
    rng = np.random.default_rng(3)
    true = rng.normal(size=600) - 4.6  # about 1% clicks
    labels = np.zeros(600, np.int8)
    labels[np.argsort(true)[-6:]] = 1  # the 6 highest-scored rows click: a model that ranks well
    z = true + 4.0  # its scale from 1:4 data: about 60 times too many clicks predicted
    fitted = calibration.fit(z, labels, np.zeros(600, int), ["a"], min_clicks=5)
    assert fitted["domains"]["a"]["source"] == "own" and "kept_identity" not in fitted["domains"]["a"]
    calibrated = metrics.probabilities(_apply(fitted, z, np.zeros(600, int), names=("a",)))
    assert calibrated.mean() == pytest.approx(labels.mean(), rel=0.02)
    shift = calibration._rate_shift(z, labels.mean())
    assert metrics.probabilities(z + shift).sum() == pytest.approx(6, rel=1e-9)


def test_isotonic_is_non_decreasing_and_matches_the_click_rate_of_its_blocks():
    z, labels, domain = _world()
    fitted = calibration.fit(z, labels, domain, ["a", "b", "c"], method="isotonic")
    for name in "ab":  # c is calibrated already (below)
        m = fitted["domains"][name]
        assert np.all(np.diff(m["x"]) >= 0) and np.all(np.diff(m["y"]) >= 0) and m["slope"] == [0.0, 0.0]
        assert 2 <= len(m["x"]) <= calibration.BINS
    calibrated = 1 / (1 + np.exp(-_apply(fitted, z, domain)))
    for k in range(3):
        mask = domain == k
        assert abs(calibrated[mask].mean() / labels[mask].mean() - 1) < 0.02  # PCOC ~ 1 in sample


def test_a_domain_already_calibrated_keeps_its_probabilities():
    """Its fit would only add noise (BIC): the identity, exactly, and the report says why."""
    z, labels, domain = _world()
    for method in ("platt", "isotonic"):
        m = calibration.fit(z, labels, domain, ["a", "b", "c"], method=method)["domains"]
        assert "kept_identity" in m["c"] and m["c"]["slope"] == [1.0, 1.0] and m["c"]["y"] == [0.0, 0.0]
        assert "kept_identity" not in m["a"] and "kept_identity" not in m["b"]
    mask = domain == 2
    platt = calibration.fit(z, labels, domain, ["a", "b", "c"])
    np.testing.assert_array_equal(_apply(platt, z[mask], domain[mask]), z[mask].astype(np.float32))


def test_a_domain_with_few_clicks_uses_the_pooled_map_and_an_unseen_domain_too():
    z, labels, domain = _world()
    few = (domain == 2) & (np.arange(len(z)) > 300)  # domain c keeps ~100 rows: under 30 non-clicks or clicks
    keep = ~few
    fitted = calibration.fit(z[keep], labels[keep], domain[keep], ["a", "b", "c"], min_clicks=60)
    assert fitted["domains"]["c"]["source"] == "pooled" and fitted["domains"]["a"]["source"] == "own"
    assert fitted["domains"]["c"]["slope"] == fitted["pooled"]["slope"]
    table = calibration.arrays(fitted, ["a", "b", "c", "new"])
    np.testing.assert_array_equal(table["slope"][3], table["slope"][2])  # a domain the fit never saw: pooled
    none = calibration.fit(z[:8], labels[:8], domain[:8], ["a", "b", "c"])  # under 5 clicks or non-clicks in all
    assert {m["source"] for m in none["domains"].values()} == {"identity"}
    np.testing.assert_array_equal(_apply(none, z[:8], domain[:8]), z[:8].astype(np.float32))
    pooled_only = calibration.fit(z[:100], labels[:100], domain[:100], ["a", "b", "c"])  # 100 rows: pooled only
    assert {m["source"] for m in pooled_only["domains"].values()} == {"pooled"}


def test_the_identity_map_is_exact():
    z = np.random.default_rng(0).normal(size=1000).astype(np.float32) * 30
    out = _apply(None, z, np.zeros(1000, int), ["a"])
    np.testing.assert_array_equal(out, z)


def test_a_model_calibrated_on_one_to_four_data_predicts_a_one_to_ninety_nine_lists_click_rate_when_told():
    """Negatives sampled at 4 per click; the traffic has 99 per click: the rate's prior correction."""
    rng = np.random.default_rng(0)

    def sample(clicks, per_click):
        pos, neg = rng.normal(1.5, 1.0, clicks), rng.normal(-0.5, 1.0, clicks * per_click)
        return np.r_[pos, neg], np.r_[np.ones(clicks), np.zeros(clicks * per_click)].astype(np.int8)

    z_valid, y_valid = sample(2000, 4)
    z_traffic, y_traffic = sample(2000, 99)
    domain = lambda z: np.zeros(len(z), int)  # noqa: E731
    as_sampled = calibration.fit(z_valid, y_valid, domain(z_valid), ["a"])
    told = calibration.fit(z_valid, y_valid, domain(z_valid), ["a"], rate=0.01, sampled={"a": 4})
    assert told["target"] == "click rate 0.01" and told["domains"]["a"]["sampled_negatives_per_click"] == 4
    p_sampled = 1 / (1 + np.exp(-_apply(as_sampled, z_traffic, domain(z_traffic), ["a"])))
    p_told = 1 / (1 + np.exp(-_apply(told, z_traffic, domain(z_traffic), ["a"])))
    assert p_sampled.mean() / y_traffic.mean() > 3  # calibrated to 1:4, it predicts far too many clicks
    assert 0.9 <= p_told.mean() / y_traffic.mean() <= 1.1
    # the shift is the standard correction p / (p + (1 - p) / w), w the odds ratio of the two rates
    ctr = y_valid.mean()
    w = (0.01 / 0.99) / (ctr / (1 - ctr))
    np.testing.assert_allclose(p_told, p_sampled / (p_sampled + (1 - p_sampled) / w), rtol=1e-4)


def test_each_domain_calibrated_to_its_own_traffic_rate_when_the_period_moved_them_apart():
    """Two domains validated at one click rate whose traffic clicks at others (a later period): told each
    domain's rate (`click_rates` of the traffic, means only), each predicts its own domain's clicks."""
    rng = np.random.default_rng(1)

    def sample(clicks, per_click):
        pos, neg = rng.normal(1.0, 1.0, clicks), rng.normal(-0.5, 1.0, int(clicks * per_click))
        return np.r_[pos, neg], np.r_[np.ones(clicks), np.zeros(int(clicks * per_click))].astype(np.int8)

    parts = [sample(3000, 1.0), sample(3000, 1.0)]  # validation: 1 click per non-click in both
    traffic = [sample(3000, 0.5), sample(1000, 4.0)]  # traffic: a clicks more (2:3), b far less (1:5)
    stack = lambda ps: (np.concatenate([z for z, _ in ps]), np.concatenate([y for _, y in ps]),  # noqa: E731
                        np.concatenate([np.full(len(z), k) for k, (z, _) in enumerate(ps)]))  # fmt: skip
    (z_v, y_v, d_v), (z_t, y_t, d_t) = stack(parts), stack(traffic)
    rates = calibration.click_rates(y_t, d_t, ["a", "b"])
    assert rates == pytest.approx({"a": 2 / 3, "b": 1 / 5})
    told = calibration.fit(z_v, y_v, d_v, ["a", "b"], rate=rates, target="the traffic's rates")
    assert told["target"] == "the traffic's rates" and told["rate"] == rates
    as_validated = calibration.fit(z_v, y_v, d_v, ["a", "b"])
    for fitted, in_range in ((as_validated, False), (told, True)):
        p = 1 / (1 + np.exp(-_apply(fitted, z_t, d_t, ["a", "b"])))
        pcoc = [p[d_t == k].mean() / y_t[d_t == k].mean() for k in (0, 1)]
        assert all(0.9 <= v <= 1.1 for v in pcoc) == in_range, pcoc
    # a domain with only clicks (or none) has no rate to target; a domain not named keeps its validation rate
    assert calibration.click_rates(np.array([1, 1, 0, 1]), np.array([0, 0, 1, 1]), ["a", "b"]) == {"b": 0.5}
    partial = calibration.fit(z_v, y_v, d_v, ["a", "b"], rate={"b": 0.2})
    assert "shift" not in partial["domains"]["a"] and "shift" in partial["domains"]["b"]


def test_told_the_traffic_s_rows_a_moved_period_is_matched_in_the_mean_where_the_prior_correction_is_not():
    """The traffic clicks at the validation rate, but its scores moved (new queries, scored lower): the prior
    correction, told only the rate, shifts nothing and under-predicts; given the traffic's rows (raw logits, no
    label) each domain's map is shifted so its mean probability there is the rate, and the log loss on the
    traffic falls with it."""
    rng = np.random.default_rng(2)

    def sample(clicks, shift):
        pos, neg = rng.normal(1.0, 1.0, clicks) + shift, rng.normal(-1.0, 1.0, 4 * clicks) + shift
        return np.r_[pos, neg], np.r_[np.ones(clicks), np.zeros(4 * clicks)].astype(np.int8)

    (z_v, y_v), (z_t, y_t) = sample(2000, 0.0), sample(2000, -1.0)
    d_v, d_t = np.zeros(len(z_v), int), np.zeros(len(z_t), int)
    rates = calibration.click_rates(y_t, d_t, ["a"])
    prior = calibration.fit(z_v, y_v, d_v, ["a"], rate=rates)
    matched = calibration.fit(z_v, y_v, d_v, ["a"], rate=rates, traffic=(z_t, d_t))
    assert prior["domains"]["a"]["shifted_by"] == "the prior correction"
    assert matched["domains"]["a"]["shifted_by"] == f"the mean over the traffic's {len(z_t)} rows"
    z_prior, z_matched = (_apply(f, z_t, d_t, ("a",)) for f in (prior, matched))
    assert metrics.probabilities(z_prior).mean() / y_t.mean() < 0.8  # the moved scores, under-predicted
    assert metrics.probabilities(z_matched).mean() / y_t.mean() == pytest.approx(1.0, abs=1e-4)
    assert metrics.log_loss_from_logits(y_t, z_matched) < metrics.log_loss_from_logits(y_t, z_prior) - 0.01
    # a domain without rows in the traffic falls back to the prior correction
    two = calibration.fit(np.r_[z_v, z_v], np.r_[y_v, y_v], np.r_[d_v, d_v + 1], ["a", "b"],
                          rate={"a": 0.2, "b": 0.2}, traffic=(z_t, d_t))  # fmt: skip
    assert two["domains"]["b"]["shifted_by"] == "the prior correction"


def test_bad_settings_are_refused_by_name():
    with pytest.raises(ConfigError, match="train.calibration"):
        validate(config(train={"calibration": "beta"}))
    with pytest.raises(ConfigError, match="train.calibration_rate"):
        validate(config(train={"calibration_rate": 1.5}))
    with pytest.raises(ValueError, match="every logit|NaN"):
        calibration.fit(np.array([0.0, np.nan]), np.array([0, 1]), np.zeros(2, int), ["a"])


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("calibration") / "run"
    # the tiny model's probabilities are calibrated already (every map would be the identity, `fit` keeps them):
    # a target click rate shifts them, so every map is one
    train = {"epochs": 1, "eval_every": 8, "calibration_min_clicks": 10, "calibration_rate": 0.3}
    trainer.fit(config(train=train), workdir)
    return workdir


def test_a_run_fits_its_calibration_on_validation_and_reports_before_and_after(run_dir):
    fitted = calibration.read(run_dir)
    result = json.loads((run_dir / "eval.json").read_text())
    assert fitted["method"] == "platt" and fitted["fitted_on"] == result["validation"]["data"]
    assert fitted["target"] == "click rate 0.3" and all("shift" in m for m in fitted["domains"].values())
    assert "platt per domain" in result["calibration"]["summary"]
    with np.load(run_dir / "scores_test.npz") as scores:
        labels, logit, calibrated = scores["label"], scores["logit"], scores["calibrated_logit"]
    assert not np.array_equal(logit, calibrated)
    overall = result["overall"]
    assert overall["calibrated"]["log_loss"] == pytest.approx(metrics.log_loss_from_logits(labels, calibrated))
    assert overall["log_loss"] == pytest.approx(metrics.log_loss_from_logits(labels, logit))
    assert overall["auc"] == pytest.approx(metrics.auc(labels, logit))  # ranking: the raw logits'
    assert "| **overall** |" in (run_dir / "eval.md").read_text().split("before and after it")[1]


def test_calibrate_refits_on_a_named_split_keeps_the_previous_and_scoring_follows(run_dir, tmp_path):
    before = calibration.read(run_dir)
    out = calibrate.main(["--workdir", str(run_dir), "--split", "valid", "--method", "isotonic", "--rate", "0"])
    after = calibration.read(run_dir)
    assert after["method"] == "isotonic" and after["previous"] == [before] and out["evaluation"] is None
    assert abs(after["fit_split"]["calibrated"]["pcoc"] - 1) < 0.05  # in sample, isotonic matches the click rate
    predict.main(["--workdir", str(run_dir), "--split", "test", "--out", str(tmp_path / "scores.parquet")])
    table = pq.read_table(tmp_path / "scores.parquet")
    domain = np.asarray(table["domain"].combine_chunks().indices)
    logit = table["logit"].to_numpy()
    names = json.loads((run_dir / "run_info.json").read_text())["domains"]
    expected = 1 / (1 + np.exp(-_apply(after, logit, domain, names)))
    np.testing.assert_allclose(table["score"].to_numpy(), expected, rtol=1e-6, atol=1e-7)
    # the run's own validation data again (the default), with the test split re-scored beside eval.json
    again = calibrate.main(["--workdir", str(run_dir)])
    assert calibration.read(run_dir)["method"] == "platt" and len(calibration.read(run_dir)["previous"]) == 2
    assert again["evaluation"]["overall"]["auc"] == json.loads((run_dir / "eval.json").read_text())["overall"]["auc"]
    assert (run_dir / "reevaluation_test.json").exists()
    # each domain shifted to its click rate in the test split (its means only), matched in the mean over the
    # split's rows as the run scores them: the re-scored test split predicts each domain's clicks
    dataset = trained.load(run_dir).dataset()
    test = dataset.split("test")
    rates = calibration.click_rates(test["label"], test["domain"], [d.name for d in dataset.meta.domains])
    out = calibrate.main(["--workdir", str(run_dir), "--rates-of", "test"])
    moved, evaluated = out["calibration"], out["evaluation"]
    assert moved["rate"] == pytest.approx(rates) and "split 'test'" in moved["target"] and len(rates) >= 3
    for name in rates:
        assert moved["domains"][name]["shifted_by"].startswith("the mean over the traffic's")
        assert evaluated["domains"][name]["calibrated"]["pcoc"] == pytest.approx(1.0, abs=1e-3)
    with pytest.raises(SystemExit):
        calibrate.main(["--workdir", str(run_dir), "--rates-of", "test", "--rate", "0.1"])


def test_the_grid_table_pairs_raw_and_calibrated_by_seed_and_flags_a_method_worse_than_raw(tmp_path):
    from train import calibration_grid

    def block(loss, ece, pcoc, c_loss, c_ece, c_pcoc):
        return {
            "log_loss": loss,
            "ece": ece,
            "pcoc": pcoc,
            "calibrated": {"log_loss": c_loss, "ece": c_ece, "pcoc": c_pcoc},
        }

    for seed, worse in enumerate((0.05, 0.06, 0.04)):
        cell = tmp_path / "grid" / "cold-items" / "text" / "finetune-all" / "fraction-0.1" / f"seed-{seed}"
        cell.mkdir(parents=True)
        (cell / "config.json").write_text("{}")
        (cell / "eval.json").write_text(json.dumps({"validation": {"step": 5}}))
        for method, delta in (("platt", -0.1), ("isotonic", worse)):
            b = block(0.5, 0.1, 1.3, 0.5 + delta, 0.02, 1.0)
            (cell / f"calibration-{method}.json").write_text(json.dumps({"overall": b, "domains": {"a": b}}))
    zero = tmp_path / "grid" / "cold-items" / "text" / "zero-shot" / "seed-0"  # no validation: not a cell
    zero.mkdir(parents=True)
    (zero / "config.json").write_text("{}")
    (zero / "eval.json").write_text("{}")
    assert calibration_grid.cells(tmp_path / "grid") == sorted(
        (tmp_path / "grid").glob("cold-items/text/finetune-all/fraction-0.1/seed-*")
    )
    md = calibration_grid.table(tmp_path / "grid", ["platt", "isotonic"])
    row = next(line for line in md.splitlines() if line.startswith("| finetune-all | 0.1 | 3 |"))
    assert "| -0.1000 ± 0.0000 | +0.0500 ± 0.0100 **worse** |" in row and "1.30 (1.30–1.30)" in row
    # an experiment grid (DATASET/MODEL/seed-S), read as each run calibrated itself at its end (its eval.json)
    for seed, delta in enumerate((-0.02, -0.03, -0.01)):
        cell = tmp_path / "zoo" / "amazon" / "star" / f"seed-{seed}"
        cell.mkdir(parents=True)
        (cell / "config.json").write_text("{}")
        b = block(0.4, 0.05, 1.1, 0.4 + delta, 0.02, 1.0)
        (cell / "eval.json").write_text(json.dumps({"validation": {"step": 5}, "overall": b, "domains": {"a": b}}))
    assert calibration_grid.cells(tmp_path / "zoo", ["star"]) == sorted((tmp_path / "zoo").glob("amazon/star/*"))
    assert calibration_grid.cells(tmp_path / "zoo", ["mmoe"]) == []
    md = calibration_grid.table(tmp_path / "zoo", ["run"])
    assert "| amazon/star | - | 3 | 0.4000 ± 0.0000 | -0.0200 ± 0.0100 |" in md
