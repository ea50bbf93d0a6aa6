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
