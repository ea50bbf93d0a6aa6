"""Input-pipeline throughput and start-up: `python -m train.bench_input [--seconds S] [--cores N]
[--rows N [--dataset DIR] [--chunk-rows C] [--baseline-src SRC]] [--out FILE] [overrides]`.

Without `--rows`: times shuffled batches assembled from the configured dataset's memory-mapped columns
(host only), then the same batches placed on the mesh through the background prefetcher. With `--texts N`, also
the batches with their text vectors joined on the host (`data.text_join=host`, `pipeline.join_texts`) from a
table of N random vectors as wide as the dataset's text features (each text row r read as row r x 2654435761
mod N, so a batch reads rows from all over the table, as a big catalogue's batch does), alone and then placed on
the mesh through the prefetcher, as training places them.

With `--rows N`: a synthetic split of N examples (the bench schema: user, query and item ids, two text
rows, domain, label; 25 bytes an example) is written to DIR chunk by chunk (`store.Chunks`; validated
once, at write time), then a fresh process opens it and reads batches, as a training start does: seconds
to open the dataset and to the first batch, then examples/s for `--seconds`; host memory as the peak of
the Python/numpy heap (tracemalloc) and, at the end, the process's anonymous memory and the column file pages
it has mapped (page cache: shared and reclaimable; the kernel maps whole large folios, so it exceeds what
was read). `--baseline-src` runs the same
probe against another source tree (e.g. a `git worktree` of an earlier commit): on the dataset as that
code's writer left it (no validation stamp, so its first open validates) and then stamped.

Pinned to `--cores` cores (1 by default: the figure the pipeline's target is stated for).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np

from sr_jax import sharding as shd
from sr_jax.bench.world import bench_meta, random_columns
from sr_jax.config import override
from sr_jax.data.pipeline import TEXT_COLUMNS, BatchIterator, join_texts, prefetch_to_device
from sr_jax.data.store import VALIDATED, Chunks, open_dataset, write_dataset
from sr_jax.featurized import load_dataset
from sr_jax.text import text_identity
from train import cli

log = logging.getLogger("sr_jax")

# A training start in a fresh process, with only the API every version of the store and pipeline has.
PROBE = """
import json, sys, time, tracemalloc
import sr_jax
from sr_jax.data.pipeline import BatchIterator
from sr_jax.data.store import open_dataset
path, batch_size, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
tracemalloc.start()
start = time.perf_counter()
columns = open_dataset(path).split("train")
opened = time.perf_counter() - start
batches = BatchIterator(columns, batch_size, seed=0)
next(batches)
first = time.perf_counter() - start
n, start = 0, time.perf_counter()
while time.perf_counter() - start < seconds:
    next(batches)
    n += 1
rate = n * batch_size / (time.perf_counter() - start)
with open("/proc/self/status") as f:
    status = {line.split(":")[0]: int(line.split()[1]) / 2**20 for line in f if line.startswith(("RssAnon", "RssFile"))}
print(json.dumps(dict(open_s=opened, first_batch_s=first, heap_peak_gib=tracemalloc.get_traced_memory()[1] / 2**30,
                      anon_gib=status["RssAnon"], file_pages_gib=status["RssFile"], examples_per_s=rate,
                      source=sr_jax.__file__)))
