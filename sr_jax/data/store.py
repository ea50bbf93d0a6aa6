"""The dataset store: a folder of `meta.json`, a text table and one `.npy` file per column and split.

    DIR/meta.json                         DatasetMeta
    DIR/texts.jsonl                       one JSON string per line: the text table
    DIR/keys.json                         {table: [raw key of row 1, row 2, ...]} for every id table
    DIR/splits/SPLIT/COLUMN.npy           one array per column, read with memory mapping
    DIR/text_cache/ENCODER/{pooled,first}.npy   [num_texts, dim] float32 per text encoder

Every write goes to a temporary sibling and is renamed into place only after it validates, so a
reader never sees a half-written dataset. Validation runs once, when the dataset is written (in chunks of
rows: memory does not grow with the split), and leaves `DIR/.validated`, the fingerprint of the files it
checked; `open_dataset` then checks only that fingerprint (paths, sizes, modification times), and validates
in full only a dataset that changed or was never stamped. Bad data raises a `DatasetError` naming the file,
the field and the first bad row. A split bigger than memory is written chunk by chunk (`Chunks`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np

from sr_jax.data.schema import FORMAT_VERSION, ID_FIELDS, SPARSE_SIDES, TASKS, TEXT_FIELDS, DatasetMeta, TextCache
from sr_jax import io
from sr_jax.io import atomic_file


KEYS = "keys.json"
CHECK_ROWS = 1 << 22  # rows of a column (or text cache) checked at a time


class DatasetError(ValueError):
    """Malformed dataset: the message names the file, the field and the row."""

    def __init__(self, file: str | Path, field: str | None, row: int | None, problem: str):
        where = [str(file)]
        if field is not None:
            where.append(f"field {field!r}")
        if row is not None:
            where.append(f"row {row}")
        super().__init__(f"{', '.join(where)}: {problem}")
        self.file, self.field, self.row = str(file), field, row


def _first(bad: np.ndarray) -> int:
    return int(np.flatnonzero(bad.reshape(bad.shape[0], -1).any(axis=1))[0])


def column_chunks(a: np.ndarray, rows: int = 0) -> Iterator[tuple[int, np.ndarray]]:
    """(first row, the rows from it) of a (memory-mapped) column, `rows` (default CHECK_ROWS) at a time: a pass
    over a split that needs no memory proportional to it."""
    step = rows or CHECK_ROWS
    for start in range(0, len(a), step):
        yield start, np.asarray(a[start : start + step])


def _check_rows(file: Path, field: str, a: np.ndarray, is_bad: Callable, problem: Callable) -> None:
    """Raises the DatasetError of `a`'s first row where `is_bad(rows)` holds, `problem(its value)` saying why;
    in chunks (`column_chunks`)."""
    for start, part in column_chunks(a):
        bad = is_bad(part)
        if bad.any():
            row = _first(bad)
            raise DatasetError(file, field, start + row, problem(part[row]))


def _check_range(file: Path, field: str, a: np.ndarray, lo: int, hi: int, what: str) -> None:
    _check_rows(
        file, field, a, lambda v: (v < lo) | (v >= hi), lambda v: f"value {v.tolist()} outside {what} [{lo}, {hi})"
    )


class Dataset:
    """A dataset opened from the store; columns are memory-mapped, not loaded."""

    def __init__(self, root: str | Path, meta: DatasetMeta):
        self.root = Path(root)
        self.meta = meta

    def split(self, name: str) -> dict[str, np.ndarray]:
        if name not in self.meta.splits:
            raise DatasetError(
                self.root / "meta.json",
                "splits",
                None,
                f"no split {name!r}; the dataset has {sorted(self.meta.splits)}",
            )
        folder = self.root / "splits" / name
        return {c: np.load(folder / f"{c}.npy", mmap_mode="r") for c in self.meta.columns()}

    def texts(self) -> list[str]:
        return read_texts(self.root / "texts.jsonl")

    def keys(self) -> dict[str, list[str]]:
        """The raw key of every row of every id table: {table: keys of rows 1..n} (row 0 is "missing")."""
        return json.loads((self.root / KEYS).read_text(encoding="utf-8"))

    def text_cache_info(self, encoder: str, fingerprint: str | None = None) -> TextCache:
        """Which cache `encoder` made; an error if there is none, or if it came from other weights or
        settings than `fingerprint` (when given)."""
        info = self.meta.text_caches.get(encoder)
        if info is None:
            problem = f"no text cache made by encoder {encoder!r}; the dataset has {sorted(self.meta.text_caches)}"
            raise DatasetError(self.root / "meta.json", "text_caches", None, problem + " (build one first)")
        if fingerprint is not None and info.fingerprint != fingerprint:
            problem = f"the {encoder!r} cache was made by {info.fingerprint!r}, but this encoder is {fingerprint!r}"
            raise DatasetError(self.root / "meta.json", "text_caches", None, problem + ": rebuild the cache")
        return info

    def text_cache(self, encoder: str) -> tuple[np.ndarray, np.ndarray]:
        """(pooled, summary) [num_texts, dim] float32 arrays made by `encoder` (the summary token's vectors are
        stored as first.npy)."""
        self.text_cache_info(encoder)
        folder = self.root / "text_cache" / encoder
        return (_load(folder / "pooled.npy", "pooled"), _load(folder / "first.npy", "first"))


def _load(file: Path, field: str) -> np.ndarray:
    """A memory-mapped .npy; a DatasetError naming it when it is truncated or not an array."""
    try:
        return np.load(file, mmap_mode="r")
    except (ValueError, OSError, EOFError) as e:
        raise DatasetError(file, field, None, f"unreadable array (truncated or not .npy): {e}") from e


def read_texts(path: Path) -> list[str]:
    texts = []
    with open(path, "rb") as f:
        for row, raw in enumerate(f):
            try:
                text = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as e:
                raise DatasetError(path, "text", row, f"not UTF-8 text (byte {raw[e.start]:#x})") from e
            except json.JSONDecodeError as e:
                raise DatasetError(path, "text", row, f"not a JSON string: {e}") from e
            if not isinstance(text, str) or not text.strip():
                raise DatasetError(path, "text", row, f"missing text (got {text!r})")
            texts.append(text)
    return texts


def validate(root: str | Path) -> Dataset:
    """Checks every file of a dataset against its metadata; returns it opened."""
    root = Path(root)
    meta_file = root / "meta.json"
    if not meta_file.exists():
        raise DatasetError(meta_file, None, None, "missing: not a dataset folder")
    try:
        meta = DatasetMeta.read(root)
    except (json.JSONDecodeError, UnicodeDecodeError, TypeError, KeyError, AttributeError) as e:
        raise DatasetError(meta_file, None, None, f"unreadable metadata: {e}") from e
    _check_types(meta_file, meta)
    if meta.format_version != FORMAT_VERSION:
        raise DatasetError(
            meta_file,
            "format_version",
            None,
            f"version {meta.format_version}, this sr_jax reads version {FORMAT_VERSION} (which keeps every id "
            "table's raw keys): prepare the dataset again with python -m train.prepare",
        )
    for k, d in enumerate(meta.domains):
        if d.task not in TASKS:
            raise DatasetError(meta_file, "domains", k, f"task {d.task!r} is not one of {TASKS}")
    for kind, fields in (("sparse_fields", meta.sparse_fields), ("dense_fields", meta.dense_fields)):
        for k, f in enumerate(fields):
            if f.side not in SPARSE_SIDES:
                raise DatasetError(meta_file, kind, k, f"side {f.side!r} is not one of {SPARSE_SIDES}")
    for k, f in enumerate(meta.dense_fields):
        if not (np.isfinite(f.mean) and np.isfinite(f.std) and f.std > 0):
            raise DatasetError(
                meta_file, "dense_fields", k, f"{f.column}: mean {f.mean}, std {f.std} (std must be > 0)"
            )

    _validate_keys(root / KEYS, meta)
    texts = read_texts(root / "texts.jsonl")
    if len(texts) != meta.num_texts:
        raise DatasetError(
            root / "texts.jsonl", "text", None, f"{len(texts)} texts, but meta.json declares num_texts={meta.num_texts}"
        )
    for encoder, info in meta.text_caches.items():
        _validate_text_cache(root / "text_cache" / encoder, encoder, info, meta.num_texts)

    columns = meta.columns()
    ranges = {
        "domain": (0, meta.num_domains, "the declared domains"),
        **{f: (0, meta.vocab[f], "the vocab") for f in ID_FIELDS},
        **{f: (-1, meta.num_texts, "the text table (-1 = no text)") for f in TEXT_FIELDS},
        **{f.column: (0, f.vocab, "the vocab") for f in meta.sparse_fields},
        "label": (0, 2, "the labels {0, 1}"),
    }
    for split, size in meta.splits.items():
        folder = root / "splits" / split
        if size <= 0:
            raise DatasetError(folder, None, None, f"split {split!r} is empty")
        present = {p.stem for p in folder.glob("*.npy")} if folder.exists() else set()
        if missing := sorted(set(columns) - present):
            raise DatasetError(
                folder / f"{missing[0]}.npy", missing[0], None, f"missing column (all missing: {missing})"
            )
        if extra := sorted(present - set(columns)):
            raise DatasetError(folder / f"{extra[0]}.npy", extra[0], None, "column not declared by meta.json")
        for name, (dtype, row_shape) in columns.items():
            file = folder / f"{name}.npy"
            a = _load(file, name)
            if a.dtype != dtype:
                raise DatasetError(file, name, None, f"dtype {a.dtype}, expected {dtype}")
            if a.shape != (size, *row_shape):
                raise DatasetError(file, name, None, f"shape {a.shape}, expected {(size, *row_shape)}")
            if name in ranges:
                lo, hi, what = ranges[name]
                _check_range(file, name, a, lo, hi, what)
            elif dtype == np.float32:  # a dense field: a number, or NaN for missing
                _check_rows(file, name, a, np.isinf, lambda v: f"value {v} is infinite (NaN is missing)")
    return Dataset(root, meta)


def _check_types(file: Path, meta: DatasetMeta) -> None:
    """meta.json's fields have the types the store relies on (JSON would take a string for a number)."""

    def counts(value, keys=None) -> bool:
        return (
            isinstance(value, dict)
            and all(isinstance(k, str) and type(v) is int and v >= 0 for k, v in value.items())
            and (keys is None or set(value) == set(keys))
        )

    checks = {
        "name": isinstance(meta.name, str),
        "vocab": counts(meta.vocab, ID_FIELDS),
        "splits": counts(meta.splits),
        "num_texts": type(meta.num_texts) is int and meta.num_texts >= 0,
        "has_timestamp": isinstance(meta.has_timestamp, bool),
        "negatives_per_click": counts(meta.negatives_per_click),
        "sparse_fields": all(
            type(f.vocab) is int and type(f.max_len) is int and f.max_len >= 1 for f in meta.sparse_fields
        ),
        "dense_fields": all(
            isinstance(f.name, str) and all(type(x) in (int, float) for x in (f.mean, f.std)) for f in meta.dense_fields
        ),
    }
    for field, ok in checks.items():
        if not ok:
            raise DatasetError(file, field, None, f"wrong type or value {getattr(meta, field)!r}")


