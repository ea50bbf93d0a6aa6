"""End to end: the CLI writes every report, re-evaluation reproduces it, and training nears the oracle."""

import dataclasses
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import SMALL, TINY, config
from sr_jax import metrics
from sr_jax.config import ConfigError
from sr_jax.data.store import DatasetError, write_text_cache
from sr_jax.experiments import bootstrap
from sr_jax.text import HashedBagOfWords
from sr_jax.training import evaluation, loop, restore, trainer
from sr_jax.featurized import load_dataset
from train import evaluate, pretrain


def test_cli_pretrain_writes_reports_and_evaluate_reproduces_them(tmp_path, capsys, monkeypatch):
    workdir = tmp_path / "run"
    monkeypatch.chdir(tmp_path)
    args = [
        "--workdir",
        str(workdir),
        "train.epochs=1",
        "data.batch_size=256",
        "mesh.data=1",
        *[f"data.synthetic.{k}={v}" for k, v in TINY.__dict__.items()],
    ]
    result = pretrain.main(args)
    for name in ("config.json", "metrics.jsonl", "eval.json", "eval.md"):
        assert (workdir / name).exists(), name
    lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    logged = [line for line in lines if "examples_per_s" in line]
    assert logged[-1]["step"] == 4096 // 256 and logged[-1]["examples_per_s"] > 0
    assert result["validation"]["data"] == "the dataset's split 'valid' (512 rows)"  # the default validates
    assert "search_shop" in result["domains"] and "cold_items" in result and "oracle_auc" in result["overall"]
    table = (workdir / "eval.md").read_text()
    assert "| **cold items** |" in table and "oracle AUC" in table
    saved = json.loads((workdir / "config.json").read_text())
    assert saved["train"]["epochs"] == 1.0 and saved["data"]["synthetic"]["num_users"] == TINY.num_users
    report = (workdir / "eval.json").read_bytes()
    again = evaluate.main(["--workdir", str(workdir)])
    assert (workdir / "eval.json").read_bytes() == report  # a reader never rewrites the run's own report
    assert json.loads((workdir / "reevaluation_test.json").read_text()) == again
    trained_report = json.loads(report)  # what training measured: the re-evaluation agrees on every metric
    assert {k: trained_report[k] for k in again} == again and "timing" in trained_report
    scores = bootstrap.read_scores(workdir)  # the per-example scores beside the report, for intervals over users
    names = list(result["domains"])
    for k, name in enumerate(names):
        mask = scores["domain"] == k
        assert metrics.auc(scores["label"][mask], scores["logit"][mask]) == result["domains"][name]["auc"]


def test_short_training_run_is_within_005_of_the_oracle(tmp_path):
    cfg = config(
        SMALL,
        data={"synthetic": SMALL, "batch_size": 1024, "eval_batch_size": 4096},
        train={"checkpoint_every": 10_000, "log_every": 100},
    )
    result = trainer.fit(cfg, tmp_path)
    gap = result["mean_domain_oracle_auc"] - result["mean_domain_auc"]
    print(json.dumps({k: (v["auc"], v["oracle_auc"]) for k, v in result["domains"].items()}, indent=1))
    assert 0 <= gap < 0.05, (result["mean_domain_auc"], result["mean_domain_oracle_auc"])
    assert result["cold_items"]["auc"] > 0.7


def test_training_refuses_a_text_cache_from_another_encoder(tmp_path):
    cfg = config(TINY)
    dataset = load_dataset(cfg.data)
    other = HashedBagOfWords(seed=1)  # same name and width, other weights
    root = tmp_path / "copy"
    shutil.copytree(dataset.root, root)
    write_text_cache(root, other.name, other.fingerprint(), *other.featurize(dataset.texts()))
    with pytest.raises(DatasetError, match=r"made by 'hashed-bow-v2:dim=64:buckets=65536:seed=1'.*rebuild"):
        load_dataset(dataclasses.replace(cfg.data, path=str(root)))
    with pytest.raises(FileNotFoundError, match=r"no encoder folder minilm \(and not a packaged name"):
        load_dataset(dataclasses.replace(cfg.data, path=str(root), text_encoder="minilm"))


def test_bfloat16_compute_keeps_float32_master_weights(tmp_path):
    """model.dtype=bfloat16 runs the matmuls in bf16; parameters and optimizer state stay float32 and the
    training curve follows the float32 one."""
    losses = {}
    for dtype in ("float32", "bfloat16"):
        cfg = config(TINY, model={"dtype": dtype}, train={"log_every": 4, "checkpoint_every": 1000})
        run = trainer.build_run(cfg, tmp_path / dtype)
        state = loop.train(run, restore.initial_state(run.spec), until=8)
        assert {x.dtype for x in jax.tree.leaves((state.params, state.opt_state)) if x.ndim} == {jnp.dtype("float32")}
        lines = (tmp_path / dtype / "metrics.jsonl").read_text().splitlines()
        losses[dtype] = [json.loads(line)["loss"] for line in lines]
    assert len(losses["float32"]) == 2
    np.testing.assert_allclose(losses["bfloat16"], losses["float32"], atol=0.02)


