"""Validation during training: the best validated step is kept by orbax's best policy and is the run's
result, early stopping, and a validation part carved from the train split."""

import json

import numpy as np
import pytest

from helpers import TINY, config
from sr_jax.config import ConfigError, validate
from sr_jax.training import evaluation, loop, trainer
from sr_jax.data import selection


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
    with pytest.raises(ConfigError, match=r"train.eval_every: validates on data.valid_split or"):
        validate(config(TINY, train={"eval_every": 4}, data={"valid_from_train": 0.1}))
    with pytest.raises(ConfigError, match=r"train.early_stopping_patience: stops on validation scores"):
        validate(config(TINY, train={"early_stopping_patience": 2}))


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