def _validate_keys(file: Path, meta: DatasetMeta) -> None:
    """keys.json: one list of distinct strings per id table, one key per row but row 0."""
    try:
        keys = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DatasetError(file, None, None, "missing: the raw keys of the id tables") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DatasetError(file, None, None, f"unreadable: {e}") from e
    tables = meta.tables()
    if not isinstance(keys, dict) or set(keys) != set(tables):
        found = sorted(keys) if isinstance(keys, dict) else type(keys).__name__
        raise DatasetError(file, None, None, f"tables {found}, expected {sorted(tables)}")
    for table, rows in tables.items():
        values = keys[table]
        if not isinstance(values, list) or len(values) != rows - 1:
            size = len(values) if isinstance(values, list) else type(values).__name__
            raise DatasetError(file, table, None, f"{size} keys, expected {rows - 1} (one per row but row 0)")
        if bad := [r for r, v in enumerate(values) if not isinstance(v, str)]:
            raise DatasetError(file, table, bad[0] + 1, f"key {values[bad[0]]!r} is not a string")
        if len(set(values)) != len(values):
            seen: dict[str, int] = {}
            row = next(r for r, v in enumerate(values) if seen.setdefault(v, r) != r)
            raise DatasetError(file, table, row + 1, f"key {values[row]!r} is also row {seen[values[row]] + 1}")