def test_a_domain_with_one_class_is_left_out_of_the_mean_and_the_report_says_so():
    ds = load_dataset(config(TINY).data)
    cols = {k: np.asarray(v) for k, v in ds.split("test").items()}
    cols["label"] = np.where(cols["domain"] == 1, 1, cols["label"]).astype(np.int8)
    probs = np.random.default_rng(0).random(len(cols["label"]))
    result = evaluation.compute_metrics(ds, "test", probs, cols, np.ones(ds.meta.vocab["item_id"], bool))
    assert result["domains_without_auc"] == ["search_kitchen"] and np.isnan(result["domains"]["search_kitchen"]["auc"])
    others = [m["auc"] for name, m in result["domains"].items() if name != "search_kitchen"]
    assert result["mean_domain_auc"] == pytest.approx(np.mean(others))
    assert "cold_items" not in result  # every item is warm here
    assert "Left out of the mean: 1 domain(s) whose labels in this split are one class" in evaluation.markdown_table(
        result
    )


def test_a_diverged_run_stops_naming_the_step_and_keeps_its_last_good_checkpoint(tmp_path):
    """NaN parameters (a corrupt restore, an overflow) make the loss NaN: the run stops at the next check with
    an error naming the step (6: the first log; checkpoints every 4), saves nothing from that state, and writes
    no eval.json."""
    cfg = config(TINY, train={"checkpoint_every": 4, "log_every": 6})
    run = trainer.build_run(cfg, tmp_path)
    good = loop.train(run, restore.initial_state(run.spec), until=4)  # checkpoint at step 4
    poisoned = good._replace(params={**good.params, "l2": jax.tree.map(lambda x: x * jnp.nan, good.params["l2"])})
    with pytest.raises(loop.TrainingDiverged, match=r"loss=nan.* at step 6; .*the last checkpoint is step 4"):
        loop.train(run, poisoned)
    assert run.checkpointer.latest_step() == 4 and not (tmp_path / "eval.json").exists()
    restored, _ = run.checkpointer.restore(run.spec.program.abstract_state)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(restored.params))


def test_an_unknown_split_is_refused_before_training(tmp_path):
    with pytest.raises(ValueError, match=r"data.eval_split='tset': the dataset .* has splits \['cold_test'"):
        trainer.build_run(config(TINY, data={"eval_split": "tset"}), tmp_path)


def test_resuming_with_an_override_that_changes_the_run_is_refused(tmp_path, monkeypatch):
    """A different batch size on resume would change the data position and the schedule: refused, naming the
    key, with config.json untouched, unless --allow-changes; logging and checkpointing keys may change."""
    monkeypatch.chdir(tmp_path)
    workdir = tmp_path / "run"
    tiny = [f"data.synthetic.{k}={v}" for k, v in TINY.__dict__.items()]
    args = ["--workdir", str(workdir), "train.epochs=1", "data.batch_size=256", "mesh.data=1", *tiny]
    first = pretrain.main(args + ["data.text_encoder=hashed-bow"])
    saved = (workdir / "config.json").read_text()
    with pytest.raises(ConfigError, match=r"resuming with \['data.batch_size'\] changed .* --allow-changes"):
        pretrain.main(["--workdir", str(workdir), "data.batch_size=128"])
    assert (workdir / "config.json").read_text() == saved
    again = pretrain.main(["--workdir", str(workdir), "train.log_every=7"])  # finished: re-evaluates
    assert again["overall"]["auc"] == pytest.approx(first["overall"]["auc"], abs=1e-6)
    allowed = pretrain.main(["--workdir", str(workdir), "--allow-changes", "data.batch_size=128"])
    assert json.loads((workdir / "config.json").read_text())["data"]["batch_size"] == 128 and allowed["domains"]


def test_a_stale_synthetic_text_cache_is_rebuilt(tmp_path):
    """The synthetic dataset is a cache: a text cache an older encoder version made is rebuilt, not refused."""
    cfg = config(dataclasses.replace(TINY, seed=7))
    dataset = load_dataset(cfg.data)
    current = dataset.meta.text_caches["hashed-bow"].fingerprint
    old = HashedBagOfWords(seed=1)
    write_text_cache(dataset.root, old.name, "hashed-bow-v1:an-older-version", *old.featurize(dataset.texts()))
    again = load_dataset(cfg.data)
    assert again.meta.text_caches["hashed-bow"].fingerprint == current
    np.testing.assert_array_equal(again.text_cache("hashed-bow")[0], HashedBagOfWords().featurize(dataset.texts())[0])


