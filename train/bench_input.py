"""Input-pipeline throughput: `python -m train.bench_input [--seconds S] [--cores N] [overrides]`.

Times shuffled batches assembled from the memory-mapped columns (host only), then the same batches
placed on the mesh through the background prefetcher, and prints examples/s for both. Pinned to one
core by default, the figure the pipeline's target (1M examples/s) is stated for.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax

from sr_jax.config import override
from sr_jax.data.pipeline import BatchIterator, prefetch_to_device
from sr_jax import sharding as shd
from sr_jax.training.trainer import load_dataset
from train import cli


def throughput(batches, batch_size: int, seconds: float) -> float:
    next(batches)  # first batch: warm-up (page cache, first permutation)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        jax.block_until_ready(next(batches))
        n += 1
    return n * batch_size / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--cores", type=int, default=1, help="pin the process to this many cores (0: no pinning)")
    p.add_argument("--out", default=None, help="also write the results here as JSON")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    if args.cores:
        os.sched_setaffinity(0, set(sorted(os.sched_getaffinity(0))[: args.cores]))
    cfg = override(cli.config_from_name("default"), args.overrides)
    dataset = load_dataset(cfg.data)
    columns = dataset.split(cfg.data.train_split)
    bs = cfg.data.batch_size
    mesh = shd.make_mesh(cfg.mesh)
    host = throughput(BatchIterator(columns, bs, seed=0), bs, args.seconds)
    put = lambda b: shd.to_global(b, shd.batch_sharding(mesh))  # noqa: E731
    device = throughput(
        prefetch_to_device(BatchIterator(columns, bs, seed=0), put, cfg.data.prefetch), bs, args.seconds
    )
    result = {
        "batch_size": bs,
        "columns": len(columns),
        "cores": len(os.sched_getaffinity(0)),
        "backend": jax.default_backend(),
        "host_examples_per_s": host,
        "to_device_examples_per_s": device,
    }
    print(
        f"| path | examples/s |\n|---|---|\n| host batches ({result['cores']} core) | {host:,.0f} |\n"
        f"| + prefetch to {result['backend']} | {device:,.0f} |"
    )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    cli.interruptible(main)
