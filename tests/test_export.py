"""Out of the trainer: the serving artifact (jax alone), batch scoring to Parquet, retrieval vectors,
safetensors / PyTorch interop and params-only run folders (sr_jax/export, docs/EXPORT.md)."""

import dataclasses
import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pyarrow.parquet as pq
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file

from helpers import config
from sr_jax import metrics, model as sr_model
from sr_jax.bench.world import bench_meta
from sr_jax.config import BEFORE_KEY, from_dict, ModelConfig
from sr_jax.export import embeddings, interop, scoring, serving, trained
from sr_jax.model import layers, rows as rows_of
from sr_jax.model.match import TEXTS
from sr_jax.data.pipeline import map_batches
from sr_jax.training import evaluation, trainer
from sr_jax.training.checkpoint import CheckpointError
from sr_jax.treeutil import flatten, unflatten
from train import convert, embed, export, predict

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A validated run (its result is its best validated step) with sparse fields, text and 7 domains, calibrated
    to a click rate (so that its calibration is not the identity the tiny model's probabilities would keep)."""
    workdir = tmp_path_factory.mktemp("export") / "run"
    trainer.fit(config(train={"epochs": 1, "eval_every": 8, "calibration_rate": 0.3}), workdir)
    return workdir


@pytest.fixture(scope="module")
def artifact(run_dir):
    out = run_dir.parent / "served"
    export.main(["--workdir", str(run_dir), "--out", str(out)])
    return out


def trainer_scores(run_dir: Path, batch_size: int, split: str = "test"):
    """The trainer's own predictions of the run's result (as eval.json's), calibrated by its calibration.json,
    at `batch_size`, and the columns."""
    model = trained.load(run_dir)
    run = trainer.build_run(dataclasses.replace(model.config), run_dir)
    columns = run.spec.split(split)
    spec = run.spec
    mask = evaluation.device_mask(spec, evaluation.trained_rows(spec))  # as evaluation reads untrained ids
    table = jax.device_put(model.calibration_table())

    def predict(b):
        return spec.program.predict(model.params, spec.global_eval_batch(b), spec.text, mask, table)

    probs = map_batches(predict, columns, batch_size)["probability"]
    run.checkpointer.close()
    return probs, columns


def test_the_run_result_is_its_validated_step(run_dir):
    model = trained.load(run_dir)
    result = json.loads((run_dir / "eval.json").read_text())
    assert model.chosen_by == "validation" and model.step == result["validation"]["step"]
    assert trained.load(run_dir, step=16).chosen_by == "latest"


def test_the_artifact_runs_with_jax_alone_and_equals_the_trainer_bit_for_bit(run_dir, artifact, tmp_path):
    manifest = json.loads((artifact / "manifest.json").read_text())
    model = trained.load(run_dir)
    assert manifest["run"]["fingerprint"] == model.fingerprint and manifest["domains"] == model.domains
    assert [f["name"] for f in manifest["features"]] == [f["name"] for f in serving.features(model)]
    assert not list(artifact.glob("*checkpoint*")) and "opt_state" not in json.dumps(manifest)
    listing = convert.inspect(artifact)
    assert "serving artifact" in listing and "| l0.id_tables.item |" in listing
    # the run is calibrated (Platt per domain), and the artifact says so and carries it
    assert model.calibration["method"] == "platt" and manifest["calibration"]["fitted"] == model.calibration
    assert "platt per domain" in manifest["calibration"]["summary"]
    expected = {}
    for size in (8, 512):  # XLA's CPU kernels round by shape: compare at equal batch sizes
        probs, columns = trainer_scores(run_dir, size)
        expected[size] = probs[: 2 * size]
    names = [f["name"] for f in manifest["features"]]
    np.savez(tmp_path / "batch.npz", **{n: np.asarray(columns[n])[:1024] for n in names})
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["sr_jax"] = None  # importing it fails: the artifact must not need it
        sys.modules["train"] = None
        sys.path = [p for p in sys.path if p not in ("", {str(REPO)!r})]
        sys.path.insert(0, {str(artifact)!r})
        import numpy as np, serve
        model = serve.load({str(artifact)!r})
        cols = np.load({str(tmp_path / "batch.npz")!r})
        out = {{}}
        for size in (8, 512):
            out[str(size)] = np.concatenate(
                [model({{n: cols[n][i : i + size] for n in model.features}})["probability"] for i in (0, size)]
            )
        np.savez({str(tmp_path / "out.npz")!r}, **out)
        """
    )
    done = subprocess.run([sys.executable, "-I", "-c", script], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    with np.load(tmp_path / "out.npz") as served:
        for size in (8, 512):
            np.testing.assert_array_equal(served[str(size)], expected[size])
    # and the calibration changed the probabilities: the served ones are not sigmoid(logit)
    out = scoring.artifact_scorer(artifact, 512).bind(scoring.text_table(scoring.run_scorer(model), model.dataset()))
    served = out({n: np.asarray(columns[n])[:512] for n in names})
    assert np.abs(served["probability"] - 1 / (1 + np.exp(-served["logit"].astype(np.float64)))).max() > 1e-3


def test_a_bfloat16_artifact_is_half_the_size_and_close(run_dir, artifact, tmp_path):
    export.main(
        ["--workdir", str(run_dir), "--out", str(tmp_path / "bf16"), "--dtype", "bfloat16", "--platforms", "cpu"]
    )
    assert (tmp_path / "bf16" / "params.npz").stat().st_size < 0.55 * (artifact / "params.npz").stat().st_size
    probs, columns = trainer_scores(run_dir, 512)
    scorer = scoring.artifact_scorer(tmp_path / "bf16", 512)
    score = scorer.bind(scoring.text_table(scorer, trained.load(run_dir).dataset()))
    served = map_batches(score, columns, 512)["probability"]
    assert np.abs(served - probs).max() < 0.02 and not np.array_equal(served, probs)


def test_bad_input_to_the_served_model_is_named(artifact):
    sys.path.insert(0, str(artifact))
    try:
        import serve
    finally:
        sys.path.remove(str(artifact))
    model = serve.load(artifact)
    n = 4
    batch = {name: np.zeros((n, *spec["shape"][1:]), np.int32) for name, spec in model.features.items()}
    batch["query_text"] = np.full(n, -1, np.int32)
    assert model(batch)["probability"].shape == (n,)
    cases = [
        ({k: v for k, v in batch.items() if k != "item_id"}, "missing feature(s) ['item_id']"),
        ({**batch, "user_id": batch["user_id"].astype(np.float32)}, "feature 'user_id': dtype float32"),
        (
            {**batch, "item_id": np.array([0, 1, 10**6, 2], np.int32)},
            "feature 'item_id', row 2: 1000000 is out of range",
        ),
        ({**batch, "domain": np.array(["search_shop"] * 3 + ["nowhere"])}, "row 3: unknown domain 'nowhere'"),
        ({**batch, "item_text": np.zeros((n, 2), np.int32)}, "feature 'item_text': shape [4, 2]; expected [B]"),
        ({**batch, "label": np.zeros(3)} | {"user_id": np.zeros(3, np.int32)}, "feature 'user_id': 3 rows"),
        ({k: v[:0] for k, v in batch.items()}, "an empty batch"),
    ]
    for bad, message in cases:
        with pytest.raises(serve.InputError, match=re.escape(message)):
            model(bad)
    keys = json.loads((artifact / "vocab.json").read_text())["keys"]["item_id"]
    np.testing.assert_array_equal(model.rows("item_id", [keys[4], "never-seen"]), [5, 0])
    with pytest.raises(serve.InputError, match="row 1: unknown key 'never-seen'"):
        model.rows("item_id", [keys[4], "never-seen"], unknown="error")
    # the dense rating: float32, NaN missing, an infinite value named by its row; raw stars standardised as in training
    spec = model.features["item.dense.rating"]
    assert spec["dtype"] == "float32" and spec["std"] > 0
    np.testing.assert_allclose(
        model.standardise("item.dense.rating", [spec["mean"] + spec["std"], None]), [1.0, np.nan], rtol=1e-6
    )
    with pytest.raises(serve.InputError, match="'user_id' is not a dense feature"):
        model.standardise("user_id", [1])
    rated = {**batch, "item.dense.rating": np.array([np.nan, 0.5, -1.0, np.nan], np.float32)}
    assert np.isfinite(model(rated)["logit"]).all()
    with pytest.raises(serve.InputError, match=r"feature 'item.dense.rating', row 2: inf is infinite"):
        model({**batch, "item.dense.rating": np.array([0, 0, np.inf, 0], np.float32)})
    # issue 38: finite float64 past float32 gave a NaN probability; a text to standardise, a raw ValueError
    with pytest.raises(serve.InputError, match=r"feature 'item.dense.rating', row 1: 1e\+308 is beyond float32's"):
        model({**batch, "item.dense.rating": np.array([0, 1e308, 0, 0], np.float64)})
    with pytest.raises(serve.InputError, match=r"'item.dense.rating', row 1: 'four' is not a number"):
        model.standardise("item.dense.rating", [4.5, "four"])
    with pytest.raises(serve.InputError, match=r"'item.dense.rating', row 0: 1e\+300 standardised is beyond float32"):
        model.standardise("item.dense.rating", [1e300])
    names = model.domains[:2]
    by_name = model({**batch, "domain": np.array(names * 2)})["logit"]
    by_row = model({**batch, "domain": np.array([0, 1, 0, 1], np.int32)})["logit"]
    np.testing.assert_array_equal(by_name, by_row)


def test_predict_writes_eval_s_scores_to_parquet_and_resumes_after_a_kill(run_dir, artifact, tmp_path):
    probs, _ = trainer_scores(run_dir, 512)
    out = tmp_path / "scores.parquet"
    predict.main(["--workdir", str(run_dir), "--out", str(out), "--part-rows", "512"])
    table = pq.read_table(out)
    assert table.column_names == ["row", "domain", "user_key", "query_key", "item_key", "score", "logit", "label"]
    np.testing.assert_array_equal(table["score"].to_numpy(), probs.astype(np.float32))
    result = json.loads((run_dir / "eval.json").read_text())
    domains, labels, scores = (table[c].to_numpy() for c in ("domain", "label", "logit"))  # AUC ranks logits
    domains = np.asarray(table["domain"].to_pylist())
    for name, m in result["domains"].items():
        assert metrics.auc(labels[domains == name], scores[domains == name]) == pytest.approx(m["auc"], abs=1e-12)
    dataset = trained.load(run_dir).dataset()
    raw = dataset.split("test")
    assert table["item_key"][3].as_py() == dataset.keys()["item_id"][int(raw["item_id"][3]) - 1]

    # killed after its first part; the same command again scores the second part only
    scorer = scoring.artifact_scorer(artifact, 256)
    calls = []

    def dying(text):
        score = scorer.bind(text)

        def call(batch):
            calls.append(1)
            if len(calls) == 3:
                raise KeyboardInterrupt
            return score(batch)

        return call

    resumed = tmp_path / "resumed.parquet"
    with pytest.raises(KeyboardInterrupt):
        scoring.predict(dataclasses.replace(scorer, bind=dying), dataset.root, "test", resumed, part_rows=512)
    assert [p.name for p in sorted((tmp_path / "resumed.parquet.parts").glob("part-*"))] == ["part-00000.parquet"]
    calls.clear()
    summary = scoring.predict(dataclasses.replace(scorer, bind=dying), dataset.root, "test", resumed, part_rows=512)
    assert summary["parts_reused"] == 1 and len(calls) == 2 and not (tmp_path / "resumed.parquet.parts").exists()
    np.testing.assert_array_equal(pq.read_table(resumed)["score"].to_numpy(), probs.astype(np.float32))
    with pytest.raises(SystemExit):  # an artifact carries no dataset
        predict.main(["--artifact", str(artifact), "--out", str(tmp_path / "x.parquet")])


def test_predict_refuses_the_parts_of_another_job(run_dir, artifact, tmp_path):
    dataset = trained.load(run_dir).dataset()
    out = tmp_path / "s.parquet"
    (tmp_path / "s.parquet.parts").mkdir()
    (tmp_path / "s.parquet.parts" / "job.json").write_text(json.dumps({"split": "valid"}))
    with pytest.raises(ValueError, match="holds the parts of another scoring job"):
        scoring.predict(scoring.artifact_scorer(artifact), dataset.root, "test", out)


def test_embeddings_are_what_the_network_reads(run_dir, tmp_path):
    embed.main(["--workdir", str(run_dir), "--out", str(tmp_path / "emb"), "--recall-queries", "20"])
    items, queries = (
        pq.read_table(tmp_path / "emb" / "items.parquet"),
        pq.read_table(tmp_path / "emb" / "queries.parquet"),
    )
    model = trained.load(run_dir)
    dataset = model.dataset()
    raw = dataset.split("test")
    keys = {t: dataset.keys()[t] for t in ("user_id", "query_id", "item_id")}
    item_at = {(d, k): i for i, (d, k) in enumerate(zip(items["domain"].to_pylist(), items["item_key"].to_pylist()))}
    query_at = {
        (d, u, q): i
        for i, (d, u, q) in enumerate(zip(*(queries[c].to_pylist() for c in ("domain", "user_key", "query_key"))))
    }
    item_vec, user_vec, query_vec = (
        embeddings.matrix(t[c]) for t, c in ((items, "vector"), (queries, "user_vector"), (queries, "query_vector"))
    )

    def key(table, i):
        return keys[table][int(raw[table][i]) - 1] if raw[table][i] else None

    rows = [0, 1, 2, 3, 17, 99]
    picked_items = [item_at[(model.domains[raw["domain"][i]], key("item_id", i))] for i in rows]
    picked_queries = [query_at[(model.domains[raw["domain"][i]], key("user_id", i), key("query_id", i))] for i in rows]
    fused = {"user": user_vec[picked_queries], "query": query_vec[picked_queries], "item": item_vec[picked_items]}
    domain = np.asarray(raw["domain"])[rows].astype(np.int32)
    # the network's share from the side vectors, the content match's as the dot product of the match vectors
    silent = {t: np.zeros((len(rows), model.text_dim), np.float32) for t in TEXTS}
    item_match, query_match = embeddings.matrix(items["match_vector"]), embeddings.matrix(queries["match_vector"])
    match = (query_match[picked_queries] * item_match[picked_items]).sum(1)
    assert np.abs(match).max() > 0  # the match is on by default (search domains: query and item texts)
    from_vectors = sr_model.from_sides(model.graphdef, model.params, {**fused, **silent}, domain) + match
    text = model.text_table()
    batch = {k: np.asarray(v)[rows] for k, v in raw.items()}
    logits, _ = sr_model.apply(model.graphdef, model.params, batch, sr_model.TextTable(*map(np.asarray, text)))
    np.testing.assert_allclose(from_vectors, logits, rtol=1e-5, atol=1e-6)
    first = picked_items[0]
    np.testing.assert_array_equal(
        embeddings.matrix(items["id_vector"])[first],
        rows_of.row_order(model.params["l0"]["id_tables"]["item"], 64, "strided")[items["item_row"][first].as_py()],
    )
    np.testing.assert_array_equal(
        embeddings.matrix(items["text_vector"])[first], np.asarray(text.pooled)[raw["item_text"][0]]
    )
    # the retrieval vector is the logit's slope along h_item at the domain's mean item
    k = int(domain[0])
    mean = item_vec[np.asarray(items["domain"].to_pylist()) == model.domains[k]].mean(0)
    direction = np.random.default_rng(0).standard_normal(mean.shape).astype(np.float32)
    direction /= np.linalg.norm(direction)
    q = picked_queries[0]

    def logit(h):
        sides = {"user": user_vec[q : q + 1], "query": query_vec[q : q + 1], "item": h[None]}
        sides |= {t: v[:1] for t, v in silent.items()}
        return float(sr_model.from_sides(model.graphdef, model.params, sides, np.array([k], np.int32))[0])

    eps = 1e-3  # the item vectors' scale is ~0.05: a small step keeps to the tangent
    slope = (logit(mean + eps * direction) - logit(mean - eps * direction)) / (2 * eps)
    assert slope == pytest.approx(
        float(embeddings.matrix(queries["retrieval_vector"])[q] @ direction), rel=1e-2, abs=1e-4
    )
    recall = json.loads((tmp_path / "emb" / "retrieval.json").read_text())
    better = [r["recall@10/retrieval_vector"] > 10 / r["items"] for r in recall.values()]
    assert len(recall) >= 5 and all(better)  # better than drawing 10 items at random, in every domain


def test_a_hashed_item_s_id_vector_is_the_row_the_model_reads(tmp_path):
    """With model.id_buckets the item table holds fewer rows than items: the exported id vector is the row an
    item's id hashes to, where the table stores it (the same lookup as the network's)."""
    workdir = tmp_path / "hashed"
    trainer.fit(config(model={"id_buckets": 16}, train={"epochs": 0.05, "eval_every": 0}), workdir)
    embed.main(["--workdir", str(workdir), "--out", str(tmp_path / "emb"), "--recall-queries", "2"])
    items = pq.read_table(tmp_path / "emb" / "items.parquet")
    model = trained.load(workdir)
    table = np.asarray(model.params["l0"]["id_tables"]["item"])
    vocab = model.model_meta.vocab["item_id"]
    assert vocab > 16 and table.shape[0] == 64  # 16 buckets, padded to the row multiple
    hashed = np.asarray(layers.hash_ids(jnp.asarray(items["item_row"].to_numpy()), vocab, 16))
    want = table[rows_of.position(hashed, table.shape[0], 64, "strided")]
    np.testing.assert_array_equal(embeddings.matrix(items["id_vector"]), want)


def test_safetensors_and_torch_names_round_trip_exactly(run_dir, tmp_path):
    model = trained.load(run_dir)
    convert.main(["to-safetensors", str(run_dir), str(tmp_path / "p.safetensors")])
    flat = load_file(str(tmp_path / "p.safetensors"))
    assert "l1.backbone.experts.layers.0.kernel" in flat
    back = unflatten({k.replace(".", "/"): v for k, v in flat.items()})
    chex.assert_trees_all_equal(back, model.params)
    convert.main(["to-torch", str(run_dir), str(tmp_path / "t.safetensors")])
    state = load_file(str(tmp_path / "t.safetensors"))
    assert {"dal_kernel", "experts.1", "id_tables.item", "sparse_proj.item_brand_kernel"} <= set(state)
    convert.main(
        ["from-torch", str(tmp_path / "t.safetensors"), "--like", str(run_dir), "--out", str(tmp_path / "back")]
    )
    back = trained.load(tmp_path / "back")
    chex.assert_trees_all_equal(back.params, model.params)
    # the calibration travels: in both files' metadata and in the params-only run folder
    for name in ("p.safetensors", "t.safetensors"):
        with safe_open(str(tmp_path / name), framework="numpy") as f:
            assert json.loads(f.metadata()["calibration"]) == model.calibration is not None
    assert back.calibration == model.calibration
    broken = {k: v for k, v in state.items() if k != "gate_bias"} | {
        "dal_bias": np.zeros(3, np.float32),
        "extra": state["gate_bias"],
    }
    with pytest.raises(CheckpointError) as e:
        interop.from_torch_state_dict(broken, model.params)
    assert "missing gate_bias (params/l2/gate/bias" in str(e.value) and "unknown entry extra" in str(e.value)
    assert "dal_bias (params/l1/adapter/proj/bias) has shape (3,)" in str(e.value)
    with pytest.raises(NotImplementedError, match="l1/backbone/shared"):
        interop.torch_name("l1/backbone/shared/layers/0/kernel")
    listing = convert.inspect(tmp_path / "t.safetensors")
    assert "torch state_dict" in listing and "| dal_kernel |" in listing


def test_the_committed_torch_reference_loads_into_the_jax_model():
    """tests/data/torch_sr_reference.npz was made by TorchSRModel in a torch environment
    (tests/data/make_torch_sr_reference.py): the name map, the shapes and the logits hold without torch."""
    with np.load(REPO / "tests" / "data" / "torch_sr_reference.npz") as ref:
        ref = {k: ref[k] for k in ref.files}
    state = {k[len("state/") :]: v for k, v in ref.items() if k.startswith("state/")}
    batch = {k[len("batch/") :]: v for k, v in ref.items() if k.startswith("batch/")}
    cfg = from_dict(ModelConfig, {**BEFORE_KEY["model"], **json.loads(str(ref["model_config"]))})  # as saved then
    meta = bench_meta(**json.loads(str(ref["meta"])))
    graphdef, like = sr_model.abstract(cfg, meta, ref["text"].shape[1])
    assert sorted(interop.torch_state_dict(jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), like))) == list(
        ref["module_keys"]
    )
    params = interop.from_torch_state_dict(state, like)
    logits, aux = sr_model.apply(graphdef, params, batch, sr_model.TextTable(ref["text"], ref["text"]))
    np.testing.assert_allclose(np.asarray(logits), ref["logits"], rtol=1e-5, atol=1e-5)
    assert float(aux["reg"]) == pytest.approx(float(ref["reg"]), rel=1e-4)
    again = interop.torch_state_dict(params)
    assert all(np.array_equal(again[k], v) for k, v in state.items()) and again.keys() == state.keys()


def test_a_bfloat16_params_only_folder_fine_tunes_and_inspects(run_dir, tmp_path):
    convert.main(["params", str(run_dir), str(tmp_path / "small"), "--dtype", "bfloat16"])
    model, small = trained.load(run_dir), trained.load(tmp_path / "small")
    expected = jax.tree.map(lambda v: np.asarray(v.astype(jax.numpy.bfloat16), np.float32), model.params)
    chex.assert_trees_all_equal(small.params, expected)

    def size(folder):
        return sum(p.stat().st_size for p in (folder / "checkpoints").rglob("*") if p.is_file())

    assert size(tmp_path / "small") < 0.25 * size(run_dir)  # no optimizer state (2x), 16 bits (2x), one step
    listing = convert.inspect(tmp_path / "small")
    assert "(params only)" in listing and "opt_state" not in listing
    assert "| params/l0/id_tables/item | (128, 32) | bfloat16 | L0 |" in listing
    cfg = config(train={"epochs": 1, "eval_every": 0}, finetune={"pretrained": str(tmp_path / "small")})
    result = trainer.fit(cfg, tmp_path / "tuned")
    assert result["mean_domain_auc"] > 0.5
    assert flatten(small.params).keys() == flatten(model.params).keys()


def test_evaluate_export_and_scoring_read_the_run_s_result_not_its_latest_step(run_dir, tmp_path):
    """A run that validated is judged by its best validated step: train.evaluate, export and predict use it."""
    import shutil

    from sr_jax.training.checkpoint import BestCheckpoint
    from train import evaluate

    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    latest = trained.load(copy, step=16).params
    other = jax.tree.map(np.copy, latest)
    other["l0"]["id_tables"]["item"][:] = 0.0  # another model: the ids' item aspect gone
    best = BestCheckpoint(copy / "best")
    best.save(17, other, score=2.0)  # a better validation score than any real one
    best.close()
    assert trained.load(copy).step == 17
    again = evaluate.main(["--workdir", str(copy), "--split", "test"])
    run = trainer.build_run(trained.load(copy).config, copy)
    assert again["mean_domain_auc"] == evaluation.evaluate(run.spec, other, "test")["mean_domain_auc"]
    assert again["mean_domain_auc"] != evaluation.evaluate(run.spec, latest, "test")["mean_domain_auc"]
    run.checkpointer.close()


def test_bench_export_writes_its_report(run_dir, tmp_path):
    from train import bench_export

    rows = bench_export.main(
        ["--workdir", str(run_dir), "--vocab", "300", "--batch", "64", "--repeats", "1", "--out", str(tmp_path)]
    )
    assert [(r["model"], r["dtype"]) for r in rows] == [
        ("run", "float32"),
        ("run", "bfloat16"),
        ("bench 300 rows/field", "float32"),
        ("bench 300 rows/field", "bfloat16"),
    ]
    for r in rows:
        assert r["trainer_predict_ex_s"] > 0 and r["exported_ex_s"] > 0 and r["served_end_to_end_ex_s"] > 0
    assert rows[1]["params_mib"] < 0.55 * rows[0]["params_mib"]
    assert "| bench 300 rows/field | bfloat16 |" in (tmp_path / "bench_export.md").read_text()
    assert not [p for p in tmp_path.iterdir() if p.is_dir()]  # the artifacts were scratch


def _tampered(artifact: Path, tmp_path: Path, how: str) -> Path:
    import shutil

    copy = tmp_path / how
    shutil.copytree(artifact, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    if how == "params":  # another export's parameters: one value changed
        with np.load(copy / "params.npz") as saved:
            arrays = {k: saved[k].copy() for k in saved.files}
        first = sorted(arrays)[0]
        arrays[first].reshape(-1)[0] += 1
        with open(copy / "params.npz", "wb") as f:
            np.savez(f, **arrays)
    elif how == "domains":  # two domain names swapped in the manifest
        manifest["domains"][0], manifest["domains"][1] = manifest["domains"][1], manifest["domains"][0]
        (copy / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    elif how == "range":  # an id range raised
        manifest["features"][1]["high"] = int(manifest["features"][1]["high"]) + 100
        (copy / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    elif how == "vocab":  # two keys swapped
        vocab = json.loads((copy / "vocab.json").read_text())
        keys = vocab["keys"]["item_id"]
        keys[0], keys[1] = keys[1], keys[0]
        (copy / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    return copy


@pytest.mark.parametrize("how, named", [
    ("params", "params.npz"), ("domains", "manifest.json"), ("range", "manifest.json"), ("vocab", "vocab.json"),
])  # fmt: skip
def test_a_tampered_artifact_is_refused_at_load_naming_the_file(artifact, tmp_path, how, named):
    """Every file is checked against the manifest's sha256 list, the manifest against its own digest: a swapped
    or edited file used to load and score wrong without an error (through serve.py and train.predict)."""
    from sr_jax.export import serve

    copy = _tampered(artifact, tmp_path, how)
    with pytest.raises(serve.ArtifactError, match=rf"{copy / named}: "):
        serve.load(copy)
    with pytest.raises(ValueError, match=rf"{copy / named}: .*exported"):  # the artifact's own serve.py's error
        scoring.artifact_scorer(copy)
    assert serve.load(copy, check_files=False).domains  # the documented way to skip the check


@pytest.mark.parametrize("manifest", [None, "{not json", b"\xff\xfe", "[1, 2]"])
def test_an_artifact_without_a_readable_manifest_is_named(artifact, tmp_path, manifest):
    """Issue 38: `serve.load` of an artifact whose manifest.json was missing or damaged raised raw tracebacks."""
    import shutil

    from sr_jax.export import serve

    copy = tmp_path / "copy"
    shutil.copytree(artifact, copy)
    if manifest is None:
        (copy / "manifest.json").unlink()
    else:
        (copy / "manifest.json").write_bytes(manifest if isinstance(manifest, bytes) else manifest.encode())
    for check_files in (True, False):
        with pytest.raises(serve.ArtifactError, match=rf"{re.escape(str(copy / 'manifest.json'))}: (missing|damaged)"):
            serve.load(copy, check_files=check_files)


def test_a_supplied_text_table_with_nan_rows_is_refused(artifact):
    from sr_jax.export import serve

    model = serve.load(artifact)
    pooled = np.asarray(model.text["pooled"], np.float32).copy()
    pooled[3, 0] = np.nan
    batch = {n: np.zeros((2, *f["shape"][1:]), np.int32) for n, f in model.features.items()}
    with pytest.raises(serve.InputError, match=r"text\['pooled'\], row 3: NaN or inf"):
        model(batch, {c: (pooled if c == "pooled" else np.asarray(model.text[c], np.float32)) for c in model.text})


def test_from_torch_refuses_a_flipped_byte_and_non_finite_values(run_dir, tmp_path):
    """A state_dict whose data changed after `to_torch` wrote it (one byte flipped) is refused naming the file,
    where it used to convert into a wrong parameter with exit 0; a NaN value is refused naming the tensor."""
    model = trained.load(run_dir)
    saved = tmp_path / "t.safetensors"
    convert.main(["to-torch", str(run_dir), str(saved)])
    data = bytearray(saved.read_bytes())
    data[-5] ^= 0x40  # inside the last tensor's bytes: the header still parses
    (tmp_path / "flipped.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"flipped.safetensors: the tensors differ from the digest"):
        interop.read_torch(tmp_path / "flipped.safetensors")
    state = interop.read_torch(saved)
    state["gate_bias"] = state["gate_bias"].copy()
    state["gate_bias"][0] = np.nan
    with pytest.raises(CheckpointError, match=r"gate_bias \(params/l2/gate/bias\) holds NaN or inf"):
        interop.from_torch_state_dict(state, model.params)


def test_the_artifact_scores_an_item_never_seen_from_its_raw_text(tmp_path):
    """The artifact carries the run's text encoder: the features it makes of a text equal the dataset's cached
    ones, and an example scored through them equals the same example scored through the cached row."""
    from sr_jax.data import synthetic
    from sr_jax.export import serve as served_module
    from test_text_encoder import _tiny_checkpoint
    from train import encode_text

    from helpers import TINY

    root = tmp_path / "ds"
    synthetic.generate(TINY, root)
    ckpt = _tiny_checkpoint(tmp_path / "tiny-bert")
    encode_text.main(["--data", str(root), "--encoder", str(ckpt)])
    cfg = config(TINY, data={"path": str(root), "text_encoder": str(ckpt)}, train={"epochs": 1})
    trainer.fit(cfg, tmp_path / "run")
    export.main(["--workdir", str(tmp_path / "run"), "--out", str(tmp_path / "served")])
    model = served_module.load(tmp_path / "served")
    assert model.manifest["encoder"]["name"] == "tiny-bert"
    dataset = trained.load(tmp_path / "run").dataset()
    scorer = scoring.artifact_scorer(tmp_path / "served")
    columns = scoring.model_columns(scorer, dataset, "test")
    has_text = np.flatnonzero(np.asarray(columns["item_text"]) >= 0)[:16]
    batch = {name: np.asarray(columns[name])[has_text] for name in model.features}
    texts = [dataset.texts()[r] for r in batch["item_text"]]
    cached = dataset.text_cache("tiny-bert")[0][batch["item_text"]]
    np.testing.assert_allclose(model.encode(texts)["pooled"], cached, atol=1e-5)
    table, rows = model.with_texts(texts)  # as if these items were new: rows after the table's
    assert rows.min() == len(model.text["pooled"])
    fresh = model({**batch, "item_text": rows}, text=table)["logit"]
    np.testing.assert_allclose(fresh, model(batch)["logit"], atol=1e-5)


def test_an_artifact_of_hashed_features_says_it_cannot_featurize(artifact):
    from sr_jax.export import serve as served_module

    model = served_module.load(artifact)
    assert model.manifest["encoder"] is None
    with pytest.raises(served_module.InputError, match="carries no text encoder"):
        model.encode(["a new item"])
