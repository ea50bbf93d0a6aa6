"""The cold-start runner: every cell runs once, the grid resumes, and the report files are written."""

import csv
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import TINY, config
from sr_jax.experiments import cold_start as cold_start_lib
from sr_jax.experiments import report
from sr_jax.training import trainer
from train import cold_start


def test_aggregate_and_markdown():
    rows = [
        {"setting": "a", "fraction": 0.1, "seed": 0, "auc": 0.70},
        {"setting": "a", "fraction": 0.1, "seed": 1, "auc": 0.72},
        {"setting": "b", "fraction": 0.1, "seed": 0, "auc": 0.75},
    ]
    table = report.aggregate(rows, ("setting", "fraction"), ("auc",))
    assert table[0] == {
        "setting": "a",
        "fraction": 0.1,
        "seeds": 2,
        "auc_mean": pytest.approx(0.71),
        "auc_std": pytest.approx(0.0141421, rel=1e-4),
    }
    assert table[1]["auc_std"] == 0.0
    md = report.pivot_markdown(table, ("setting",), "fraction", "auc")
    assert "| a | 0.7100 ± 0.0141 |" in md and "| b | **0.7500 ± 0.0000** |" in md


def test_paired_gains_subtract_scratch_of_the_same_seed():
    from sr_jax.experiments.cold_start import paired_gains

    base = {"protocol": "p", "text": "on", "variant": "-", "fraction": 0.1}
    rows = [
        {**base, "setting": "scratch", "seed": 0, "auc": 0.60},
        {**base, "setting": "scratch", "seed": 1, "auc": 0.70},
        {**base, "setting": "freeze-l0", "variant": "default", "seed": 0, "auc": 0.65},
        {**base, "setting": "freeze-l0", "variant": "default", "seed": 1, "auc": 0.71},
    ]
    assert [round(g["gain"], 6) for g in paired_gains(rows)] == [0.05, 0.01]


def test_the_claims_are_tested_paired_by_fraction_and_seed():
    from sr_jax.experiments.cold_start import paired_settings

    rows = [
        {"protocol": "p", "text": "on", "fraction": f, "seed": s, "setting": setting, "variant": variant, "auc": auc}
        for f in (0.1, 1.0)
        for s in (0, 1)
        for setting, variant, auc in (
            ("scratch", "-", 0.60 + 0.1 * f),
            ("freeze-l0", "default", 0.70 + 0.01 * s),
            ("freeze-l0-l1", "default", 0.69 + 0.03 * s),
        )
    ]
    tests = dict(paired_settings(rows, "p"))
    assert set(tests) == {
        "freeze-l0 (default, text on) − scratch",
        "freeze-l0-l1 (default, text on) − scratch",
        "freeze-l0-l1 − freeze-l0 (default, text on)",
    }
    best = tests["freeze-l0-l1 − freeze-l0 (default, text on)"]
    assert best["pairs"] == 4 and best["wins"] == 2 and best["diff"] == pytest.approx(0.0)
    assert tests["freeze-l0 (default, text on) − scratch"]["diff"] == pytest.approx(0.705 - 0.655)


def test_the_content_settings_a_grid_pretrains():
    grid = cold_start_lib.Grid(text=(True, False), history=(-1, 0, 5))
    assert [a for _, _, a in cold_start_lib.aspects(grid)] == [
        "text-on-history-auto",
        "text-on",
        "text-on-history-5",
        "text-off-history-auto",
        "text-off",
    ]  # fmt: skip  (a history of 5 needs text; the default runs without it)