def _validate_text_cache(folder: Path, encoder: str, info: TextCache, num_texts: int) -> None:
    for part in ("pooled", "first"):
        file = folder / f"{part}.npy"
        if not file.exists():
            raise DatasetError(file, part, None, f"missing text cache file of encoder {encoder!r}")
        a = _load(file, part)
        if a.dtype != np.float32 or a.shape != (num_texts, info.dim):
            raise DatasetError(
                file,
                part,
                None,
                f"{a.dtype} {a.shape}, expected float32 {(num_texts, info.dim)} "
                f"(a cache with missing rows, or from another text table)",
            )
        _check_rows(file, part, a, lambda v: ~np.isfinite(v), lambda _: "NaN or inf feature")


VALIDATED = ".validated"  # the files' fingerprint when the dataset last passed `validate`


def _fingerprint(root: Path) -> str:
    """Every file's path, size and modification time (hidden files, such as locks and partial caches, aside)."""
    entries = [
        f"{p.relative_to(root)}:{p.stat().st_size}:{p.stat().st_mtime_ns}"
        for p in sorted(root.rglob("*"))
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
    ]
    return hashlib.sha256("\n".join(entries).encode()).hexdigest()


def open_dataset(root: str | Path, check: bool = True) -> Dataset:
    """Opens a dataset, validated: in full the first time (every column, O(rows)), then only by the
    fingerprint of its files, which `validate` records, so that a grid of runs on one dataset does not re-read
    it per run; any change to a file (a rewrite, a new cache) brings the full validation back. `check=False`
    skips both (e.g. a dataset just written)."""
    root = Path(root)
    if not check or _stamped(root):
        return Dataset(root, DatasetMeta.read(root))
    dataset = validate(root)
    _stamp(root)
    return dataset


