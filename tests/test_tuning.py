"""Equal-budget tuning (sr_jax/experiments/tuning.py, train.tune), the pruner's hook in training, the named
configs it writes, and the paired tests of the results report."""

import dataclasses
import json

import numpy as np
import optuna
import pytest
from scipy import stats

from configs import experiment
from configs.baselines import ZOO
from helpers import TINY, config
from sr_jax.config import Config, ConfigError, override, validate
from sr_jax.experiments import report, results, tuning
from sr_jax.training import trainer
from train import cli

BASE = [
    *(f"data.synthetic.{f.name}={getattr(TINY, f.name)}" for f in dataclasses.fields(TINY)),
    "data.text_encoder=hashed-bow",
    "data.batch_size=256",
    "data.eval_batch_size=512",
    "mesh.data=1",
    "train.epochs=1",
    "train.eval_every=4",
    "train.log_every=4",
    "train.checkpoint_every=8",
]  # 16 steps, validated every 4
SPACE = {"train.learning_rate": ("log", 1e-3, 1e-2), "model.dim": ("choice", (8, 16))}


def test_a_study_chooses_on_validation_only_and_resumes_its_interrupted_trial(tmp_path):
    """A tuner killed (SIGKILL) mid-trial leaves it RUNNING with a checkpoint: the next tuner runs its settings
    again, in the same folder, from that checkpoint, then the rest."""
    import subprocess
    import sys
    import time

    code = f"from sr_jax.experiments import tuning; tuning.tune({str(tmp_path)!r}, {BASE!r}, {SPACE!r}, trials=2)"
    proc = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while proc.poll() is None and time.monotonic() < deadline:
        if [p for p in tmp_path.glob("trials/*/checkpoints/*") if p.name.isdigit()]:
            break
        time.sleep(0.02)
    proc.kill()
    proc.communicate()
    (killed,) = [p.parents[1] for p in tmp_path.glob("trials/*/checkpoints/*") if p.name.isdigit()]
    assert not (killed / "eval.json").exists(), "the trial finished before the tuner was killed"

    def logged() -> list[int]:  # the training log's steps (validation lines share theirs)
        lines = [json.loads(line) for line in (killed / "metrics.jsonl").read_text().splitlines()]
        return [line["step"] for line in lines if "loss" in line]

    steps = logged()[-1]
    chosen = tuning.tune(tmp_path, BASE, SPACE, trials=2)
    trials = optuna.load_study(study_name="study", storage=f"sqlite:///{tmp_path / 'study.db'}").get_trials()
    assert trials[0].state == optuna.trial.TrialState.FAIL
    finished = [t for t in trials if t.state in tuning.FINISHED]
    assert len(finished) == 2 == chosen["trials"]
    assert finished[0].params == trials[0].params  # queued again with its settings
    assert finished[0].user_attrs["folder"] == str(killed)  # and resumed there: its metrics go on, not restart
    assert logged() == sorted(set(logged())) and logged()[0] <= steps < logged()[-1]
    assert chosen["validation"] == max(t.user_attrs["score"] for t in finished)
    for t in finished:  # every trial validated on valid and evaluated on valid: no test figure exists
        folder = tmp_path / "trials" / tuning.folder_name(t.user_attrs["settings"])
        result = json.loads((folder / "eval.json").read_text())
        assert result["split"] == "valid" and result["validation"]["score"] == t.user_attrs["score"]
    # run again: the budget is spent, nothing trains, the same choice
    assert tuning.tune(tmp_path, BASE, SPACE, trials=2)["settings"] == chosen["settings"]


def test_the_pruner_stops_a_run_at_a_validation(tmp_path):
    calls = []

    def prune_at_8(step, score):
        calls.append(step)
        return step == 8

    cfg = config(TINY, train={"epochs": 1.0, "eval_every": 4, "log_every": 4, "checkpoint_every": 100})
    result = trainer.fit(cfg, tmp_path, on_validation=prune_at_8)
    assert calls == [4, 8] and result["trained_steps"] == 8
    assert [s for s, _ in result["validation"]["history"]] == [4, 8]


