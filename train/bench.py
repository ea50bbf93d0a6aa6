"""Train-step throughput against PyTorch: `python -m train.bench [--batch B ..] [--vocab V ..] [--fields F]
[--dtype float32 bfloat16] [--update dense rowwise_adagrad lazy_adam] [--torch eager compile | --torch]
[--torch-update dense sparse_adam sparse_adagrad] [--out DIR] [overrides of configs/bench.py]`.

For every batch size x rows per field, times the full model's train step (configs/bench.py: 8 experts,
7 domains, 32-wide embeddings) in each dtype and embedding update: the median seconds per step after
warm-up, examples/s, compile time, peak device memory (XLA's estimate on CPU), and the same step fed by
the real input pipeline (end to end). Where torch is importable, the PyTorch reference of the same
network (sr_jax/bench/torch_reference.py) is timed in the same run: eager and compiled, with dense Adam and
with the sparse-gradient updates a PyTorch user would pick for large tables, in each dtype (bf16: autocast).
Every row is compared with the fastest PyTorch row of its batch size and table size.
Writes DIR/bench.json, DIR/bench.md and DIR/bench.png (examples/s against batch size), and prints the
table last.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import logging
import shlex
import sys
from pathlib import Path

import jax
import numpy as np

from sr_jax.bench import timing
from sr_jax.bench.world import ID_MODES, bench_meta, random_columns
from sr_jax.config import override
from sr_jax.experiments import report
from train import cli

log = logging.getLogger("sr_jax")


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, nargs="+", default=[4096])
    p.add_argument("--vocab", type=int, nargs="+", default=[100_000], help="rows per id field")
    p.add_argument("--fields", type=int, default=15, help="id fields: user, query, item ids + sparse fields")
    p.add_argument("--domains", type=int, default=7)
    p.add_argument("--dtype", nargs="+", default=["float32"], choices=["float32", "bfloat16"])
    p.add_argument("--update", nargs="+", default=["dense"], choices=["dense", "rowwise_adagrad", "lazy_adam"])
    p.add_argument(
        "--torch",
        nargs="*",
        default=["eager"],
        choices=["eager", "compile"],
        help="PyTorch modes to time where torch is importable (none: --torch with no value)",
    )
    p.add_argument(
        "--torch-update",
        nargs="+",
        default=["dense", "sparse_adam", "sparse_adagrad"],
        choices=["dense", "sparse_adam", "sparse_adagrad"],
        help="PyTorch table updates (sr_jax/bench/torch_reference.py)",
    )
    p.add_argument("--steps", type=int, default=20, help="steps per timed chunk")
    p.add_argument("--repeats", type=int, default=5, help="timed chunks (the median is reported)")
    p.add_argument("--text-dim", type=int, default=384)
    p.add_argument("--texts", type=int, default=10_000, help="rows of the text table")
    p.add_argument("--ids", default="uniform", choices=ID_MODES, help="how ids are drawn (sr_jax/bench/world.py)")
    p.add_argument("--out", default="runs/bench")
    p.add_argument("overrides", nargs="*", help="section.field=value on configs/bench.py")
    args = p.parse_args(argv)
    cli.setup()
    base = override(cli.config_from_name("bench"), args.overrides)
    has_torch = importlib.util.find_spec("torch") is not None
    device = f"{jax.devices()[0].device_kind} x{jax.device_count()} ({jax.default_backend()})"
    rows = []
    for vocab in args.vocab:
        meta = bench_meta(args.fields, vocab, args.domains, num_texts=args.texts)
        text = np.random.default_rng(1).standard_normal((meta.num_texts, args.text_dim)).astype(np.float32)
        for batch in args.batch:
            columns = random_columns(meta, 32 * batch, seed=0, ids=args.ids)
            common = dict(device=device, batch=batch, vocab=vocab, fields=args.fields, ids=args.ids, texts=args.texts)
            for dtype in args.dtype:
                setting = dataclasses.replace(
                    base,
                    data=dataclasses.replace(base.data, batch_size=batch),
                    model=dataclasses.replace(base.model, dtype=dtype),
                )
                for update in args.update:
                    cfg = dataclasses.replace(setting, train=dataclasses.replace(base.train, embedding_update=update))
                    log.info("sr-jax %s %s: batch %d, %d rows x %d fields", dtype, update, batch, vocab, args.fields)
                    result = timing.time_jax(cfg, meta, text, columns, args.steps, args.repeats)
                    joined = ", text joined on the host" if base.data.text_join == "host" else ""
                    rows.append(dict(impl=f"sr-jax {dtype} {update}{joined}", **common, **result))
                for mode in args.torch if has_torch else []:
                    for update in args.torch_update:
                        log.info("torch %s %s %s: batch %d, %d rows", dtype, mode, update, batch, vocab)
                        result = timing.time_torch(setting, meta, text, columns, args.steps, args.repeats, mode, update)
                        rows.append(dict(impl=f"torch {dtype} {mode} {update}", **common, **result))
    command = "python -m train.bench " + shlex.join(sys.argv[1:] if argv is None else argv)
    write_report(rows, Path(args.out), command, has_torch)
    return rows


def _cost(r: dict) -> str:
    """XLA's FLOPs and bytes per step and the rates achieved (sr-jax rows only)."""
    if "gflop_per_step" not in r:
        return " | | |"
    return (
        f"{r['gflop_per_step']:.2f} | {r['gb_per_step']:.3f} | {r['achieved_tflops']:.3f} | "
        f"{r['achieved_tb_per_s']:.3f}"
    )