"""


def spread(batch: dict[str, np.ndarray], texts: int) -> dict[str, np.ndarray]:
    """A batch whose text rows point all over a table of `texts` rows (row r -> r x 2654435761 mod texts)."""
    out = dict(batch)
    for c in (c for c in TEXT_COLUMNS if c in batch):
        out[c] = np.where(batch[c] >= 0, batch[c].astype(np.int64) * 2654435761 % texts, -1)
    return out


def throughput(batches, batch_size: int, seconds: float) -> float:
    next(batches)  # first batch: warm-up (page cache, first window)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        jax.block_until_ready(next(batches))
        n += 1
    return n * batch_size / (time.perf_counter() - start)


def write_synthetic(root: Path, rows: int, chunk_rows: int) -> float:
    """A bench-schema dataset of `rows` train examples written chunk by chunk; the seconds it took."""
    meta = bench_meta(fields=3, vocab=100_000, domains=7, num_texts=1000)
    keys = {table: [f"{table}-{i}" for i in range(1, n)] for table, n in meta.tables().items()}
    sizes = [min(chunk_rows, rows - start) for start in range(0, rows, chunk_rows)]

    def parts():
        for k, size in enumerate(sizes):
            log.info("writing chunk %d of %d (%d rows)", k + 1, len(sizes), size)
            yield random_columns(meta, size, seed=k)

    start = time.perf_counter()
    texts = [f"text {i}" for i in range(meta.num_texts)]
    write_dataset(root, meta, texts, {"train": Chunks(rows, parts())}, keys)
    return time.perf_counter() - start


def probe(src: Path, dataset: Path, batch_size: int, seconds: float) -> dict:
    """PROBE in a fresh process importing sr_jax from `src` (its working directory)."""
    out = subprocess.run(
        [sys.executable, "-c", PROBE, str(dataset.absolute()), str(batch_size), str(seconds)],
        cwd=src,
        check=True,
        capture_output=True,
        text=True,
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    if not Path(result["source"]).resolve().is_relative_to(src.resolve()):
        raise RuntimeError(f"the probe imported sr_jax from {result['source']}, not from {src}")
    return result


def startup(args, bs: int) -> list[dict]:
    root = Path(args.dataset or f"runs/bench-input-{args.rows}")
    results = []
    if not root.exists():
        results.append(
            {
                "code": "this",
                "what": "write (chunks, validated once)",
                "seconds": write_synthetic(root, args.rows, args.chunk_rows),
            }
        )
    if (held := open_dataset(root).meta.splits["train"]) != args.rows:
        raise SystemExit(f"{root}: its train split has {held} rows, not --rows {args.rows} (pass another --dataset)")
    here = Path(__file__).resolve().parents[1]
    if args.baseline_src:
        (root / VALIDATED).unlink(missing_ok=True)  # as the baseline's writer left it
        results.append(
            {"code": "baseline", "what": "first start", **probe(Path(args.baseline_src), root, bs, args.seconds)}
        )
        results.append(
            {"code": "baseline", "what": "later start", **probe(Path(args.baseline_src), root, bs, args.seconds)}
        )
        (root / VALIDATED).unlink(missing_ok=True)
        open_dataset(root)  # what this code's writer leaves: validated and stamped
    results.append({"code": "this", "what": "start", **probe(here, root, bs, args.seconds)})
    return results


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--cores", type=int, default=1, help="pin the process to this many cores (0: no pinning)")
    p.add_argument("--rows", type=int, default=0, help="time start-up on a synthetic split of this many rows")
    p.add_argument("--dataset", default="", help="where that split is (written when missing)")
    p.add_argument("--chunk-rows", type=int, default=10_000_000)
    p.add_argument("--baseline-src", default="", help="a source tree to compare start-up with")
    p.add_argument("--texts", type=int, default=0, help="also time the host text join from a table of N texts")
    p.add_argument("--out", default=None, help="also write the results here as JSON")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    cli.setup()
    if args.cores:
        os.sched_setaffinity(0, set(sorted(os.sched_getaffinity(0))[: args.cores]))
    cfg = override(cli.config_from_name("default"), args.overrides)
    bs = cfg.data.batch_size
    cores = len(os.sched_getaffinity(0))
    if args.rows:
        rows = startup(args, bs)
        result = {"rows": args.rows, "batch_size": bs, "cores": cores, "results": rows}
        keys = ["seconds", "open_s", "first_batch_s", "heap_peak_gib", "anon_gib", "file_pages_gib"]
        lines = [
            "| code | what | seconds | open s | first batch s | heap peak GiB | anonymous GiB | file pages GiB "
            "| examples/s |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in rows:
            cells = " | ".join("" if r.get(k) is None else f"{r[k]:.2f}" for k in keys)
            rate = f"{r['examples_per_s']:,.0f}" if "examples_per_s" in r else ""
            lines.append(f"| {r['code']} | {r['what']} | {cells} | {rate} |")
        print("\n".join(lines))
    else:
        dataset = load_dataset(cfg.data)
        columns = dataset.split(cfg.data.train_split)
        mesh = shd.make_mesh(cfg.mesh)
        window = cfg.data.shuffle_window
        host = throughput(BatchIterator(columns, bs, seed=0, window=window), bs, args.seconds)
        put = lambda b: shd.to_global(b, shd.batch_sharding(mesh))  # noqa: E731
        batches = prefetch_to_device(BatchIterator(columns, bs, seed=0, window=window), put, cfg.data.prefetch)
        with contextlib.closing(batches):  # its thread joined before the next measurement
            device = throughput(batches, bs, args.seconds)
        result = {
            "batch_size": bs,
            "columns": len(columns),
            "cores": cores,
            "backend": jax.default_backend(),
            "host_examples_per_s": host,
            "to_device_examples_per_s": device,
        }
        lines = [
            f"| host batches ({cores} core) | {host:,.0f} |",
            f"| + prefetch to {result['backend']} | {device:,.0f} |",
        ]
        if args.texts:
            width = dataset.text_cache(text_identity(cfg.data.text_encoder)[0])[0].shape[1]
            table = {"pooled": np.random.default_rng(0).standard_normal((args.texts, width), np.float32)}
            spread_batches = lambda: (spread(b, args.texts) for b in BatchIterator(columns, bs, seed=0, window=window))  # noqa: E731
            rate = throughput((join_texts(b, table) for b in spread_batches()), bs, args.seconds)
            joined = prefetch_to_device(spread_batches(), lambda b: put(join_texts(b, table)), cfg.data.prefetch)
            with contextlib.closing(joined):
                placed = throughput(joined, bs, args.seconds)
            result.update(
                texts=args.texts,
                text_dim=width,
                host_joined_examples_per_s=rate,
                joined_to_device_examples_per_s=placed,
            )
            lines.append(f"| host batches + text vectors joined ({args.texts:,} x {width}) | {rate:,.0f} |")
            lines.append(f"| + prefetch to {result['backend']} | {placed:,.0f} |")
        print("| path | examples/s |\n|---|---|\n" + "\n".join(lines))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    cli.interruptible(main)