def test_suggestions_are_overrides_of_the_declared_space():
    trial = optuna.trial.FixedTrial({"train.learning_rate": 0.00123456, "model.expert_hidden": "32,16"})
    space = {"train.learning_rate": ("log", 1e-4, 1e-2), "model.expert_hidden": ("choice", ("32,16", "64,32"))}
    settings = tuning.suggest(trial, space)
    assert settings == ["train.learning_rate=0.00123", "model.expert_hidden=32,16"]
    assert override(Config(), settings).model.expert_hidden == (32, 16)
    with pytest.raises(ValueError, match="unknown kind"):
        tuning.suggest(trial, {"train.learning_rate": ("uniform", 0, 1)})


def test_the_full_model_also_tunes_its_regularizer_and_ablations_take_only_what_they_have(tmp_path, monkeypatch):
    full, mmoe = (override(Config(), experiment.MODELS[m]) for m in ("full", "mmoe"))
    assert set(experiment.space_for(full)) == {
        *experiment.SEARCH_SPACE,
        "model.reg_weight",
        "model.reg_temperature",
    }
    assert set(experiment.space_for(mmoe)) == set(experiment.SEARCH_SPACE)
    settings = ["train.learning_rate=0.002", "model.dim=16", "model.reg_weight=0.3", "model.reg_temperature=2"]
    monkeypatch.setattr(experiment, "TUNED_DIR", tmp_path)
    (tmp_path / "movielens").mkdir()
    (tmp_path / "movielens" / "full.json").write_text(json.dumps({"settings": settings}))
    assert experiment.tuned("movielens", "full") == settings
    assert experiment.tuned("movielens", "full-mean-gating") == settings  # an ablation: the full model's
    assert experiment.tuned("movielens", "full-no-reg") == settings[:2]  # no regularizer, no reg settings
    assert experiment.tuned("movielens", "full-mmd") == settings[:2]  # reg_weight was tuned for JS, not MMD
    for model, sources in experiment.ABLATES.items():  # every ablation's settings are valid for it
        if sources == ("full",):
            cfg = override(Config(), [*experiment.tuned("movielens", model), *experiment.MODELS[model]])
            assert cfg.model.dim == 16
    with pytest.raises(ValueError, match="run python -m train.tune"):
        experiment.tuned("amazon", "full")
    # the additions on a zoo backbone: the backbone's tuned settings (its own options too), the full model's
    # regularizer, so that the pair differs in the additions alone
    own = ["train.learning_rate=0.005", "model.dim=64", "model.gate_hidden=128"]
    (tmp_path / "movielens" / "hamur.json").write_text(json.dumps({"settings": own}))
    assert experiment.tuned("movielens", "full-hamur") == [*own, *settings[2:]]
    with pytest.raises(ValueError, match="no tuned settings"):
        experiment.tuned("movielens", "full-epnet")  # epnet was not tuned


def test_every_zoo_backbone_tunes_its_own_options_and_every_choice_is_valid_for_it():
    for name in ZOO:
        cfg = override(Config(), experiment.MODELS[name])
        space = experiment.space_for(cfg)
        own = experiment.BACKBONE_SPACE[name]
        assert set(space) == {*experiment.SEARCH_SPACE, *own}, name
        for key, (kind, *args) in own.items():  # each end of each option: a config the backbone accepts
            ends = (args[0], args[1]) if kind == "log" else (min(args[0]), max(args[0]))
            for value in ends:
                validate(override(cfg, [f"{key}={value}"]))
    # an option of one backbone is refused by another, so a space cannot leak across backbones
    with pytest.raises(ConfigError, match="meta_layers"):
        validate(override(Config(), [*experiment.MODELS["hamur"], "model.meta_layers=3"]))