def _setting(r: dict) -> tuple[int, int]:
    return r["batch"], r["vocab"]


def write_report(rows: list[dict], out: Path, command: str, has_torch: bool) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(rows, indent=2) + "\n")
    lines = [
        *report.header("Train-step throughput", command),
        f"Device: {rows[0]['device']}. Median of timed chunks after warm-up. `vs best torch`: examples/s over "
        "the fastest PyTorch row of the same batch and rows per field in the same run"
        + ("" if has_torch else " (torch is not importable here)")
        + ".",
        "",
        "| impl | batch | rows/field | step ms | examples/s | vs best torch | end to end ex/s | host pipeline ex/s "
        "| compile s | peak GiB | GFLOP/step | GB/step | TFLOP/s | TB/s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        best = max(
            (t["examples_per_s"] for t in rows if t["impl"].startswith("torch ") and _setting(t) == _setting(r)),
            default=None,
        )
        ratio = f"{r['examples_per_s'] / best:.2f}x" if best else ""
        peak = "" if r["peak_gib"] is None else f"{r['peak_gib']:.2f}" + (" (est.)" if r["peak_is_estimate"] else "")
        e2e = f"{r['end_to_end_examples_per_s']:,.0f}" if "end_to_end_examples_per_s" in r else ""
        host = f"{r['host_pipeline_examples_per_s']:,.0f}" if "host_pipeline_examples_per_s" in r else ""
        lines.append(
            f"| {r['impl']} | {r['batch']} | {r['vocab']:,} | {r['step_ms']:.2f} | {r['examples_per_s']:,.0f} | "
            f"{ratio} | {e2e} | {host} | {r['compile_s']:.1f} | {peak} | {_cost(r)} |"
        )
    table = "\n".join(lines)
    (out / "bench.md").write_text(table + "\n\n![examples/s against batch size](bench.png)\n")
    panels = {
        f"{vocab:,} rows per field": [
            dict(r, examples_per_s_mean=r["examples_per_s"], examples_per_s_std=0.0)
            for r in rows
            if r["vocab"] == vocab
        ]
        for vocab in dict.fromkeys(r["vocab"] for r in rows)
    }
    report.plot_lines(
        out / "bench.png",
        panels,
        "batch",
        "examples_per_s",
        ("impl",),
        xlabel="batch size",
        ylabel="examples/s",
        logx=True,
    )
    print(table)


if __name__ == "__main__":
    cli.interruptible(main)
