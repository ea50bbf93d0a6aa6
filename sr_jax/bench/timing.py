"""Timing the train step: sr-jax's (compiled ahead, its memory checked) and the PyTorch reference's.

Both run the same schema, batch size and batches. A measurement is warm-up steps (excluded), then
`repeats` chunks of `steps` steps, each chunk ended by a device sync; the median seconds per step of
the chunks is reported. sr-jax is also timed end to end, fed by the real input pipeline (shuffled
batches from host columns, placed on the mesh by the background prefetcher), to show whether input
stalls the step.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import jax
import numpy as np

from sr_jax import model as sr_model
from sr_jax.bench.compiled import step_cost
from sr_jax.config import Config
from sr_jax.data.pipeline import BatchIterator, join_texts, prefetch_to_device
from sr_jax.data.schema import DatasetMeta
from sr_jax import sharding as shd
from sr_jax.training.program import build_program, compile_train_step
from sr_jax.training.restore import fresh_state
from sr_jax.training.spec import text_inputs

GiB = 1024**3


def host_batches(columns: dict[str, np.ndarray], batch_size: int, count: int = 8) -> list[dict[str, np.ndarray]]:
    """The first `count` batches of the columns: the fixed batches both implementations cycle through."""
    return [{k: v[i * batch_size : (i + 1) * batch_size] for k, v in columns.items()} for i in range(count)]


def median_step_seconds(run: Callable[[int], None], steps: int, repeats: int, warmup: int) -> float:
    """`run(n)` runs n steps and waits for the device; the median over `repeats` chunks of seconds/step."""
    run(warmup)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run(steps)
        times.append((time.perf_counter() - start) / steps)
    return statistics.median(times)


def peak_device_bytes() -> int | None:
    stats = jax.local_devices()[0].memory_stats()
    return int(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else None


def time_jax(
    cfg: Config, meta: DatasetMeta, text: np.ndarray, columns: dict[str, np.ndarray], steps: int, repeats: int
) -> dict:
    """sr-jax's train step on batches of `columns` (one device batch per step, cycled from 8). With
    data.text_join=host each batch's text vectors are joined on the host as training joins them (`join_texts`):
    in the end-to-end and host figures, not in the step's."""
    mesh = shd.make_mesh(cfg.mesh)
    bs = cfg.data.batch_size
    program = build_program(cfg, meta, text.shape[1], mesh, total_steps=1_000_000)
    table, joined = text_inputs(cfg, mesh, text, text)
    host = (lambda b: join_texts(b, joined)) if joined else (lambda b: b)  # noqa: E731
    put = lambda b: shd.to_global(host(b), shd.batch_sharding(mesh))  # noqa: E731
    batches = [put(b) for b in host_batches(columns, bs)]
    what = f"the benchmark at batch {bs}"
    compiled, estimate, compile_s = compile_train_step(program, batches[0], table, None, what)
    state = fresh_state(cfg, meta, text.shape[1], program)
    position = 0

    def run(n: int, feed=None) -> None:
        nonlocal state, position
        for _ in range(n):
            batch = next(feed) if feed is not None else batches[position % len(batches)]
            state, metrics = compiled(state, batch, table, None)
            position += 1
        jax.block_until_ready(metrics["loss"])

    seconds = median_step_seconds(run, steps, repeats, warmup=10)
    feed = prefetch_to_device(BatchIterator(columns, bs, seed=0), put, cfg.data.prefetch)
    end_to_end = median_step_seconds(lambda n: run(n, feed), steps, repeats, warmup=2)
    host_only = BatchIterator(columns, bs, seed=1)
    start = time.perf_counter()
    for _ in range(steps):
        host(next(host_only))
    host_seconds = (time.perf_counter() - start) / steps
    flops, bytes_accessed = step_cost(compiled)
    peak = peak_device_bytes()
    return {
        "step_ms": 1e3 * seconds,
        "examples_per_s": bs / seconds,
        "gflop_per_step": flops / 1e9,
        "gb_per_step": bytes_accessed / 1e9,
        "achieved_tflops": flops / seconds / 1e12,
        "achieved_tb_per_s": bytes_accessed / seconds / 1e12,
        "end_to_end_examples_per_s": bs / end_to_end,
        "host_pipeline_examples_per_s": bs / host_seconds,
        "compile_s": compile_s,
        "peak_gib": (peak or estimate.total) / GiB,
        "peak_is_estimate": peak is None,
    }


def time_torch(
    cfg: Config,
    meta: DatasetMeta,
    text: np.ndarray,
    columns: dict[str, np.ndarray],
    steps: int,
    repeats: int,
    mode: str,
    update: str,
) -> dict:
    """The PyTorch reference (`torch_reference`) eager or torch.compile'd (`mode`), with the table `update`
    a PyTorch user would pick (`torch_reference.UPDATES`), bf16 autocast where `cfg.model.dtype` is
    bfloat16; on the same batches, from the same parameters."""
    import torch

    from sr_jax.bench.torch_reference import TorchSRModel, train_step

    device = "cuda" if torch.cuda.is_available() else "cpu"
    bs = cfg.data.batch_size
    params = jax.tree.map(np.asarray, sr_model.init(cfg.model, meta, text.shape[1], seed=0)[1])
    model = TorchSRModel(params, cfg.model, meta, text, sparse=update != "dense").to(device)
    autocast = torch.bfloat16 if cfg.model.dtype == "bfloat16" else None
    step = train_step(model, update, cfg.train.learning_rate, cfg.train.grad_clip, autocast, mode == "compile")
    batches = [
        {k: torch.from_numpy(np.asarray(v, np.int64)).to(device) for k, v in b.items()}
        for b in host_batches(columns, bs)
    ]
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    start = time.perf_counter()
    step(batches[0])
    sync()
    first_s = time.perf_counter() - start
    position = 0

    def run(n: int) -> None:
        nonlocal position
        for _ in range(n):
            step(batches[position % len(batches)])
            position += 1
        sync()

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    seconds = median_step_seconds(run, steps, repeats, warmup=5)
    return {
        "step_ms": 1e3 * seconds,
        "examples_per_s": bs / seconds,
        "compile_s": first_s,
        "peak_gib": torch.cuda.max_memory_allocated() / GiB if device == "cuda" else None,
        "peak_is_estimate": False,
    }
