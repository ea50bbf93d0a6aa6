"""The benchmark: its world, its CLI and report, and (where torch is importable) that the PyTorch
reference computes the same network as sr-jax."""

import json

import jax
import numpy as np
import pytest

from sr_jax import model as sr_model
from sr_jax.bench.world import bench_meta, random_columns
from train.cli import config_from_name
from sr_jax.training.steps import loss_fn
from train import bench


def test_bench_world_has_the_requested_tables():
    meta = bench_meta(fields=15, vocab=1000, domains=7)
    assert len(meta.sparse_fields) == 12 and meta.num_domains == 7
    cols = random_columns(meta, 256)
    assert set(cols) == set(meta.columns())
    ids = [cols[c] for c in ("user_id", "query_id", "item_id")] + [cols[f.column] for f in meta.sparse_fields]
    assert all(x.min() >= 1 and x.max() < 1000 for x in ids)
    cfg = config_from_name("bench")
    _, params = sr_model.abstract(cfg.model, meta, 384)
    tables = jax.tree.leaves((params["l0"]["id_tables"], params["l0"]["sparse_tables"]))
    assert len(tables) == 15 and {t.shape for t in tables} == {(1024, 32)}  # 1000 rows padded to 64s


def test_bench_ids_can_be_skewed_as_real_traffic_is():
    meta = bench_meta(fields=3, vocab=10_000, domains=2)
    zipf = random_columns(meta, 20_000, ids="zipf")["item_id"]
    assert zipf.min() >= 1 and zipf.max() < 10_000 and np.mean(zipf == 1) > 0.1  # the head: id 1 the most frequent
    last = random_columns(meta, 20_000, ids="new-rows-last")["item_id"]
    assert last.min() >= 9_000 and last.max() < 10_000
    with pytest.raises(ValueError, match="'skewed': not one of"):
        random_columns(meta, 8, ids="skewed")


def test_bench_cli_writes_its_report(tmp_path, capsys):
    rows = bench.main(
        [
            "--batch",
            "64",
            "128",
            "--vocab",
            "200",
            "--fields",
            "5",
            "--domains",
            "3",
            "--steps",
            "2",
            "--repeats",
            "1",
            "--update",
            "dense",
            "--torch",
            "--text-dim",
            "16",
            "--out",
            str(tmp_path),
        ]
    )
    jax_rows = [r for r in rows if r["impl"].startswith("sr-jax")]
    assert len(jax_rows) == 2
    for r in jax_rows:
        assert r["examples_per_s"] > 0 and r["end_to_end_examples_per_s"] > 0 and r["compile_s"] > 0
        assert r["peak_gib"] > 0
    assert json.loads((tmp_path / "bench.json").read_text())[0]["batch"] == 64
    assert (tmp_path / "bench.png").stat().st_size > 0
    assert "| sr-jax float32 dense | 128 | 200 |" in (tmp_path / "bench.md").read_text()
    assert "| impl | batch |" in capsys.readouterr().out


def test_torch_reference_computes_the_same_network():
    torch = pytest.importorskip("torch", reason="the PyTorch reference runs only where torch is importable")
    from sr_jax.bench.torch_reference import TorchSRModel

    meta = bench_meta(fields=7, vocab=50, domains=3, num_texts=40)
    cfg = config_from_name("bench").model
    text = np.random.default_rng(0).standard_normal((40, 16)).astype(np.float32)
    graphdef, params = sr_model.init(cfg, meta, 16, seed=3)
    cols = random_columns(meta, 128, seed=1)
    cols["item_id"][:5] = 0  # missing aspects take the same path in both
    cols["query_text"][::3] = -1
    table = sr_model.TextTable(text, text)
    (loss, (metrics, _)), grads = jax.value_and_grad(loss_fn, argnums=1, has_aux=True)(
        graphdef, params, cols, table, cfg.reg_weight
    )
    reference = TorchSRModel(jax.tree.map(np.asarray, params), cfg, meta, text)
    batch = {k: torch.from_numpy(np.asarray(v, np.int64)) for k, v in cols.items()}
    logits, reg = reference(batch)
    np.testing.assert_allclose(
        logits.detach().numpy(), np.asarray(sr_model.apply(graphdef, params, cols, table)[0]), rtol=1e-4, atol=1e-5
    )
    np.testing.assert_allclose(float(reg.detach()), float(metrics["reg"]), rtol=1e-4, atol=1e-6)
    torch_loss = reference.loss(batch)
    torch_loss.backward()
    np.testing.assert_allclose(float(torch_loss), float(loss), rtol=1e-5)
    pairs = {
        "expert kernel": (reference.experts[1], grads["l1"]["backbone"]["experts"]["layers"][0]["kernel"]),
        "tower kernel": (reference.tower[3], grads["l2"]["tower"]["layers"][1]["kernel"]),
        "DAL kernel": (reference.dal_kernel, grads["l1"]["adapter"]["proj"]["kernel"]),
        "DAL gain": (reference.norm_scale, grads["l1"]["adapter"]["scale"]),
        "item table": (reference.id_tables["item"], grads["l0"]["id_tables"]["item"]),
        "aspect embedding": (reference.aspect_embedding["item"], grads["l1"]["gates"]["item"]["aspect_embedding"]),
    }
    for name, (torch_param, jax_grad) in pairs.items():
        np.testing.assert_allclose(torch_param.grad.numpy(), np.asarray(jax_grad), rtol=1e-3, atol=1e-6, err_msg=name)