def test_a_named_config_of_the_tuner_is_a_starting_point_of_the_command_line(tmp_path, monkeypatch):
    import configs

    named = tmp_path / "tuned" / "synthetic" / "full.json"
    tuning.write_named_config(named, "synthetic", "full", ["model.dim=16", "train.epochs=3"], {"validation": 0.7}, "")
    monkeypatch.setattr(configs, "__file__", str(tmp_path / "__init__.py"))
    cfg = cli.config_from_name("tuned/synthetic/full")
    assert cfg.model.dim == 16 and cfg.train.epochs == 3
    (tmp_path / "broken.json").write_text("{}")
    with pytest.raises(cli.ConfigError, match="broken.json"):
        cli.config_from_name("broken")


def test_paired_tests_match_scipy_and_pair_by_seed_with_domain_wins_as_description():
    rows = [
        {"dataset": "d", "model": m, "seed": s, "auc:x": base + 0.01 * s + dx, "auc:y": base + 0.02 + dy}
        for s in range(3)
        for m, base, dx, dy in (("a", 0.70, 0.002 * s, 0.001), ("b", 0.69, 0.0, -0.004 * s))
    ]
    for r in rows:  # the run's mean per-domain AUC
        r["auc"] = (r["auc:x"] + r["auc:y"]) / 2
    r = results.paired(rows, "d", "a", "b")
    a = np.array([[0.70 + 0.01 * s + 0.002 * s, 0.72 + 0.001] for s in range(3)]).mean(1)  # one run per seed
    b = np.array([[0.69 + 0.01 * s, 0.71 - 0.004 * s] for s in range(3)]).mean(1)
    assert r["pairs"] == 3 and r["wins"] == 3 and r["diff"] == pytest.approx((a - b).mean())
    assert r["p_t"] == pytest.approx(stats.ttest_rel(a, b).pvalue)
    assert r["p_wilcoxon"] == pytest.approx(stats.wilcoxon(a - b).pvalue)
    assert r["domain_wins"] == "6/6"  # (seed, domain) pairs: a description, never a test's pairs
    assert results.paired(rows, "d", "a", "missing") is None
    table = report.paired_markdown([("a − b", r)])
    assert "| a − b | +0.0" in table and "| 3/3 |" in table and "domains won (description)" in table


def test_the_tune_command_writes_named_configs_and_a_summary(tmp_path):
    from train import tune as tune_cli

    out = tmp_path / "tuned"
    argv = ["--workdir", str(tmp_path / "tune"), "--datasets", "synthetic", "--models", "mmoe", "--trials", "1",
            "--configs-dir", str(out), *BASE]  # fmt: skip
    summary = tune_cli.main(argv)
    record = json.loads((out / "synthetic" / "mmoe.json").read_text())
    assert record["settings"] == summary["synthetic/mmoe"]["settings"] and record["trials"] == 1
    cfg = override(Config(), record["overrides"])  # what `--config tuned/synthetic/mmoe` starts from
    assert cfg.train.eval_every == 4 and cfg.model.gating == "mean" and cfg.data.synthetic.num_users == TINY.num_users
    assert f"{cfg.train.learning_rate:.3g}" in " ".join(record["settings"])
    assert "| synthetic/mmoe | 1 (0) |" in (tmp_path / "tune" / "TUNING.md").read_text()


def test_t_interval_is_scipy_s_student_t_interval_of_the_mean():
    from sr_jax.experiments.report import t_interval

    d = [0.012, -0.004, 0.007, 0.003, 0.010]
    mean, low, high = t_interval(d)
    expected = stats.t.interval(0.95, len(d) - 1, loc=np.mean(d), scale=stats.sem(d))
    assert mean == pytest.approx(np.mean(d)) and (low, high) == pytest.approx(expected)
    one = t_interval([0.5])
    assert one[0] == 0.5 and np.isnan(one[1]) and np.isnan(one[2])
