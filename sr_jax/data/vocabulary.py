"""Vocabularies that travel: the raw keys behind every id table, and a dataset read through another run's
tables by key.

A dataset's ids are dense row numbers of its own (`keys.json` says which raw key each row stands for). A
model's tables have rows of their own too: a fresh run's are its dataset's; a run started from a
pretrained run (fine-tuning) keeps the pretrained rows, in their order, and appends one row per key the
pretrained run lacks (`extend`). Sparse fields match by name (`item.brand`): a field the pretrained run
lacks gets a table of its own, one the dataset lacks reads as missing (row 0, a zero column). Dense fields match
by name too: the model keeps the statistics it was trained with, and a dataset standardised with its own is
re-standardised with the model's (the same raw number reads the same); one the dataset lacks reads as missing
(NaN). The dataset's columns are remapped on the host to the model's rows when a run loads them
(`RowMap.remap`).

Every run writes its tables' keys (`vocab.json`) beside its checkpoints, so the runs started from it
read them without its dataset.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from sr_jax.data.schema import ID_FIELDS, DatasetMeta, DenseField, DenseOverflow, SparseField
from sr_jax.data.store import Dataset
from sr_jax.io import atomic_file

VOCAB = "vocab.json"


@dataclasses.dataclass(frozen=True)
class Vocabulary:
    """The keys of a model's id tables. keys[table][r] is the key of row r + 1 (row 0: missing); tables are
    the id fields (user_id, query_id, item_id) and the sparse fields' columns (item.brand, ...)."""

    keys: dict[str, tuple[str, ...]]
    fields: tuple[SparseField, ...]  # the sparse fields, in table order (vocab = rows of the table)
    dense: tuple[DenseField, ...] = ()  # the dense fields, with the statistics the model's inputs are standardised by

    def rows(self, table: str) -> int:
        return len(self.keys[table]) + 1

    def model_meta(self, meta: DatasetMeta) -> DatasetMeta:
        """`meta` with this vocabulary's table sizes and fields: what the model's shapes follow."""
        return dataclasses.replace(
            meta,
            vocab={f: self.rows(f) for f in ID_FIELDS},
            sparse_fields=list(self.fields),
            dense_fields=list(self.dense),
            text_caches={},
        )

    def to_json(self) -> str:
        return json.dumps(
            {
                "keys": {t: list(k) for t, k in self.keys.items()},
                "fields": [dataclasses.asdict(f) for f in self.fields],
                "dense": [dataclasses.asdict(f) for f in self.dense],
            },
            ensure_ascii=False,
        )

    @classmethod
    def from_json(cls, text: str) -> Vocabulary:
        d = json.loads(text)
        return cls(
            {t: tuple(k) for t, k in d["keys"].items()},
            tuple(SparseField(**f) for f in d["fields"]),
            tuple(DenseField(**f) for f in d.get("dense", [])),
        )


def of_dataset(dataset: Dataset) -> Vocabulary:
    keys, meta = dataset.keys(), dataset.meta
    return Vocabulary({t: tuple(keys[t]) for t in meta.tables()}, tuple(meta.sparse_fields), tuple(meta.dense_fields))


def write(folder: Path, vocab: Vocabulary) -> None:
    with atomic_file(Path(folder) / VOCAB) as tmp:
        tmp.write_text(vocab.to_json(), encoding="utf-8")


def read(folder: str | Path) -> Vocabulary:
    path = Path(folder) / VOCAB
    if not path.exists():
        raise FileNotFoundError(f"{path}: missing; every run writes its tables' keys there (re-run it)")
    return Vocabulary.from_json(path.read_text(encoding="utf-8"))


