"""Batches straight from a split's columnar arrays: shuffled by epoch, fixed size, resumable at any step.

The order is a pure function of (seed, epoch), so the data position of a run is its step count: a run
resumed at step s reads exactly the batches an uninterrupted run reads from step s on. A batch is a
dict of numpy arrays (one fancy-index per column, no per-example Python); `prefetch_to_device` moves
batches to the mesh in a background thread, a few steps ahead of the train step. With `data.text_join=host`
`join_texts` adds each example's text vectors from the frozen text table there too, so the device never holds
the table.

A split up to `window` rows (`data.shuffle_window`) is shuffled whole. A bigger one streams: its rows are
cut into blocks of window / 64 consecutive rows, the blocks are shuffled, and every 64 blocks in that
order (a window) are shuffled together, one window at a time. Memory is O(window + blocks), not O(rows):
no host ever holds a permutation of the split, and a batch reads 64 runs of nearby rows (page-cache and
disk friendly) rather than rows from anywhere. Every host computes the same windows and reads only its
`process_slice` of each global batch.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator

import numpy as np

from sr_jax.config import DataConfig
from sr_jax.data.history import COLUMN as HISTORY


BLOCKS_PER_WINDOW = 64


class EpochOrder:
    """The rows of a split of `size` in the shuffled order of each epoch, read by position (module docstring).

    Window w of epoch e is the rows of blocks [64 w, 64 w + 64) of the epoch's block order, permuted by
    `default_rng([seed, e, w + 1])`; with one window (size <= window), the order is
    `default_rng([seed, e]).permutation(size)`: a split within one window keeps one full permutation per epoch,
    the order its earlier runs were trained in, so they replay."""

    def __init__(self, size: int, seed: int, window: int = DataConfig.shuffle_window):
        if window < BLOCKS_PER_WINDOW:
            raise ValueError(f"data.shuffle_window={window}: at least {BLOCKS_PER_WINDOW} rows")  # as config.validate
        self.size, self.seed, self.window = size, seed, window
        self.block = window // BLOCKS_PER_WINDOW
        self._epoch, self._starts, self._blocks = -1, np.zeros(2, np.int64), np.zeros(0, np.int64)
        self._cached: tuple[int, int, np.ndarray] | None = None  # (epoch, window, its rows)

    def _plan(self, epoch: int) -> None:
        """The epoch's block order and where each window starts: [windows + 1] positions."""
        if epoch == self._epoch:
            return
        self._epoch = epoch
        if self.size <= self.window:
            self._starts = np.array([0, self.size], np.int64)
            return
        num_blocks = -(-self.size // self.block)
        self._blocks = np.random.default_rng([self.seed, epoch]).permutation(num_blocks)
        sizes = np.minimum(self.block, self.size - self._blocks * self.block)  # the last block may be short
        ends = np.cumsum(sizes)[BLOCKS_PER_WINDOW - 1 :: BLOCKS_PER_WINDOW]
        self._starts = np.unique(np.concatenate([[0], ends, [self.size]]))

    def _window(self, epoch: int, w: int) -> np.ndarray:
        if self._cached is not None and self._cached[:2] == (epoch, w):
            return self._cached[2]
        if self.size <= self.window:
            rows = np.random.default_rng([self.seed, epoch]).permutation(self.size)
        else:
            ids = self._blocks[w * BLOCKS_PER_WINDOW : (w + 1) * BLOCKS_PER_WINDOW]
            ranges = [np.arange(b * self.block, min((b + 1) * self.block, self.size)) for b in ids]
            rows = np.random.default_rng([self.seed, epoch, w + 1]).permutation(np.concatenate(ranges))
        self._cached = (epoch, w, rows)
        return rows

    def rows(self, epoch: int, start: int, stop: int) -> np.ndarray:
        """The rows at positions [start, stop) of the epoch's order (0 <= start <= stop <= size)."""
        self._plan(epoch)
        parts = []
        while start < stop:
            w = int(np.searchsorted(self._starts, start, side="right")) - 1
            lo, hi = self._starts[w], self._starts[w + 1]
            parts.append(self._window(epoch, w)[start - lo : min(stop, hi) - lo])
            start = min(stop, int(hi))
        return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def rows_read(size: int, batch_size: int, seed: int, steps: int, window: int = DataConfig.shuffle_window) -> np.ndarray:
    """[size] bool: the rows the first `steps` batches of a `BatchIterator` over `size` rows read (the epoch order
    is a function of the seed and the epoch, so this is known without the data)."""
    order, per_epoch = EpochOrder(size, seed, window), size // batch_size
    read = np.zeros(size, bool)
    epochs, rest = divmod(steps, per_epoch)
    for epoch in range(epochs + 1):
        read[order.rows(epoch, 0, (per_epoch if epoch < epochs else rest) * batch_size)] = True
        if read.all():
            break
    return read


class BatchIterator:
    """Global batches of `batch_size` rows; this process reads `process_slice` of each (multi-host: every
    process its own part of the same global batch, so the data a run sees does not depend on the process
    count). `window`: rows shuffled together (`EpochOrder`)."""

    def __init__(
        self,
        columns: dict[str, np.ndarray],
        batch_size: int,
        seed: int,
        start_step: int = 0,
        process_slice: slice = slice(None),
        window: int = DataConfig.shuffle_window,
    ):
        self.columns, self.process_slice = columns, process_slice
        self.size = len(next(iter(columns.values())))
        if batch_size > self.size:
            raise ValueError(f"batch size {batch_size} is larger than the split ({self.size} examples)")
        self.batch_size, self.step = batch_size, start_step
        self.steps_per_epoch = self.size // batch_size  # the remainder of each epoch is dropped
        self.order = EpochOrder(self.size, seed, window)

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        epoch, k = divmod(self.step, self.steps_per_epoch)
        batch = np.sort(self.order.rows(epoch, k * self.batch_size, (k + 1) * self.batch_size))  # sequential reads
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


def map_batches(fn: Callable, columns: dict[str, np.ndarray], batch_size: int):
    """`fn` over the whole split in order, in padded batches of `batch_size` (`sequential_batches`): each
    result (an array [batch_size, ...] or a dict of them) cut to the batch's real rows, then concatenated. The
    one loop that scores a split: evaluation, the alignment reference, embeddings and batch scoring."""
    parts = []
    for batch, n in sequential_batches(columns, batch_size):
        out = fn(batch)
        parts.append({k: np.asarray(v)[:n] for k, v in out.items()} if isinstance(out, dict) else np.asarray(out)[:n])
    if parts and isinstance(parts[0], dict):
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    return np.concatenate(parts)


TEXT_COLUMNS = ("query_text", "item_text", HISTORY)  # the columns that hold text rows (-1: none)


def joined(column: str, part: str) -> str:
    """The batch column holding `column`'s text vectors from the text cache's `part` (pooled | summary)."""
    return f"{column}:{part}"


def join_texts(rows: dict[str, np.ndarray], texts: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A host batch -> the same with every text column's vectors joined from the frozen text cache (`texts`: part
    -> [num_texts, t], e.g. a memory map): `joined(column, part)` [*rows[column].shape, t] float32, zeros where a
    row is -1. `data.text_join=host` puts this in the input pipeline: the device reads the vectors as inputs and
    holds no text table, so no text row crosses the network (the production practice for a frozen table)."""
    out = dict(rows)
    for column in (c for c in TEXT_COLUMNS if c in rows):
        at = np.asarray(rows[column])
        for part, table in texts.items():
            vectors = np.take(table, np.maximum(at, 0).reshape(-1), axis=0).astype(np.float32, copy=False)
            vectors = vectors.reshape(*at.shape, table.shape[1])
            vectors[at < 0] = 0.0
            out[joined(column, part)] = vectors
    return out


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