def test_torch_sparse_updates_are_the_rules_they_name():
    """One step from the same parameters, against the dense model's clipped gradient g: SparseAdam moves each
    element a batch reads by lr * g / (|g| + eps / sqrt(1 - b2)) (torch adds eps before bias correction, Adam
    after), sparse Adagrad by lr * g / (|g| + eps), rows not read stay put, the other parameters take the same
    Adam step as the dense model's, and clipping counts sparse gradients as dense ones."""
    torch = pytest.importorskip("torch", reason="the PyTorch reference runs only where torch is importable")
    from sr_jax.bench.torch_reference import ADAGRAD_EPS, TorchSRModel, clip_grad_norm, train_step

    meta = bench_meta(fields=5, vocab=60, domains=3, num_texts=40)
    cfg = config_from_name("bench").model
    text = np.random.default_rng(0).standard_normal((40, 16)).astype(np.float32)
    params = jax.tree.map(np.asarray, sr_model.init(cfg, meta, 16, seed=3)[1])
    batch = {k: torch.from_numpy(np.asarray(v, np.int64)) for k, v in random_columns(meta, 64, seed=2).items()}
    lr, clip = 1e-2, 0.05  # a clip well under the gradient's norm, so clipping scales every step

    def stepped(update: str) -> TorchSRModel:
        model = TorchSRModel(params, cfg, meta, text, sparse=update != "dense")
        train_step(model, update, lr, clip)(batch)
        return model

    reference = TorchSRModel(params, cfg, meta, text)
    reference.loss(batch).backward()
    assert float(clip_grad_norm(list(reference.parameters()), clip)) > clip
    dense = stepped("dense")
    g = reference.id_tables["item"].grad.numpy()
    before = params["l0"]["id_tables"]["item"]
    read = np.unique(batch["item_id"].numpy())
    untouched = np.setdiff1d(np.arange(len(before)), read)
    for update, eps in (("sparse_adam", 1e-8 / np.sqrt(1 - 0.999)), ("sparse_adagrad", ADAGRAD_EPS)):
        model = stepped(update)
        after = model.id_tables["item"].detach().numpy()
        expected = before - lr * g / (np.abs(g) + eps)
        np.testing.assert_allclose(after[read], expected[read], rtol=1e-5, atol=1e-7, err_msg=update)
        np.testing.assert_array_equal(after[untouched], before[untouched])
        tables = {id(t) for t in model.tables()}
        for (name, a), b in zip(model.named_parameters(), dense.parameters()):
            if id(a) not in tables:
                np.testing.assert_allclose(a.detach().numpy(), b.detach().numpy(), rtol=1e-5, err_msg=name)


def test_bench_input_times_a_fresh_start_on_a_split_written_in_chunks(tmp_path):
    from pathlib import Path

    from sr_jax.data.store import VALIDATED, open_dataset
    from train import bench_input

    repo = Path(__file__).resolve().parents[1]
    out = tmp_path / "startup.json"
    args = ["--rows", "5000", "--chunk-rows", "1500", "--dataset", str(tmp_path / "ds"), "--seconds", "0.2"]
    result = bench_input.main(
        [*args, "--baseline-src", str(repo), "--cores", "0", "--out", str(out), "data.batch_size=256"]
    )
    assert [(r["code"], r["what"]) for r in result["results"]] == [
        ("this", "write (chunks, validated once)"),
        ("baseline", "first start"),
        ("baseline", "later start"),
        ("this", "start"),
    ]
    for r in result["results"][1:]:
        assert (
            0 < r["open_s"] <= r["first_batch_s"]
            and r["examples_per_s"] > 0
            and r["heap_peak_gib"] > 0
            and r["anon_gib"] > 0
        )
    assert json.loads(out.read_text())["rows"] == 5000
    assert (tmp_path / "ds" / VALIDATED).exists() and open_dataset(tmp_path / "ds").meta.splits == {"train": 5000}


def test_bench_input_times_the_host_text_join(tmp_path):
    """`--texts N`: the batches also timed with their text vectors joined from an N-row table; `spread` sends a
    batch's text rows all over that table and keeps -1 (no text) as it is."""
    from train import bench_input

    tiny = [f"data.synthetic.{k}={v}" for k, v in (("num_users", 60), ("num_items", 120), ("train_examples", 4096))]
    out = tmp_path / "input.json"
    result = bench_input.main(["--seconds", "0.2", "--cores", "0", "--texts", "5000", "--out", str(out),
                               "data.batch_size=256", "data.text_encoder=hashed-bow", *tiny])  # fmt: skip
    assert result["texts"] == 5000 and result["text_dim"] == 64
    assert 0 < result["joined_to_device_examples_per_s"] and 0 < result["host_joined_examples_per_s"]
    assert json.loads(out.read_text()) == result
    rows = np.array([[-1, 0, 1, 7]])
    spread = bench_input.spread({"item_text": rows, "label": rows}, 5000)
    assert spread["item_text"][0, 0] == -1 and len(set(spread["item_text"][0, 1:])) == 3
    assert (spread["item_text"] < 5000).all() and spread["label"] is rows
