"""The user history aspect: earlier clicks only (no leakage from the future), and a model that reads it."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from helpers import config
from sr_jax import metrics
from sr_jax.data.history import COLUMN, user_history, with_history
from sr_jax.data.selection import history_events, select_domains
from sr_jax.data.importer import import_tables
from sr_jax.export import scoring, trained
from sr_jax.text import HashedBagOfWords, build_text_cache
from sr_jax.training import trainer
from train import predict


def _events(user, time, text, label):
    return {k: np.asarray(v) for k, v in dict(user_id=user, timestamp=time, item_text=text, label=label).items()}


def test_history_is_the_last_clicks_strictly_before():
    events = _events(
        user=[1, 1, 1, 1, 2, 1, 1],
        time=[10, 20, 30, 30, 5, 15, 25],
        text=[100, 200, 300, 301, 900, 150, -1],  # -1: an item without text is skipped
        label=[1, 1, 1, 1, 1, 0, 1],  # a non-click is not history
    )
    examples = {"user_id": np.array([1, 1, 1, 2, 3]), "timestamp": np.array([30, 31, 10, 6, 99])}
    got = user_history(examples, events, 2)
    np.testing.assert_array_equal(got, [[100, 200], [300, 301], [-1, -1], [-1, 900], [-1, -1]])


def test_history_never_reads_the_future():
    """Changing every event at or after an example's time leaves its history unchanged."""
    rng = np.random.default_rng(0)
    n = 400
    events = _events(rng.integers(1, 9, n), rng.integers(0, 50, n), rng.integers(-1, 30, n), rng.integers(0, 2, n))
    examples = {"user_id": rng.integers(1, 9, 100), "timestamp": rng.integers(0, 50, 100)}
    before = user_history(examples, events, 5)
    for e in range(len(examples["user_id"])):
        later = events["timestamp"] >= examples["timestamp"][e]
        changed = {k: v.copy() for k, v in events.items()}
        changed["item_text"][later] = rng.integers(30, 60, later.sum())
        changed["label"][later] = 1
        one = {k: v[e : e + 1] for k, v in examples.items()}
        np.testing.assert_array_equal(user_history(one, changed, 5), before[e : e + 1])
    assert (before >= 0).any()


def test_a_model_with_the_history_aspect_trains_and_evaluates(tmp_path):
    from test_importer import _source

    ds = import_tables(_source(tmp_path), tmp_path / "data")
    build_text_cache(ds.root, HashedBagOfWords(), progress=False)
    cfg = config(data={"path": str(ds.root), "batch_size": 8}, model={"user_history": 4}, train={"epochs": 2.0})
    run = trainer.build_run(cfg, tmp_path / "run")
    assert run.spec.train_columns[COLUMN].shape == (len(run.spec.train_columns["label"]), 4)
    assert (run.spec.train_columns[COLUMN] >= 0).any()
    test = run.spec.split("test")
    raw = select_domains(ds, "test", run.spec.domains)
    expected = with_history(raw, history_events(ds, "test", "train", run.spec.domains), 4)[COLUMN]
    np.testing.assert_array_equal(test[COLUMN], expected)
    run.checkpointer.close()
    result = trainer.fit(cfg, tmp_path / "run")
    assert 0 <= result["overall"]["auc"] <= 1


def test_scoring_reproduces_evaluation_with_history_a_fraction_and_a_carve(tmp_path):
    """One history source: with a quarter of the train split and a carved validation part, training histories
    still read the whole log, and `train.predict` scores eval.json's numbers from the same events."""
    from test_importer import _impressions, _source

    ds = import_tables(_source(tmp_path, _impressions(2000)), tmp_path / "data")
    build_text_cache(ds.root, HashedBagOfWords(), progress=False)
    cfg = config(
        data={
            "path": str(ds.root),
            "batch_size": 64,
            "train_fraction": 0.5,
            "valid_from_train": 0.2,
            "valid_split": "",
        },
        model={"user_history": 3},
        train={"epochs": 2.0, "eval_every": 4},
    )
    run = trainer.build_run(cfg, tmp_path / "run")
    spec = run.spec
    log = history_events(ds, "train", "train", spec.domains)
    whole = select_domains(ds, "train", spec.domains)
    assert (
        len(log["label"]) == len(whole["label"]) > len(spec.train_columns["label"]) + len(spec.valid_columns["label"])
    )
    test = spec.split("test")
    run.checkpointer.close()
    trainer.fit(cfg, tmp_path / "run")
    scorer = scoring.run_scorer(trained.load(tmp_path / "run"))
    scored = scoring.model_columns(scorer, ds, "test")
    ran = np.isin(scored["domain"], [scorer.domains.index(n) for n in spec.domains])  # not the held-out domain
    np.testing.assert_array_equal(scored[COLUMN][ran], test[COLUMN])
    report = json.loads((tmp_path / "run" / "eval.json").read_text())
    out = tmp_path / "scores.parquet"
    predict.main(["--workdir", str(tmp_path / "run"), "--out", str(out)])
    table = pq.read_table(out)
    labels, logits = table["label"].to_numpy(), table["logit"].to_numpy()
    domains = np.asarray(table["domain"].to_pylist())
    assert len(report["domains"]) == 2
    for name, m in report["domains"].items():
        assert metrics.auc(labels[domains == name], logits[domains == name]) == pytest.approx(m["auc"], abs=1e-9)