def _stamped(root: Path) -> bool:
    """Whether the files are those `validate` last passed."""
    stamp = root / VALIDATED
    return stamp.exists() and stamp.read_text() == _fingerprint(root)


def _stamp(root: Path) -> None:
    """Records that the files as they are now passed `validate`."""
    with contextlib.suppress(OSError):  # a read-only, unstamped dataset is validated in full at every open
        with atomic_file(root / VALIDATED) as tmp:
            tmp.write_text(_fingerprint(root))


class Chunks(NamedTuple):
    """A split written chunk by chunk, for one bigger than memory: `size` rows in all, `parts` yields dicts of
    columns (the store's dtypes, `DatasetMeta.columns`) that add up to them."""

    size: int
    parts: Iterable[dict[str, np.ndarray]]


def _write_split(folder: Path, name: str, columns: dict[str, np.ndarray] | Chunks, meta: DatasetMeta) -> None:
    folder.mkdir(parents=True)
    if not isinstance(columns, Chunks):
        for column, a in columns.items():
            np.save(folder / f"{column}.npy", np.asarray(a))
        return
    declared = meta.columns()
    out = {
        c: np.lib.format.open_memmap(folder / f"{c}.npy", "w+", dtype, (columns.size, *shape))
        for c, (dtype, shape) in declared.items()
    }
    position = 0
    for k, part in enumerate(columns.parts):
        if set(part) != set(declared):
            raise ValueError(f"split {name!r}, chunk {k}: columns {sorted(part)}, expected {sorted(declared)}")
        n = len(part["label"])
        if position + n > columns.size:
            raise ValueError(f"split {name!r}, chunk {k}: rows beyond the declared {columns.size}")
        for c, a in part.items():
            if a.dtype != declared[c][0] or len(a) != n:
                raise ValueError(
                    f"split {name!r}, chunk {k} (rows {position}..{position + n - 1}), column {c!r}: "
                    f"{a.dtype} x {len(a)}, expected {declared[c][0]} x {n}"
                )
            out[c][position : position + n] = a
        position += n
    if position != columns.size:
        raise ValueError(f"split {name!r}: {position} rows written, {columns.size} declared")
    for a in out.values():
        a.flush()


