"""Every GPU figure the docs ask for, in one call: `python -m train.bench_gpu [--out DIR] [--quick]`.

Made for a lent GPU machine's short window (docs/PERFORMANCE.md, "GPU"): in one process it runs

1. `train.bench` at 100k and 1M rows per field, batch 4096, float32 and bfloat16, dense / row-wise Adagrad /
   lazy Adam, with the PyTorch reference beside it (eager and compiled; dense Adam, SparseAdam, Adagrad) where
   torch is importable;
2. `train.bench` with 32 domains (K), row-wise Adagrad; and at 1M texts with each batch's text vectors joined on
   the host (`data.text_join=host`): its end-to-end column says whether the host and PCIe keep up with the step;
3. `train.bench_text`: MiniLM-L6 text encoding end to end and model-only;
4. `train.bench_scaling --compiled-on gpu`: the train step compiled for 1 GPU and for all local GPUs, its
   per-device work and projected examples/s beside the measured ones of 1;

each part's full report in DIR/<part>/, and prints one table of every headline figure last. A part that fails
is reported in the table with its error, and the others still run. `--quick`: fewer steps and sizes (a smoke
run, as the tests do on CPU).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import traceback
from pathlib import Path

from train import bench, bench_scaling, bench_text, cli


def parts(out: Path, quick: bool, gpus: int) -> dict[str, list[str]]:
    """part -> the argv of its entry point."""
    timing = ["--steps", "3", "--repeats", "2"] if quick else ["--steps", "20", "--repeats", "5"]
    vocab = ["1000"] if quick else ["100000", "1000000"]
    batch = ["256"] if quick else ["4096"]
    texts = ["--texts", "1000" if quick else "1000000"]  # a real catalogue's text table
    devices = ["1"] + ([str(gpus)] if gpus > 1 else [])
    return {
        "bench": [*timing, "--batch", *batch, "--vocab", *vocab, "--dtype", "float32", "bfloat16",
                  "--update", "dense", "rowwise_adagrad", "lazy_adam", "--torch", "eager", "compile",
                  "--torch-update", "dense", "sparse_adam", "sparse_adagrad", *texts, "--out", str(out / "bench")],
        "domains": [*timing, "--batch", *batch, "--vocab", vocab[0], "--domains", "32", "--update", "rowwise_adagrad",
                    "--torch", "--out", str(out / "domains")],
        "host-join": [*timing, "--batch", *batch, "--vocab", vocab[0], "--update", "rowwise_adagrad", *texts,
                      "--out", str(out / "host-join"), "data.text_join=host"],
        "text": ["--num-texts", "2000" if quick else "50000", "--repeats", "3" if quick else "20",
                 "--out", str(out / "text.json")],
        "scaling": ["--compiled-on", "gpu", "--devices", *devices, "--models", "default", "star", "--modes", "weak",
                    "--meshes", "data", *(["tables-routed"] if gpus > 1 else []), "--updates", "dense",
                    "--batch", batch[0], "--rows", vocab[0], *texts, "--out", str(out / "scaling")],
    }  # fmt: skip


def headline(part: str, rows: list[dict]) -> list[tuple[str, str, str]]:
    """(part, setting, figure) lines of one part's rows."""
    if part in ("bench", "domains", "host-join"):
        return [
            (part, f"{r['impl']}, batch {r['batch']}, {r['vocab']:,} rows/field", f"{r['examples_per_s']:,.0f} ex/s"
             + (f", {r['end_to_end_examples_per_s']:,.0f} end to end" if part == "host-join" else ""))
            for r in rows
        ]  # fmt: skip
    if part == "text":
        return [(part, f"{r['path']}, {r['length']}", f"{r['texts_per_s']:,.0f} texts/s") for r in rows]
    return [
        (part, f"{r['model']} {r['mesh']} D={r['devices']}: {r['flops_per_device'] / 1e9:.1f} GFLOP, "
         f"{r['bytes_per_device'] / 1e9:.2f} GB, {r['collective_bytes_per_device'] / 1e6:.1f} MB sent a device, "
         f"{r['kernels']} kernels",
         f"{r['projected_examples_per_s']['h100']:,.0f} ex/s projected (H100)")
        for r in rows
    ]  # fmt: skip


def main(argv: list[str] | None = None) -> list[tuple[str, str, str]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/bench-gpu")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--parts", nargs="+", default=["bench", "domains", "host-join", "text", "scaling"])
    args = p.parse_args(argv)
    cli.setup()
    import jax

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    entry = {"bench": bench.main, "domains": bench.main, "host-join": bench.main, "text": bench_text.main,
             "scaling": bench_scaling.main}  # fmt: skip
    device = f"{jax.devices()[0].device_kind} x{jax.device_count()} ({jax.default_backend()})"
    lines = []
    for part, part_argv in parts(out, args.quick, jax.device_count()).items():
        if part not in args.parts:
            continue
        try:
            lines += headline(part, entry[part](part_argv))
        except (Exception, SystemExit) as e:  # one broken part must not cost the window's other figures
            traceback.print_exc()
            lines.append((part, "failed: " + shlex.join(part_argv[:6]), f"{type(e).__name__}: {e}"[:200]))
    command = "python -m train.bench_gpu " + shlex.join(sys.argv[1:] if argv is None else argv)
    table = "\n".join(
        [f"# GPU figures: {device}", "", f"Made by `{command}`.", "", "| part | setting | figure |", "|---|---|---|"]
        + [f"| {a} | {b} | {c} |" for a, b, c in lines]
    )
    (out / "gpu.md").write_text(table + "\n")
    (out / "gpu.json").write_text(json.dumps({"device": device, "rows": lines}, indent=2) + "\n")
    print(table)
    return lines


if __name__ == "__main__":
    cli.interruptible(main)
