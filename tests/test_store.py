"""The dataset store: round trip, atomic writes, and a named error for every kind of bad input."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from helpers import TINY
from sr_jax.data import synthetic
from sr_jax.data.schema import DatasetMeta
from sr_jax.data.store import DatasetError, open_dataset, validate, write_dataset, write_text_cache
from sr_jax.text import HashedBagOfWords, build_text_cache


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("store") / "clean"
    synthetic.generate(TINY, root)
    build_text_cache(root, HashedBagOfWords())
    return root


@pytest.fixture
def copy(clean, tmp_path) -> Path:
    dst = tmp_path / "ds"
    shutil.copytree(clean, dst)
    return dst


def test_round_trip_is_memory_mapped_and_exact(clean, tmp_path):
    ds = open_dataset(clean)
    cols = ds.split("train")
    assert isinstance(cols["item_id"], np.memmap)
    again = write_dataset(
        tmp_path / "again",
        _meta_without_caches(clean),
        ds.texts(),
        {s: {k: np.asarray(v) for k, v in ds.split(s).items()} for s in ds.meta.splits},
        ds.keys(),
    )
    for split in ds.meta.splits:
        for name, col in ds.split(split).items():
            np.testing.assert_array_equal(again.split(split)[name], col)
    assert again.texts() == ds.texts()
    assert ds.meta.text_caches["hashed-bow"].dim == ds.text_cache("hashed-bow")[0].shape[1]


def _meta_without_caches(root):
    meta = DatasetMeta.read(root)
    meta.text_caches = {}
    return meta


def _corrupt(root: Path, split: str, column: str, fn) -> Path:
    file = root / "splits" / split / f"{column}.npy"
    np.save(file, fn(np.load(file)))
    return file


def _set_row(row, value):
    def fn(a):
        a = a.copy()
        a[row] = value
        return a

    return fn


CASES = {
    "missing column": (lambda r: (r / "splits/train/item.brand.npy").unlink(), "item.brand", None, "missing column"),
    "extra column": (lambda r: np.save(r / "splits/train/bogus.npy", np.zeros(3)), "bogus", None, "not declared"),
    "wrong dtype": (lambda r: _corrupt(r, "train", "user_id", lambda a: a.astype(np.int64)), "user_id", None, "dtype"),
    "wrong length": (lambda r: _corrupt(r, "valid", "label", lambda a: a[:-1]), "label", None, "shape"),
    "id outside vocab": (lambda r: _corrupt(r, "train", "item_id", _set_row(17, 10_000)), "item_id", 17, "outside"),
    "negative id": (lambda r: _corrupt(r, "test", "user_id", _set_row(5, -3)), "user_id", 5, "outside"),
    "sparse value outside vocab": (
        lambda r: _corrupt(r, "train", "user.interests", _set_row(9, [1, 99, 0])),
        "user.interests",
        9,
        "outside",
    ),
    "label not 0/1": (lambda r: _corrupt(r, "train", "label", _set_row(3, 2)), "label", 3, "labels"),
    "undeclared domain": (lambda r: _corrupt(r, "train", "domain", _set_row(11, 8)), "domain", 11, "domains"),
    "text row out of range": (
        lambda r: _corrupt(r, "test", "item_text", _set_row(7, 10**6)),
        "item_text",
        7,
        "text table",
    ),
    "NaN feature": (lambda r: _corrupt_cache(r, 4, np.nan), "pooled", 4, "NaN"),
    "inf feature": (lambda r: _corrupt_cache(r, 6, np.inf), "pooled", 6, "inf"),
    "cache with missing rows": (
        lambda r: np.save(r / "text_cache/hashed-bow/first.npy", np.load(r / "text_cache/hashed-bow/first.npy")[:-3]),
        "first",
        None,
        "missing rows",
    ),
    "missing text": (lambda r: _replace_text(r, 12, ""), "text", 12, "missing text"),
    "text table too short": (lambda r: _drop_last_text(r), "text", None, "num_texts"),
    "empty split": (lambda r: _set_meta(r, lambda m: m["splits"].update(valid=0)), None, None, "empty"),
    "unknown task": (lambda r: _set_meta(r, lambda m: m["domains"][1].update(task="ads")), "domains", 1, "task"),
}


def _corrupt_cache(root, row, value):
    file = root / "text_cache/hashed-bow/pooled.npy"
    a = np.load(file)
    a[row, 0] = value
    np.save(file, a)


def _replace_text(root, row, text):
    lines = (root / "texts.jsonl").read_text().splitlines()
    lines[row] = json.dumps(text)
    (root / "texts.jsonl").write_text("\n".join(lines) + "\n")


def _drop_last_text(root):
    lines = (root / "texts.jsonl").read_text().splitlines()
    (root / "texts.jsonl").write_text("\n".join(lines[:-1]) + "\n")


def _set_meta(root, fn):
    meta = json.loads((root / "meta.json").read_text())
    fn(meta)
    (root / "meta.json").write_text(json.dumps(meta))


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_raises_an_error_naming_file_field_and_row(copy, case):
    corrupt, field, row, words = CASES[case]
    corrupt(copy)
    with pytest.raises(DatasetError) as info:
        validate(copy)
    err = info.value
    assert words in str(err), str(err)
    assert str(copy) in err.file
    assert err.field == field
    assert err.row == row
    if row is not None:
        assert f"row {row}" in str(err)


def test_failed_write_leaves_nothing_behind(clean, tmp_path):
    ds = open_dataset(clean)
    splits = {s: {k: np.asarray(v).copy() for k, v in ds.split(s).items()} for s in ds.meta.splits}
    splits["train"]["item_id"][3] = -5
    with pytest.raises(DatasetError, match="row 3"):
        write_dataset(tmp_path / "bad", _meta_without_caches(clean), ds.texts(), splits, ds.keys())
    assert list(tmp_path.iterdir()) == []


def test_text_cache_with_missing_rows_is_refused_and_keeps_the_old_cache(copy):
    before = np.load(copy / "text_cache/hashed-bow/pooled.npy")
    with pytest.raises(DatasetError, match="missing rows"):
        write_text_cache(copy, "hashed-bow", "x", before[:-2], before[:-2])
    np.testing.assert_array_equal(np.load(copy / "text_cache/hashed-bow/pooled.npy"), before)
    assert [p.name for p in (copy / "text_cache").iterdir()] == ["hashed-bow"]
    with pytest.raises(DatasetError, match="no text cache made by encoder 'minilm'"):
        open_dataset(copy).text_cache("minilm")


def test_a_validated_dataset_opens_without_reading_its_columns_until_a_file_changes(copy, monkeypatch):
    from sr_jax.data import store

    open_dataset(copy)  # validated in full, and stamped
    assert (copy / store.VALIDATED).exists()
    calls = []
    real = store.validate
    monkeypatch.setattr(store, "validate", lambda root: calls.append(root) or real(root))
    open_dataset(copy)
    assert calls == []  # the fingerprint matched: no column was read
    label = copy / "splits/train/label.npy"
    values = np.load(label)
    values[0] = 7  # not a label, and the file's time changes
    np.save(label, values)
    with pytest.raises(DatasetError, match=r"label.npy, field 'label', row 0"):
        open_dataset(copy)
    assert len(calls) == 1


def test_a_dataset_is_validated_when_written_and_opened_by_its_fingerprint_alone(clean, tmp_path, monkeypatch):
    """Validation runs once, at write time (in chunks of rows); opening checks the stamp, and adding a text
    cache (validated itself) keeps it."""
    from sr_jax.data import store

    ds = open_dataset(clean)
    monkeypatch.setattr(store, "CHECK_ROWS", 7)  # many chunks, so chunking is what is tested
    splits = {s: {k: np.asarray(v) for k, v in ds.split(s).items()} for s in ds.meta.splits}
    root = tmp_path / "fresh"
    write_dataset(root, _meta_without_caches(clean), ds.texts(), splits, ds.keys())
    assert (root / store.VALIDATED).exists()
    monkeypatch.setattr(store, "validate", lambda root: pytest.fail(f"{root} validated again"))
    open_dataset(root)
    pooled, first = ds.text_cache("hashed-bow")
    write_text_cache(root, "hashed-bow", "fp", pooled, first)
    assert open_dataset(root).text_cache("hashed-bow")[0].shape == pooled.shape
    bad = np.array(pooled)
    bad[20, 3] = np.nan  # row 20: the third chunk of 7 rows
    with pytest.raises(DatasetError, match=r"pooled.npy, field 'pooled', row 20: NaN"):
        write_text_cache(root, "other", "fp", bad, first)


def test_a_bad_row_in_a_later_chunk_is_named_by_its_row(copy, monkeypatch):
    from sr_jax.data import store

    monkeypatch.setattr(store, "CHECK_ROWS", 16)
    _corrupt(copy, "train", "item_id", lambda a: np.where(np.arange(len(a)) == 37, -3, a))
    with pytest.raises(DatasetError, match=r"item_id.npy, field 'item_id', row 37: value -3 outside"):
        validate(copy)


def test_a_split_written_in_chunks_equals_the_split_written_whole(clean, tmp_path):
    from sr_jax.data.store import Chunks

    ds = open_dataset(clean)
    train = {k: np.asarray(v) for k, v in ds.split("train").items()}
    size = len(train["label"])
    parts = lambda step: ({k: v[i : i + step] for k, v in train.items()} for i in range(0, size, step))  # noqa: E731
    splits = {s: {k: np.asarray(v) for k, v in ds.split(s).items()} for s in ds.meta.splits}
    chunked = write_dataset(
        tmp_path / "chunked",
        _meta_without_caches(clean),
        ds.texts(),
        {**splits, "train": Chunks(size, parts(50))},
        ds.keys(),
    )
    assert chunked.meta.splits == ds.meta.splits
    for name, col in chunked.split("train").items():
        np.testing.assert_array_equal(col, train[name])
    with pytest.raises(ValueError, match=r"split 'train': .* rows written, .* declared"):
        write_dataset(
            tmp_path / "short",
            _meta_without_caches(clean),
            ds.texts(),
            {"train": Chunks(size + 1, parts(50))},
            ds.keys(),
        )
    wide = ({**p, "label": p["label"].astype(np.int64)} for p in parts(50))
    with pytest.raises(ValueError, match=r"split 'train', chunk 0 \(rows 0..49\), column 'label': int64"):
        write_dataset(
            tmp_path / "wide", _meta_without_caches(clean), ds.texts(), {"train": Chunks(size, wide)}, ds.keys()
        )
    assert not (tmp_path / "short").exists() and not (tmp_path / "wide").exists()