@dataclasses.dataclass(frozen=True)
class RowMap:
    """A dataset read through a model's tables.

    vocab: the model's tables (the pretrained run's rows first, then the new keys' rows);
    rows: column -> [dataset rows] int32, the model row of each dataset id (absent: the same row);
    missing: the model's fields the dataset lacks (sparse columns read as 0, dense as NaN: missing);
    pretrained_rows: table -> rows the pretrained run had (rows past it are new); absent tables are new;
    rescale: dense column -> (the dataset's field, the model's): the dataset's values back to raw numbers, then
    standardised with the model's statistics;
    new_dense: the dense fields' columns the pretrained run lacks."""

    vocab: Vocabulary
    rows: dict[str, np.ndarray]
    missing: tuple[SparseField | DenseField, ...]
    pretrained_rows: dict[str, int]
    rescale: dict[str, tuple[DenseField, DenseField]] = dataclasses.field(default_factory=dict)
    new_dense: tuple[str, ...] = ()

    def remap(self, columns: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """A split's columns in the model's rows (the unchanged ones stay memory-mapped)."""
        out = dict(columns)
        for column, rows in self.rows.items():
            out[column] = rows[np.asarray(columns[column])]
        for column, (data, model) in self.rescale.items():
            try:
                out[column] = model.standardise(data.raw(columns[column]))
            except DenseOverflow as e:  # the model's statistics are not the dataset's: a value may lie beyond
                raise DenseOverflow(e.position, f"{e}, row {e.position} of the split") from None
        n = len(columns["label"])
        for f in self.missing:
            if isinstance(f, DenseField):
                out[f.column] = np.full(n, np.nan, np.float32)
            else:
                out[f.column] = np.zeros((n, f.max_len) if f.max_len > 1 else (n,), np.int32)
        return out

    @property
    def new_fields(self) -> tuple[str, ...]:
        """The columns of the fields the pretrained run lacks (their tables, projections or dense vectors are
        new)."""
        sparse = tuple(f.column for f in self.vocab.fields if f.column not in self.pretrained_rows)
        return sparse + self.new_dense

    def hashing_switches(self, id_buckets: int) -> list[tuple[str, int, int]]:
        """(table, pretrained rows, rows now) of every id table that the pretrained run read a row per id (its
        rows fit `id_buckets`) and that these tables hash (they outgrow it): its lookups would switch from
        identity to a hash while the rows are copied by position, so every known key would read another's row."""
        if not id_buckets:
            return []
        return [
            (t, self.pretrained_rows[t], self.vocab.rows(t))
            for t in ID_FIELDS
            if t in self.pretrained_rows and self.pretrained_rows[t] <= id_buckets < self.vocab.rows(t)
        ]

    def new_keys(self) -> dict[str, int]:
        """table -> how many rows `extend` appended for keys the pretrained run lacks."""
        return {t: self.vocab.rows(t) - self.pretrained_rows.get(t, 0) for t in self.vocab.keys}


def identity(vocab: Vocabulary) -> RowMap:
    """A dataset read through its own tables (a run with no pretrained run)."""
    return RowMap(vocab, {}, (), {t: vocab.rows(t) for t in vocab.keys})


def extend(pretrained: Vocabulary, data: Vocabulary) -> RowMap:
    """The model tables of a run on `data` started from a run whose tables are `pretrained`: every pretrained
    row stays where it is, each key of `data` it lacks gets a new row after them."""
    keys, rows = {}, {}
    data_fields = {f.column for f in data.fields}
    fields = [*pretrained.fields, *(f for f in data.fields if f.column not in pretrained.keys)]
    for table in [*ID_FIELDS, *(f.column for f in fields)]:
        old = pretrained.keys.get(table, ())
        if table not in data.keys:  # a pretrained field this dataset lacks
            keys[table] = old
            continue
        position = {k: r + 1 for r, k in enumerate(old)}
        new = [k for k in data.keys[table] if k not in position]
        keys[table] = (*old, *new)
        position.update({k: len(old) + 1 + r for r, k in enumerate(new)})
        mapping = np.array([0, *(position[k] for k in data.keys[table])], np.int32)
        if not np.array_equal(mapping, np.arange(len(mapping))):
            rows[table] = mapping
    fields = [dataclasses.replace(f, vocab=len(keys[f.column]) + 1) for f in fields]  # the extended sizes
    missing = tuple(f for f in fields if f.column not in data_fields)
    known = {f.column for f in pretrained.dense}
    dense = (*pretrained.dense, *(f for f in data.dense if f.column not in known))
    vocab = Vocabulary(keys, tuple(fields), dense)
    missing_dense, rescale = _dense_map(dense, data.dense)
    new_dense = tuple(f.column for f in data.dense if f.column not in known)
    pretrained_rows = {t: len(k) + 1 for t, k in pretrained.keys.items()}
    return RowMap(vocab, rows, missing + missing_dense, pretrained_rows, rescale, new_dense)


def _dense_map(model: tuple[DenseField, ...], data: tuple[DenseField, ...]) -> tuple[tuple, dict]:
    """(the model's dense fields the dataset lacks, column -> (the dataset's field, the model's) where their
    statistics differ)."""
    mine = {f.column: f for f in data}
    missing = tuple(f for f in model if f.column not in mine)
    rescale = {}
    for f in model:
        if (d := mine.get(f.column)) is not None and (d.mean, d.std) != (f.mean, f.std):
            rescale[f.column] = (d, f)
    return missing, rescale


def lookup(model: Vocabulary, data: Vocabulary) -> RowMap:
    """A dataset read through a trained model's tables as they are (scoring, embedding): each key maps to the
    model's row for it, a key the model lacks to row 0 (missing: the model has no row to read); the model's
    fields the dataset lacks read as missing, the dataset's fields the model lacks are not read."""
    rows = {}
    for table, keys in model.keys.items():
        if table not in data.keys:
            continue
        position = {k: r + 1 for r, k in enumerate(keys)}
        mapping = np.array([0, *(position.get(k, 0) for k in data.keys[table])], np.int32)
        if not np.array_equal(mapping, np.arange(len(mapping))):
            rows[table] = mapping
    missing = tuple(f for f in model.fields if f.column not in data.keys)
    missing_dense, rescale = _dense_map(model.dense, data.dense)
    return RowMap(model, rows, missing + missing_dense, {t: model.rows(t) for t in model.keys}, rescale)
