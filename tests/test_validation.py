"""Validation during training: the best validated step is kept by orbax's best policy and is the run's
result, early stopping, and a validation part carved from the train split."""

import dataclasses
import json

import numpy as np
import pytest

from helpers import TINY, config
from sr_jax.config import Config, ConfigError, validate
from sr_jax.training import evaluation, loop, trainer
from sr_jax.data import selection
from sr_jax.training.spec import CARVED


def test_early_stopping_counts_validations_without_a_gain():
    history = [[10, 0.60], [20, 0.65], [30, 0.651], [40, 0.64]]
    assert not loop.stops_early(history, 3, 0.0)
    assert loop.stops_early(history, 2, 0.005)  # 0.651 is not a gain of more than 0.005
    assert not loop.stops_early(history, 0, 0.0)  # 0: never


def test_the_best_validated_step_is_the_result_and_the_run_stops_early(tmp_path):
    cfg = config(
        TINY,
        train={
            "epochs": 4.0,
            "eval_every": 4,
            "log_every": 4,
            "early_stopping_patience": 2,
            "early_stopping_min_delta": 1.0,
            "checkpoint_every": 1000,
        },
    )  # fmt: skip  (min_delta 1: no validation can gain, so it stops after the third)
    result = trainer.fit(cfg, tmp_path)
    chosen = result["validation"]
    assert [s for s, _ in chosen["history"]] == [4, 8, 12] and result["trained_steps"] == 12
    assert chosen["score"] == max(v for _, v in chosen["history"])
    assert chosen["step"] == max(chosen["history"], key=lambda v: v[1])[0]
    assert [p.name for p in (tmp_path / "best").iterdir() if p.name.isdigit()] == [str(chosen["step"])]
    run = trainer.build_run(cfg, tmp_path)
    best = run.best.restore(run.spec.program.abstract_state.params)
    again = evaluation.evaluate(run.spec, best)
    assert again["mean_domain_auc"] == pytest.approx(
        result["mean_domain_auc"], abs=1e-6
    )  # the test figures are the best step's
    assert "Parameters of step" in (tmp_path / "eval.md").read_text()
    metrics = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "valid_mean_domain_auc" in m] == [4, 8, 12]
    # the same command again: the run had stopped early, so it does not train on
    assert trainer.fit(cfg, tmp_path)["trained_steps"] == 12
    # TensorBoard event files hold the same curves (read back without TensorFlow)
    scalars = _event_scalars(tmp_path / "tensorboard")
    assert {4, 8, 12} <= {step for step, _ in scalars["valid_mean_domain_auc"]} and "loss" in scalars


def _event_scalars(folder) -> dict[str, list]:
    """{tag: [(step, value)]} of the TFRecord event files in `folder` (length, crc, Event proto, crc)."""
    import struct

    from tensorboardX.proto import event_pb2

    out: dict[str, list] = {}
    for file in sorted(folder.glob("events.out.tfevents.*")):
        data, at = file.read_bytes(), 0
        while at < len(data):
            (length,) = struct.unpack("<Q", data[at : at + 8])
            event = event_pb2.Event.FromString(data[at + 12 : at + 12 + length])
            at += 12 + length + 4
            for value in event.summary.value:
                out.setdefault(value.tag, []).append((event.step, value.simple_value))
    return out


def test_a_validation_part_is_carved_from_the_train_split_and_never_trained():
    columns = {"label": np.arange(1000) % 2, "item_id": np.arange(1000)}  # a tenth is above the floor
    kept, held = selection.carve_validation(columns, 0.1)
    assert len(held["label"]) == 100 and not set(held["item_id"]) & set(kept["item_id"])
    again, held_again = selection.carve_validation(columns, 0.1)
    np.testing.assert_array_equal(held["item_id"], held_again["item_id"])  # fixed whatever the run's seed
    assert selection.carve_validation(columns, 0.0)[1] is None


def test_with_timestamps_the_carve_takes_each_user_s_latest_interactions():
    user = np.repeat(np.arange(50), 8)
    time = np.random.default_rng(0).permutation(400)  # each user's interactions at shuffled times
    columns = {"label": np.arange(400) % 2, "user_id": user, "timestamp": time, "row": np.arange(400)}
    kept, held = selection.carve_validation(columns, 0.125)  # 50 rows: one per user, their latest
    assert sorted(held["user_id"]) == list(range(50))
    latest = {u: time[user == u].max() for u in range(50)}
    assert all(t == latest[u] for u, t in zip(held["user_id"], held["timestamp"], strict=True))
    _, more = selection.carve_validation(columns, 0.25)  # 100 rows: every user's two latest
    assert np.bincount(more["user_id"]).tolist() == [2] * 50


