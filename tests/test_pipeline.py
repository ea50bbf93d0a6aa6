import numpy as np
import pytest

from sr_jax.data.pipeline import BatchIterator, prefetch_to_device, sequential_batches

N = 1000


def _cols():
    return {"x": np.arange(N, dtype=np.int32), "y": np.arange(N * 3, dtype=np.int32).reshape(N, 3)}


def test_epoch_is_a_shuffled_partition_and_rows_stay_aligned():
    it = BatchIterator(_cols(), 64, seed=0)
    assert it.steps_per_epoch == N // 64
    batches = [next(it) for _ in range(it.steps_per_epoch)]
    xs = np.concatenate([b["x"] for b in batches])
    assert len(np.unique(xs)) == len(xs) == 64 * (N // 64)
    assert not np.array_equal(xs, np.sort(xs))  # shuffled across batches
    for b in batches:
        np.testing.assert_array_equal(b["y"][:, 0], b["x"] * 3)
    second = np.concatenate([next(it)["x"] for _ in range(it.steps_per_epoch)])
    assert not np.array_equal(np.sort(xs), np.sort(second)) or not np.array_equal(xs, second)


def test_resume_at_any_step_reads_the_same_batches():
    full = BatchIterator(_cols(), 64, seed=3)
    reference = [next(full)["x"] for _ in range(40)]  # crosses two epoch boundaries
    for start in (0, 7, 15, 31):
        resumed = BatchIterator(_cols(), 64, seed=3, start_step=start)
        for k in range(start, 40):
            np.testing.assert_array_equal(next(resumed)["x"], reference[k])


def test_sequential_batches_pad_the_last_batch():
    out = list(sequential_batches(_cols(), 300))
    assert [n for _, n in out] == [300, 300, 300, 100]
    assert all(len(b["x"]) == 300 for b, _ in out)
    np.testing.assert_array_equal(np.concatenate([b["x"][:n] for b, n in out]), np.arange(N))


def test_prefetch_preserves_order_and_surfaces_errors():
    it = BatchIterator(_cols(), 64, seed=0)
    direct = [b["x"] for b, _ in zip(BatchIterator(_cols(), 64, seed=0), range(20))]
    fetched = [b["x"] for b, _ in zip(prefetch_to_device(it, lambda b: b, 3), range(20))]
    for a, b in zip(direct, fetched):
        np.testing.assert_array_equal(a, b)

    def failing():
        yield {"x": 1}
        raise RuntimeError("disk gone")

    with pytest.raises(RuntimeError, match="disk gone"):
        list(prefetch_to_device(failing(), lambda b: b, 2))


def test_batch_larger_than_split_is_refused():
    with pytest.raises(ValueError, match="larger than the split"):
        BatchIterator(_cols(), N + 1, seed=0)


def _positions(order, epoch, size):
    return order.rows(epoch, 0, size)


def test_a_split_within_the_window_is_shuffled_whole_as_before_streaming():
    from sr_jax.data.pipeline import EpochOrder

    order = EpochOrder(N, seed=5, window=N)
    for epoch in (0, 3):
        np.testing.assert_array_equal(_positions(order, epoch, N), np.random.default_rng([5, epoch]).permutation(N))


@pytest.mark.parametrize("size", [1000, 1003, 4096])  # 1003: the last block is short
def test_streaming_order_is_a_permutation_read_a_window_at_a_time(size):
    from sr_jax.data.pipeline import BLOCKS_PER_WINDOW, EpochOrder

    window = 128  # blocks of 2 rows, 64 per window
    order = EpochOrder(size, seed=1, window=window)
    whole = _positions(order, 0, size)
    np.testing.assert_array_equal(np.sort(whole), np.arange(size))
    assert not np.array_equal(whole, np.arange(size))
    assert not np.array_equal(whole, _positions(order, 1, size))  # each epoch its own order
    order.rows(0, 0, 0)
    starts = order._starts  # where each window of epoch 0 begins in its order
    assert len(starts) - 1 == -(-size // window)
    for lo, hi in zip(starts[:-2], starts[1:-1]):  # every window but the last: all rows of 64 whole blocks
        blocks = whole[lo:hi] // order.block
        assert len(np.unique(blocks)) == BLOCKS_PER_WINDOW and hi - lo == len(np.unique(whole[lo:hi]))
    rng = np.random.default_rng(0)
    for _ in range(20):  # any range of positions, read fresh, is the same rows (what resuming relies on)
        a = int(rng.integers(0, size))
        b = int(rng.integers(a, size + 1))
        np.testing.assert_array_equal(EpochOrder(size, seed=1, window=window).rows(0, a, b), whole[a:b])


def test_streaming_a_200m_row_split_needs_no_memory_proportional_to_it():
    """No host holds a permutation of the split: positions at the end of an epoch of 200M rows come from
    one window's permutation (1M rows) and the block order (12k blocks), in well under 64 MB."""
    import tracemalloc

    from sr_jax.data.pipeline import EpochOrder

    size = 200_000_000
    tracemalloc.start()
    rows = EpochOrder(size, seed=0).rows(7, size - 5000, size)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert len(np.unique(rows)) == 5000 and rows.min() >= 0 and rows.max() < size
    assert peak < 64 * 2**20, f"{peak / 2**20:.0f} MiB"


def test_streamed_batches_resume_and_split_across_processes():
    """With a window smaller than the split: resuming at any step reads the batches an uninterrupted run
    reads, and two processes' slices of each global batch are that batch."""
    size = 3001
    cols = {"x": np.arange(size, dtype=np.int64)}
    full = BatchIterator(cols, 100, seed=2, window=256)
    reference = [next(full)["x"] for _ in range(65)]  # two epoch boundaries (30 steps an epoch)
    seen = np.concatenate(reference[:30])
    assert len(np.unique(seen)) == 3000
    for start in (0, 11, 29, 30, 47):
        resumed = BatchIterator(cols, 100, seed=2, start_step=start, window=256)
        halves = [
            BatchIterator(cols, 100, seed=2, start_step=start, window=256, process_slice=s)
            for s in (slice(0, 50), slice(50, 100))
        ]
        for k in range(start, 65):
            np.testing.assert_array_equal(next(resumed)["x"], reference[k])
            np.testing.assert_array_equal(np.concatenate([next(h)["x"] for h in halves]), reference[k])
