"""The experiment runner: models x datasets x seeds, resumable, with the single-domain baseline and the
report files; and one model per domain through data.domains."""

import csv

import numpy as np
import pytest

from helpers import TINY, config
from sr_jax.training import trainer
from train import experiment


def test_a_run_on_one_domain_sees_only_it(tmp_path):
    cfg = config(TINY, data={"domains": ("search_kitchen",)}, train={"epochs": 1.0})
    run = trainer.build_run(cfg, tmp_path)
    assert set(np.unique(run.train_columns["domain"])) == {1}
    assert set(trainer.fit(cfg, tmp_path)["domains"]) == {"search_kitchen"}
    with pytest.raises(ValueError, match=r"unknown domain\(s\) \['nope'\]"):
        trainer.build_run(config(TINY, data={"domains": ("nope",)}), tmp_path / "x")


def test_grid_writes_results_and_resumes(tmp_path, monkeypatch):
    tiny = [f"data.synthetic.{k}={v}" for k, v in TINY.__dict__.items()]
    args = [
        "--workdir", str(tmp_path / "grid"), "--report-dir", str(tmp_path / "docs"),
        "--models", "full", "single-domain", "--datasets", "synthetic", "--seeds", "0", "--",
        *tiny, "data.text_encoder=hashed-bow", "data.batch_size=256", "mesh.data=1", "train.epochs=1",
    ]  # fmt: skip
    (tmp_path / "docs" / "results").mkdir(parents=True)
    (tmp_path / "docs" / "results" / "analysis.md").write_text("## Reading the tables\nhand-written notes\n")
    table = experiment.main(args)
    assert [(r["model"], r["seeds"]) for r in table] == [("full", 1), ("single-domain", 1)]
    single = table[1]
    assert single["overall_auc_mean"] is None and 0 < single["auc:search_kitchen_mean"] < 1
    assert all(0 < r["auc_mean"] < 1 for r in table) and table[0]["cold_auc_mean"] is not None
    md = (tmp_path / "docs" / "RESULTS.md").read_text()
    assert "## synthetic" in md and "| single-domain |" in md and "python -m train.experiment" in md
    assert md.index("hand-written notes") < md.index("## synthetic")  # the analysis survives regeneration
    assert "| compile s | train s | eval s | cell s |" in md  # where each cell's time went
    full = table[0]
    assert 0 < full["compile_s_mean"] and 0 < full["train_s_mean"] and 0 < full["evaluate_s_mean"]
    assert full["compile_s_mean"] + full["train_s_mean"] + full["evaluate_s_mean"] < full["seconds_mean"]
    assert (tmp_path / "docs" / "results" / "synthetic.png").read_bytes()[:4] == b"\x89PNG"
    with open(tmp_path / "docs" / "results" / "results.csv") as f:
        assert len(list(csv.DictReader(f))) == 2
    monkeypatch.setattr(trainer, "fit", lambda *a: pytest.fail("a finished cell ran again"))
    assert experiment.main(args) == table
