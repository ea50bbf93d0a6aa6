"""The experiment runner: models x datasets x seeds, resumable, with the single-domain baseline and the
report files; and one model per domain through data.domains."""

import csv

import numpy as np
import pytest

from configs import experiment as configs_experiment
from helpers import TINY, config
from sr_jax.config import load_config
from sr_jax.experiments import tuning
from sr_jax.training import trainer
from train import experiment


def test_a_run_on_one_domain_sees_only_it(tmp_path):
    cfg = config(TINY, data={"domains": ("search_kitchen",)}, train={"epochs": 1.0})
    run = trainer.build_run(cfg, tmp_path)
    assert set(np.unique(run.spec.train_columns["domain"])) == {1}
    assert set(trainer.fit(cfg, tmp_path)["domains"]) == {"search_kitchen"}
    with pytest.raises(ValueError, match=r"unknown domain\(s\) \['nope'\]"):
        trainer.build_run(config(TINY, data={"domains": ("nope",)}), tmp_path / "x")


def test_grid_writes_results_and_resumes(tmp_path, monkeypatch):
    tiny = [f"data.synthetic.{k}={v}" for k, v in TINY.__dict__.items()]
    args = [
        "--workdir", str(tmp_path / "grid"), "--report-dir", str(tmp_path / "docs"), "--tuned",
        "--models", "full", "full-mean-gating", "single-domain", "--datasets", "synthetic", "--seeds", "0", "--",
        *tiny, "data.text_encoder=hashed-bow", "data.batch_size=256", "mesh.data=1", "train.epochs=1",
        "train.eval_every=8",
    ]  # fmt: skip
    (tmp_path / "docs" / "results").mkdir(parents=True)
    (tmp_path / "docs" / "results" / "analysis.md").write_text("## Reading the tables\nhand-written notes\n")
    # --tuned: each model at train.tune's settings, an ablation at those of the model it ablates
    monkeypatch.setattr(configs_experiment, "TUNED_DIR", tmp_path / "tuned")
    for model, dim in (("full", 8), ("shared-bottom", 24)):
        tuning.write_named_config(tmp_path / "tuned" / "synthetic" / f"{model}.json", "synthetic", model, [],
                                  {"settings": [f"model.dim={dim}", "model.reg_weight=0.5"]}, "")  # fmt: skip
    table = experiment.main(args)
    assert [(r["model"], r["seeds"]) for r in table] == [("full", 1), ("full-mean-gating", 1), ("single-domain", 1)]
    cells = tmp_path / "grid" / "synthetic"
    tuned = (("full", 8, 0.5), ("full-mean-gating", 8, 0.5), ("single-domain/seed-0/search_kitchen", 24, None))
    for cell, dim, reg in tuned:
        saved = load_config(next((cells / cell).rglob("config.json"))).model
        assert saved.dim == dim and (reg is None or saved.reg_weight == reg)  # shared-bottom has no regularizer
    single = table[2]
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
    # every cell validated (steps 8 and 16) and reports its best step; seed 0's curves are drawn
    # the ranking and calibration metrics, raw and after each run's calibration.json
    assert "| log loss | NDCG@10 | MRR | PCOC | ECE | calibrated log loss | calibrated ECE | valid | step |" in md
    assert "| valid | step |" in md and full["step_mean"] in (8, 16) and 0 < full["valid_auc_mean"] < 1
    assert (tmp_path / "docs" / "results" / "synthetic-validation.png").read_bytes()[:4] == b"\x89PNG"
    # the claims, paired by seed (one run, one pair), the per-domain wins as description; the tuned settings listed
    line = next(x for x in md.splitlines() if x.startswith("| domain gating − mean gating |"))
    domains = [k for k, v in full.items() if k.startswith("auc:") and k.endswith("_mean") and v is not None]
    assert line.split("|")[4].strip().endswith("/1") and line.split("|")[7].strip().endswith(f"/{len(domains)}")
    assert line.split("|")[3].strip().startswith("[")  # the interval over test users
    assert "| full | `model.dim=8 model.reg_weight=0.5` |" in md
    # each row's command, every override included: run again, it gives the row's cell
    command = next(x for x in md.splitlines() if x.startswith("python -m train.pretrain --workdir runs/full-mean"))
    assert "model.dim=8" in command and "model.gating=mean" in command and "train.eval_every=8" in command
    assert "data.domains=DOMAIN" in next(x for x in md.splitlines() if "runs/single-domain" in x)
    with open(tmp_path / "docs" / "results" / "results.csv") as f:
        assert len(list(csv.DictReader(f))) == 3
    monkeypatch.setattr(trainer, "fit", lambda *a: pytest.fail("a finished cell ran again"))
    assert experiment.main(args) == table