def test_evaluation_ranks_logits_and_refuses_non_finite_scores():
    """Every positive 5 logits above every negative, all of them above 16.6 where float32's sigmoid is 1.0:
    AUC 1 in every domain (ranking probabilities would tie them all at 0.5); NaN scores are an error."""
    ds = load_dataset(config(TINY).data)
    cols = {k: np.asarray(v) for k, v in ds.split("test").items()}
    logits = 20.0 + 5.0 * cols["label"].astype(np.float32)
    result = evaluation.compute_metrics(ds, "test", logits, cols, np.ones(ds.meta.vocab["item_id"], bool))
    assert result["overall"]["auc"] == 1.0 and all(m["auc"] == 1.0 for m in result["domains"].values())
    logits[7] = np.nan
    with pytest.raises(ValueError, match=r"the model's scores on 'test': 1 score\(s\) are NaN or inf"):
        evaluation.compute_metrics(ds, "test", logits, cols, np.ones(ds.meta.vocab["item_id"], bool))


def test_eval_reports_ranking_and_calibration_metrics_where_the_data_allow():
    ds = load_dataset(config(TINY).data)
    cols = {k: np.asarray(v) for k, v in ds.split("test").items()}
    logits = np.random.default_rng(0).normal(size=len(cols["label"])) + 2.0 * cols["label"]
    result = evaluation.compute_metrics(ds, "test", logits, cols, np.ones(ds.meta.vocab["item_id"], bool))
    for name, m in [*result["domains"].items(), ("overall", result["overall"])]:
        assert {"ndcg@10", "hr@10", "mrr", "pcoc", "ece", "lists"} <= set(m), name
        assert m["lists"] > 0 and 0 < m["ndcg@10"] <= 1 and m["mrr"] <= m["hr@10"] <= 1
    search = {d.name for d in ds.meta.domains if d.task == "search"}
    assert all(("qauc" in m) == (name in search) for name, m in result["domains"].items())
    assert all(m["qauc"] > 0.7 for name, m in result["domains"].items() if name in search)  # the labels lead
    assert "| domain | query AUC | NDCG@10 |" in evaluation.markdown_table(result)


def test_trained_rows_are_those_the_result_read(tmp_path):
    """One step reads one batch of rows: the record the runs started from this one read (`trained_rows.npz`),
    and the cold items of its report, count only items of rows it read (it used to count every row of the
    split as trained, so a fine-tune froze never-trained rows at their random start)."""
    from sr_jax.data.pipeline import rows_read
    from sr_jax.training import records

    cfg = config(TINY, train={"epochs": 0.05, "checkpoint_every": 1000})  # one step of 256 rows
    result = trainer.fit(cfg, tmp_path)
    run = trainer.build_run(cfg, tmp_path)
    columns = run.spec.train_columns
    read = rows_read(len(columns["label"]), run.spec.batch_size, cfg.train.seed, 1)
    assert read.sum() == run.spec.batch_size
    items = np.zeros(run.spec.model_meta.vocab["item_id"], bool)
    items[np.asarray(columns["item_id"])[read]] = True
    items[0] = False
    with np.load(tmp_path / records.TRAINED_ROWS) as saved:
        np.testing.assert_array_equal(saved["item_id"], items)
        assert saved["item_id"].sum() < (np.bincount(np.asarray(columns["item_id"])) > 0)[1:].sum()  # not all
    test_items = np.asarray(run.spec.split("test")["item_id"])
    assert result["cold_items"]["examples"] == int((~items[test_items]).sum())


def test_profile_steps_write_a_trace_tensorboard_reads(tmp_path):
    cfg = config(TINY, train={"epochs": 1.0, "profile_steps": "2:4", "checkpoint_every": 1000})
    trainer.fit(cfg, tmp_path)
    traces = list((tmp_path / "profile" / "plugins" / "profile").glob("*/*.xplane.pb"))
    assert len(traces) == 1 and traces[0].stat().st_size > 0
    with pytest.raises(ConfigError, match=r"train.profile_steps: '4:2': expected A:B"):
        trainer.fit(config(TINY, train={"profile_steps": "4:2"}), tmp_path / "bad")


@pytest.mark.parametrize("rule", ["dense", "lazy_adam"])
def test_gradient_accumulation_equals_one_batch_n_times_larger(tmp_path, rule):
    """4 micro-batches of 64 rows and one batch of 256 give the same parameters after two steps (a model whose loss
    is a mean over its rows: no L_reg, no batch statistics; SGD without clipping, which a wrong scale would move)."""
    model = {"regularizer": "none", "id_dropout": 0.0}  # no randomness that a micro-batch draws apart
    train = {"embedding_update": rule, "checkpoint_every": 100, "optimizer": "sgd", "grad_clip": 0.0}
    params = []
    for accum in (1, 4):
        cfg = config(TINY, model=model, train={**train, "grad_accum": accum})
        run = trainer.build_run(cfg, tmp_path / f"{rule}-{accum}")
        params.append(loop.train(run, restore.initial_state(run.spec), until=2).params)
        run.close()
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6), *params)
    with pytest.raises(ConfigError, match=r"train.grad_accum=3: the batch of 256 rows does not split"):
        trainer.build_run(config(TINY, train={"grad_accum": 3}), tmp_path / "bad")
