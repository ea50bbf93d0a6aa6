"""Batches straight from a split's columnar arrays: shuffled by epoch, fixed size, resumable at any step.

The order is a pure function of (seed, epoch), so the data position of a run is its step count: a run
resumed at step s reads exactly the batches an uninterrupted run reads from step s on. A batch is a
dict of numpy arrays (one fancy-index per column, no per-example Python); `prefetch_to_device` moves
batches to the mesh in a background thread, a few steps ahead of the train step.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator

import numpy as np


class BatchIterator:
    """Global batches of `batch_size` rows; this process reads `process_slice` of each (multi-host: every
    process its own part of the same global batch, so the data a run sees does not depend on the process
    count)."""

    def __init__(
        self,
        columns: dict[str, np.ndarray],
        batch_size: int,
        seed: int,
        start_step: int = 0,
        process_slice: slice = slice(None),
    ):
        self.columns, self.process_slice = columns, process_slice
        self.size = len(next(iter(columns.values())))
        if batch_size > self.size:
            raise ValueError(f"batch size {batch_size} is larger than the split ({self.size} examples)")
        self.batch_size, self.seed, self.step = batch_size, seed, start_step
        self.steps_per_epoch = self.size // batch_size  # the remainder of each epoch is dropped
        self._epoch, self._order = -1, None

    def order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.size)

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        epoch, k = divmod(self.step, self.steps_per_epoch)
        if epoch != self._epoch:
            self._epoch, self._order = epoch, self.order(epoch)
        batch = np.sort(self._order[k * self.batch_size : (k + 1) * self.batch_size])  # sorted: sequential reads
        idx = batch[self.process_slice]
        self.step += 1
        return {name: np.take(col, idx, axis=0) for name, col in self.columns.items()}


class MixedBatches:
    """Global batches whose first rows come from `main` and the rest from `replay` (fine-tuning's replay of
    pretraining examples), each a full-batch BatchIterator of its own; this process reads `process_slice`
    of the joined batch. Epochs and the resumable position follow `main`."""

    def __init__(self, main: BatchIterator, replay: BatchIterator, process_slice: slice = slice(None)):
        self.main, self.replay, self.process_slice = main, replay, process_slice

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        a, b = next(self.main), next(self.replay)
        return {name: np.concatenate([a[name], b[name]])[self.process_slice] for name in a}


def sequential_batches(columns: dict[str, np.ndarray], batch_size: int) -> Iterator[tuple[dict[str, np.ndarray], int]]:
    """The whole split in order, for evaluation: (batch, number of real rows); the last batch is padded
    by repeating its final row so that every batch has the same shape."""
    size = len(next(iter(columns.values())))
    for start in range(0, size, batch_size):
        stop = min(start + batch_size, size)
        idx = np.minimum(np.arange(start, start + batch_size), size - 1)
        yield {name: np.asarray(col[idx]) for name, col in columns.items()}, stop - start


def prefetch_to_device(batches: Iterator, put: Callable, size: int) -> Iterator:
    """Runs `put` (host batch -> device batch) in a background thread, `size` batches ahead. Close the generator
    (`contextlib.closing`) when leaving early: the thread is then joined, never left mid-transfer at exit."""
    if size <= 0:
        yield from map(put, batches)
        return
    q: queue.Queue = queue.Queue(maxsize=size)
    stop = threading.Event()
    done = object()

    def offer(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def worker():
        try:
            for b in batches:
                if not offer(put(b)):
                    return
            offer(done)
        except BaseException as e:  # surfaced in the consumer
            offer(e)

    thread = threading.Thread(target=worker, daemon=True)
    thread.start()
    try:
        while (item := q.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:  # closed early (a stop, an error): the worker ends its transfer and exits before we go on
        stop.set()
        thread.join()