def test_the_dataset_s_own_validation_split_is_used_and_carving_is_the_fallback(tmp_path):
    own = config(TINY, train={"eval_every": 4})  # data.valid_split="valid", valid_from_train=0.1: both defaults
    spec = trainer.build_run(own, tmp_path / "own").spec
    assert spec.valid_source == "valid" and spec.budget["train_examples"] == TINY.train_examples
    assert spec.validation_data == f"the dataset's split 'valid' ({TINY.valid_examples} rows)"
    fallback = config(TINY, train={"eval_every": 4}, data={"valid_split": "nope"})
    spec = trainer.build_run(fallback, tmp_path / "carved").spec
    assert spec.valid_source == CARVED and spec.budget == {
        "train_examples": TINY.train_examples - 410,
        "valid_examples": 410,
    }
    # a fraction of the labels: as much of the dataset's validation split (at least 16 rows)
    spec = trainer.build_run(config(TINY, train={"eval_every": 4}, data={"train_fraction": 0.1}), tmp_path / "f").spec
    assert spec.budget == {"train_examples": 410, "valid_examples": 51}
    assert spec.validation_data == "the dataset's split 'valid' (51 rows, data.train_fraction=0.1 of it)"
    spec = trainer.build_run(config(TINY, train={"eval_every": 4}, data={"train_fraction": 0.01}), tmp_path / "g").spec
    assert spec.budget["valid_examples"] == selection.VALID_FLOOR
    with pytest.raises(ConfigError, match=r"train.eval_every=4: .* no split data.valid_split='nope'"):
        trainer.build_run(
            config(TINY, train={"eval_every": 4}, data={"valid_split": "nope", "valid_from_train": 0}), tmp_path / "x"
        )
    validate(config(TINY, train={"eval_every": 0, "early_stopping_patience": 4}))  # the default patience: no error


def test_validation_runs_on_the_scale_of_epochs_and_never_stops_before_min_steps(tmp_path):
    """16 steps an epoch: one validation an epoch is 16 steps apart (eval_every 4 is the floor); no validation
    can gain (min_delta 1), yet the run trains to min_steps before it stops."""
    spec = trainer.build_run(config(TINY, train={"eval_every": 4, "evals_per_epoch": 1.0}), tmp_path / "a").spec
    assert spec.steps_per_epoch == 16 and spec.eval_interval == 16
    cfg = config(
        TINY,
        train={"epochs": 4.0, "eval_every": 4, "early_stopping_patience": 2, "early_stopping_min_delta": 1.0,
               "min_steps": 28, "checkpoint_every": 1000},
    )  # fmt: skip
    result = trainer.fit(cfg, tmp_path / "b")
    assert [s for s, _ in result["validation"]["history"]] == [4, 8, 12, 16, 20, 24, 28]
    assert result["trained_steps"] == 28


def test_the_default_config_validates_on_the_dataset_s_split(tmp_path):
    cfg = dataclasses.replace(config(TINY), train=Config().train)
    spec = trainer.build_run(cfg, tmp_path).spec
    assert spec.valid_source == "valid" and spec.eval_interval == max(Config().train.eval_every, 8)


def test_validation_is_carved_from_the_labelled_budget_and_recorded(tmp_path):
    """5% of a 4,096-row split is 205 labelled rows: a tenth of them (20) choose the step and 185 train (it used
    to carve a tenth of the whole split, 410 rows, ten times the labels it trained on); eval.json and eval.md
    say so."""
    cfg = config(
        TINY,
        data={"train_fraction": 0.05, "valid_split": "", "valid_from_train": 0.1},
        train={"epochs": 1.0, "eval_every": 4, "checkpoint_every": 1000, "min_steps": 4},
    )
    result = trainer.fit(cfg, tmp_path)
    assert result["budget"] == {"train_examples": 185, "valid_examples": 20}
    assert json.loads((tmp_path / "eval.json").read_text())["budget"] == result["budget"]
    assert "Labels used: 185 to train, 20 to choose the step." in (tmp_path / "eval.md").read_text()
    tiny = config(
        TINY, data={"train_fraction": 0.003, "valid_split": "", "valid_from_train": 0.1}, train={"eval_every": 4}
    )
    spec = trainer.build_run(tiny, tmp_path / "tiny").spec  # 12 labelled rows: half validate, never more
    assert spec.budget == {"train_examples": 6, "valid_examples": 6}
