"""Export benchmark: `python -m train.bench_export [--workdir RUN ...] [--vocab 1000000] --out DIR`.

For each run given (a trained model and its dataset's test split) and each bench world (`--vocab` rows per id
field, the bench network of configs/bench.py on 15 fields and 7 domains, random parameters and examples), in
float32 and bfloat16: the export's time, the artifact's size and load time, and the scoring throughput at one
batch size of (1) the trainer's predict step, (2) the exported function on device-resident inputs and (3)
`serve.py`'s model end to end (numpy in and out, with its input checks), all timed in this one process after
warm-up. Writes DIR/bench_export.json and DIR/bench_export.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

from sr_jax import model as sr_model
from sr_jax.bench.world import bench_meta, random_columns
from sr_jax.config import save_config
from sr_jax.data import vocabulary
from sr_jax.export import scoring, serving, trained
from sr_jax import sharding as shd
from sr_jax.training import records
from sr_jax.training.steps import make_predict_step
from train import cli


def bench_model(vocab: int, folder: Path, text_dim: int) -> tuple[trained.TrainedModel, sr_model.TextTable]:
    """A bench-world model with random parameters, written as a run folder's records (config, run_info, vocab)."""
    cfg = cli.config_from_name("bench")
    # random text features: no language model for the artifact to carry
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, text_encoder="hashed-bow"))
    meta = bench_meta(fields=15, vocab=vocab, domains=7, num_texts=10_000)
    keys = {t: tuple(str(i) for i in range(1, rows)) for t, rows in meta.tables().items()}
    vocab_ = vocabulary.Vocabulary(keys, tuple(meta.sparse_fields))
    folder.mkdir(parents=True, exist_ok=True)
    save_config(cfg, folder / "config.json")
    info = {
        "dataset": meta.name,
        "domains": [d.name for d in meta.domains],
        "trained_domains": [],
        "train_split": "",
        "text_encoder": "random",
        "text_fingerprint": "random",
        "pretrained": None,
    }
    (folder / "run_info.json").write_text(json.dumps(info))
    vocabulary.write(folder, vocab_)
    records.write_trained_rows(folder, {t: np.ones(vocab_.rows(t), bool) for t in vocab_.keys})  # every row "trained"
    model_meta = vocab_.model_meta(meta)
    graphdef, params = sr_model.init(cfg.model, model_meta, text_dim)
    text = np.random.default_rng(0).standard_normal((meta.num_texts, text_dim)).astype(np.float32)
    model = trained.TrainedModel(
        folder, cfg, info, vocab_, graphdef, jax.tree.map(np.asarray, params), 0, "latest", model_meta, text_dim
    )
    return model, sr_model.TextTable(text, text)


def examples_per_s(call, batch_size: int, repeats: int) -> float:
    jax.block_until_ready(call())  # warm-up: compile
    jax.block_until_ready(call())
    started = time.perf_counter()
    for _ in range(repeats):
        jax.block_until_ready(call())
    return repeats * batch_size / (time.perf_counter() - started)


def measure(
    name: str, model: trained.TrainedModel, text, columns: dict, batch: int, repeats: int, out: Path
) -> list[dict]:
    rows = []
    host = {f["name"]: np.asarray(columns[f["name"]][:batch]).astype(f["dtype"]) for f in serving.features(model)}
    mesh = shd.make_mesh(dataclasses.replace(model.config.mesh, data=1, model=1))
    params = jax.device_put(model.params)
    table = scoring.device_text_table(text)
    replicated = jax.tree.map(lambda _: shd.replicated(mesh), params)
    predict = make_predict_step(model.graphdef, mesh, replicated, len(model.domains))
    device_batch, calibrated = jax.device_put(host), jax.device_put(model.calibration_table())
    trainer_rate = examples_per_s(lambda: predict(params, device_batch, table, None, calibrated), batch, repeats)
    for dtype in serving.DTYPES:
        folder = out / f"{name}-{dtype}"
        platform = {"gpu": "cuda"}.get(jax.default_backend(), jax.default_backend())  # this machine's only
        manifest = serving.export(model, text, folder, dtype, platforms=(platform,))
        started = time.perf_counter()
        spec = importlib.util.spec_from_file_location(f"serve_{name}_{dtype}", folder / "serve.py")
        serve = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(serve)
        served = serve.load(folder)
        load_s = time.perf_counter() - started
        exported_rate = examples_per_s(lambda m=served: m._call(m.params, m.text, device_batch), batch, repeats)
        served_rate = examples_per_s(lambda m=served: m(host)["probability"], batch, repeats)
        sizes = {p.name: p.stat().st_size for p in folder.iterdir()}
        rows.append(
            {
                "model": name,
                "dtype": dtype,
                "parameters": manifest["params"]["count"],
                "export_s": manifest["export_seconds"],
                "artifact_mib": sum(sizes.values()) / 2**20,
                "params_mib": sizes["params.npz"] / 2**20,
                "vocab_mib": sizes["vocab.json"] / 2**20,
                "load_s": load_s,
                "batch": batch,
                "trainer_predict_ex_s": trainer_rate,
                "exported_ex_s": exported_rate,
                "served_end_to_end_ex_s": served_rate,
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    return rows


def markdown(rows: list[dict]) -> str:
    lines = [
        "| model | dtype | parameters | export s | artifact MiB (params, vocab) | load s | trainer predict ex/s "
        "| exported ex/s | served end to end ex/s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['dtype']} | {r['parameters']:,} | {r['export_s']:.1f} | {r['artifact_mib']:.1f} "
            f"({r['params_mib']:.1f}, {r['vocab_mib']:.1f}) | {r['load_s']:.2f} | {r['trainer_predict_ex_s']:,.0f} "
            f"| {r['exported_ex_s']:,.0f} ({r['exported_ex_s'] / r['trainer_predict_ex_s']:.2f}x) "
            f"| {r['served_end_to_end_ex_s']:,.0f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", nargs="*", default=[], help="trained runs to export (their dataset's test split)")
    p.add_argument("--vocab", type=int, nargs="*", default=[1_000_000], help="bench worlds: rows per id field")
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--out", default="runs/bench-export")
    args = p.parse_args(argv)
    cli.setup()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    with tempfile.TemporaryDirectory(dir=out) as scratch:
        for workdir in args.workdir:
            model = trained.load(workdir)
            columns = scoring.model_columns(scoring.run_scorer(model), model.dataset(), "test")
            rows += measure(
                Path(workdir).name, model, model.text_table(), columns, args.batch, args.repeats, Path(scratch)
            )
        for vocab in args.vocab:
            model, text = bench_model(vocab, Path(scratch) / f"bench-{vocab}", 384)
            columns = random_columns(bench_meta(fields=15, vocab=vocab, domains=7, num_texts=10_000), args.batch)
            rows += measure(
                f"bench {vocab:,} rows/field", model, text, columns, args.batch, args.repeats, Path(scratch)
            )
    (out / "bench_export.json").write_text(json.dumps(rows, indent=2) + "\n")
    table = markdown(rows)
    device = jax.devices()[0]
    (out / "bench_export.md").write_text(
        f"Device: {device.platform} ({device.device_kind}), jax {jax.__version__}\n\n{table}"
    )
    print(table)
    return rows


if __name__ == "__main__":
    cli.interruptible(main)