def test_the_default_path_row_is_the_better_validated_of_finetune_all_and_scratch_where_the_default_trains_both(
    tmp_path, monkeypatch
):
    """Where `versus_scratch` holds for a finetune-all cell (here: at fraction 1), the grid adds what the default
    command keeps there: the finetune-all or scratch cell of the same fraction and seed that validated better."""
    valid = {("finetune-all", 0): 0.70, ("scratch", 0): 0.72, ("finetune-all", 1): 0.74, ("scratch", 1): 0.71}

    def cell(folder, run, cfg):
        setting = folder.parts[-3].split("+")[0] if folder.parts[-2].startswith("fraction-") else folder.parts[-2]
        seed = int(folder.name.removeprefix("seed-"))
        score = valid.get((setting, seed), 0.6)
        figures = {m: None for m in cold_start_lib.METRICS} | {"train_examples": 1000, "valid_examples": 400}
        return figures | {"auc": score - 0.01, "valid_auc": score, "seconds": 0.0, "step": 10, "curve": []}

    monkeypatch.setattr(cold_start_lib, "_cached", cell)
    monkeypatch.setattr(cold_start_lib, "versus_scratch", lambda cfg: "why" if cfg.data.train_fraction == 1 else None)
    grid = cold_start_lib.Grid(seeds=(0, 1), fractions=(0.1, 1.0), protocols=("new-domain",),
                           settings=("scratch", "finetune-all"), text=(True,))  # fmt: skip
    rows = cold_start_lib.run_grid(config(TINY), grid, tmp_path)
    derived = sorted((r["seed"], r["fraction"], r["kept"], r["auc"]) for r in rows if r["setting"] == "finetune")
    assert derived == [(0, 1.0, "scratch", pytest.approx(0.71)), (1, 1.0, "finetune-all", pytest.approx(0.73))]
    gains = [g for g in cold_start_lib.paired_gains(rows) if g["setting"] == "finetune"]
    assert sorted(round(g["gain"], 6) for g in gains) == [0.0, 0.03]  # never below scratch where it chose right
    cold_start_lib.write_report(rows, tmp_path / "report", "cmd")
    assert "scratch kept in 1 of 2 cells" in (tmp_path / "report" / "cold_start.md").read_text()