def write_dataset(
    root: str | Path,
    meta: DatasetMeta,
    texts: list[str],
    splits: dict[str, dict[str, np.ndarray] | Chunks],
    keys: dict[str, list[str]],
    overwrite: bool = False,
) -> Dataset:
    """Writes, validates, then atomically renames a complete dataset into `root`, stamped as validated. A split
    is its columns, or `Chunks` of them. `keys`: the raw key of every row but 0 of every id table
    (`DatasetMeta.tables`). An existing dataset at `root` is replaced only with `overwrite`, and a folder that is
    not a dataset never (`io.claim`)."""
    root = Path(root)
    if root.exists() and not overwrite:
        raise FileExistsError(f"{root} exists (pass overwrite=True to replace it)")
    io.claim(root, io.DATASET, remedy="choose another folder")
    if meta.text_caches:
        raise ValueError("write the dataset without caches, then add them with write_text_cache")
    meta.splits = {name: c.size if isinstance(c, Chunks) else len(c["label"]) for name, c in splits.items()}
    meta.num_texts = len(texts)
    with io.atomic_dir(root, io.DATASET, validate) as tmp:
        (tmp / "meta.json").write_text(meta.to_json())
        (tmp / KEYS).write_text(json.dumps(keys, ensure_ascii=False), encoding="utf-8")
        with open(tmp / "texts.jsonl", "w", encoding="utf-8") as f:
            for text in texts:
                f.write(json.dumps(text) + "\n")
        for split, cols in splits.items():
            _write_split(tmp / "splits" / split, split, cols, meta)
    _stamp(root)
    return open_dataset(root, check=False)


def write_text_cache(root: str | Path, encoder: str, fingerprint: str, pooled: np.ndarray, first: np.ndarray) -> None:
    """Adds (or replaces) the text-feature cache of one encoder, atomically (validated; a dataset validated
    before stays so)."""
    root = Path(root)
    validated = _stamped(root)
    meta = DatasetMeta.read(root)
    info = TextCache(encoder=encoder, fingerprint=fingerprint, dim=int(pooled.shape[1]))
    check = lambda folder: _validate_text_cache(folder, encoder, info, meta.num_texts)  # noqa: E731
    with io.atomic_dir(root / "text_cache" / encoder, io.TEXT_CACHE, check, overwrite=True) as tmp:  # the dataset's
        np.save(tmp / "pooled.npy", np.asarray(pooled, np.float32))
        np.save(tmp / "first.npy", np.asarray(first, np.float32))
    meta.text_caches[encoder] = info
    with atomic_file(root / "meta.json") as tmp:
        tmp.write_text(meta.to_json())
    if validated:
        _stamp(root)