def test_grid_runs_every_cell_once_and_writes_the_report(tmp_path, monkeypatch, capfd):
    tiny = [f"data.synthetic.{k}={v}" for k, v in TINY.__dict__.items()]
    args = [
        "--workdir",
        str(tmp_path / "grid"),
        "--report-dir",
        str(tmp_path / "report"),
        "--seeds",
        "0",
        *tiny,
        "--fractions",
        "1",
        "data.text_encoder=hashed-bow",
        "--settings",
        "scratch",
        "freeze-l0-l1",
        "--text",
        "on",
        "--variants",
        "replay",
        "--finetune",
        "train.min_steps=2",
        "--finetune",
        "train.epochs=1",
        "data.batch_size=256",
        "mesh.data=1",
        "train.epochs=1",
    ]  # fmt: skip  (overrides anywhere: between and after the grid options)
    # killed (SIGKILL) in its first fine-tune cell, then run again (issue 38): the finished pretraining cell is
    # read back, the killed cell resumes from its checkpoint, the rest runs
    proc = subprocess.Popen([sys.executable, "-m", "train.cold_start", *args], stderr=subprocess.PIPE)
    pretrain_done = tmp_path / "grid" / "pretrain" / "text-on-history-auto" / "seed-0" / "cell.json"

    def started() -> list[Path]:  # a fine-tune cell with a saved step and no report yet
        steps = (tmp_path / "grid").glob("new-domain/*/*/*/seed-0/checkpoints/*")
        return [p for p in steps if p.name.isdigit() and not (p.parents[1] / "eval.json").exists()]

    deadline = time.monotonic() + 240
    while not started() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.kill()
    proc.communicate()
    assert pretrain_done.exists() and started(), "the grid was not killed in a fine-tune cell"
    finished = pretrain_done.read_bytes()
    table = cold_start.main(args)  # (its log goes to stderr: cli.setup)
    assert pretrain_done.read_bytes() == finished  # not run again
    assert "resumed from step" in capfd.readouterr().err
    # 2 protocols x (scratch + freeze-l0-l1 and a zero-shot line, in the one variant named: replay)
    assert len(table) == 2 * 3
    assert {r["variant"] for r in table if r["setting"] != "scratch"} == {"replay"}
    replayed = (
        tmp_path / "grid" / "new-domain" / "text-on-history-auto" / "freeze-l0-l1+replay" / "fraction-1" / "seed-0"
    )
    assert '"replay_fraction": 0.25' in (replayed / "config.json").read_text()
    assert {r["setting"] for r in table if r["protocol"] == "cold-items"} == {"zero-shot", "scratch", "freeze-l0-l1"}
    assert all(0.0 < r["auc_mean"] < 1.0 and r["seeds"] == 1 for r in table)
    out = tmp_path / "report"
    assert (out / "cold_start.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for protocol in ("new-domain", "cold-items"):  # every fine-tune validates: its curves are drawn
        assert (out / f"{protocol}-validation.png").read_bytes()[:4] == b"\x89PNG"
    with open(out / "cold_start.csv") as f:
        assert len(list(csv.DictReader(f))) == len(table)
    md = (out / "cold_start.md").read_text()
    assert "## new-domain (train `heldout_train`, evaluate `heldout_test`)" in md
    assert "| freeze-l0-l1 | replay | on-history-auto |" in md
    assert "python -m train.cold_start --workdir" in md
    assert "Gain over scratch, paired by seed" in md
    assert "Paired by fraction and seed" in md and "| freeze-l0-l1 (replay, text on-history-auto) − scratch |" in md
    assert "| freeze-l0-l1 (replay, text on-history-auto) − zero-shot |" in md
    assert "| fraction | cells | valid labels (mean) | rho | gap | start chosen |" in md  # the selection table
    assert "![validation curves](new-domain-validation.png)" in md  # the cold-items protocol has a zero-shot line
    pretrained = tmp_path / "grid" / "pretrain" / "text-on-history-auto" / "seed-0" / "config.json"
    assert '"num_users": 60' in pretrained.read_text()  # the overrides placed between options reached it
    tuned = replayed / "config.json"
    assert '"min_steps": 2' in tuned.read_text() and '"epochs": 1.0' in tuned.read_text()
    # a fine-tune validates on a tenth of its cold train split and reports its best validated step
    assert '"valid_from_train": 0.1' in tuned.read_text() and '"eval_every": 20' in tuned.read_text()
    assert "validation" in json.loads((tuned.parent / "eval.json").read_text())
    # every cell's log loss, calibration and labelled budget, as its eval.json has them
    budget = json.loads((tuned.parent / "eval.json").read_text())["budget"]
    assert (
        "| setting / variant / text / fraction | AUC | log loss | NDCG@10 | MRR | PCOC | ECE | calibrated log loss "
        "| calibrated PCOC | calibrated ECE | train labels |"
    ) in md
    line = next(x for x in md.splitlines() if x.startswith("| freeze-l0-l1 / replay / on-history-auto / 1 |"))
    assert line.endswith(f"| {budget['train_examples']} | {budget['valid_examples']} |")
    cell = next(
        r
        for r in table
        if (r["protocol"], r["setting"], r["variant"], r["fraction"]) == ("new-domain", "freeze-l0-l1", "replay", 1.0)
    )
    assert cell["train_examples_mean"] == budget["train_examples"] > 0 and 0 < cell["ece_mean"] < 1
    calibrated = json.loads((tuned.parent / "eval.json").read_text())["overall"]["calibrated"]
    assert cell["calibrated_ece_mean"] == calibrated["ece"] and cell["calibrated_log_loss_mean"] > 0
    # finished cells are not run again
    monkeypatch.setattr(trainer, "fit", lambda *a: pytest.fail("a finished cell ran again"))
    monkeypatch.setattr(trainer, "build_run", lambda *a: pytest.fail("a finished cell ran again"))
    assert cold_start.main(args) == table
