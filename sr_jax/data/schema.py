"""The dataset metadata (`meta.json`) and the columns every split must have.

One example is one impression (docs/DESIGN.md, "Data model"). Ids are integers in [0, vocab) with 0 meaning
"missing"; text columns hold a row of the dataset's text table, or -1 for "no text". Every id table (the
three id fields and each sparse field) keeps the raw key of each row (`keys.json`, `sr_jax.data.vocabulary`),
so that runs started from another dataset's model read its rows by key. A dense field holds a number per
example, float32, standardised with the train split's statistics (kept in the metadata, so that a raw value can
be standardised the same way later), NaN where it is missing.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

FORMAT_VERSION = 2  # 2: raw keys of every id table (keys.json)
TASKS = ("search", "rec")
SPARSE_SIDES = ("user", "item")  # the sides that carry sparse fields
ID_FIELDS = ("user_id", "query_id", "item_id")
TEXT_FIELDS = ("query_text", "item_text")
FLOAT32_MAX = float(np.finfo(np.float32).max)  # a dense field's raw and standardised values lie within +-this


class DenseOverflow(ValueError):
    """A dense value whose standardised float32 is infinite; `position` is its index in the values given."""

    def __init__(self, position: int, message: str):
        super().__init__(message)
        self.position = position


@dataclasses.dataclass(frozen=True)
class Domain:
    name: str
    task: str  # "search" (has queries) or "rec" (no query)
    pretrain: bool = True  # False: held out of pretraining, for the cold-start domain protocol


@dataclasses.dataclass(frozen=True)
class SparseField:
    """A categorical feature of the user or item side; `max_len` > 1 makes it multi-valued (0 pads)."""

    name: str
    side: str
    vocab: int
    max_len: int = 1

    @property
    def column(self) -> str:
        return f"{self.side}.{self.name}"


@dataclasses.dataclass(frozen=True)
class DenseField:
    """A continuous feature of the user or item side (an age, a price, an average rating): stored standardised,
    (raw - mean) / std with the train split's mean and std, NaN where missing."""

    name: str
    side: str
    mean: float = 0.0
    std: float = 1.0

    @property
    def column(self) -> str:
        return f"{self.side}.dense.{self.name}"

    def standardise(self, raw: np.ndarray) -> np.ndarray:
        """Raw numbers (NaN: missing) -> float32 standardised values; DenseOverflow for the first one beyond
        float32's range once standardised (checked after the cast, where an overflow shows)."""
        raw = np.asarray(raw, np.float64)
        with np.errstate(over="ignore", invalid="ignore"):
            out = ((raw - self.mean) / self.std).astype(np.float32)
        if (beyond := np.isinf(out)).any():
            k = int(np.flatnonzero(beyond)[0])
            raise DenseOverflow(
                k,
                f"{self.column}: {raw[k]:g} standardised (mean {self.mean:g}, std {self.std:g}) is beyond float32's "
                f"range (+-{FLOAT32_MAX:.3g})",
            )
        return out

    def raw(self, values: np.ndarray) -> np.ndarray:
        return np.asarray(values, np.float64) * self.std + self.mean

    def fitted(self, train: np.ndarray) -> DenseField:
        """The field with the mean and std of the present (non-NaN) raw `train` values; std 1 where they do not vary
        (or none is present)."""
        present = np.asarray(train, np.float64)
        present = present[~np.isnan(present)]
        if not len(present):
            return dataclasses.replace(self, mean=0.0, std=1.0)
        std = float(present.std())
        return dataclasses.replace(self, mean=float(present.mean()), std=std if std > 0 else 1.0)


@dataclasses.dataclass(frozen=True)
class TextCache:
    """Which text encoder produced a cache: training refuses a cache from another encoder."""

    encoder: str
    fingerprint: str
    dim: int


@dataclasses.dataclass
class DatasetMeta:
    name: str
    domains: list[Domain]
    vocab: dict[str, int]  # user_id / query_id / item_id -> number of ids (0 = missing included)
    sparse_fields: list[SparseField]
    splits: dict[str, int]  # split name -> number of examples
    num_texts: int
    text_caches: dict[str, TextCache] = dataclasses.field(default_factory=dict)
    # Ceiling AUCs of the true click probabilities, per split and domain (synthetic data only).
    oracle_auc: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict)
    has_timestamp: bool = False
    description: str = ""
    format_version: int = FORMAT_VERSION
    dense_fields: list[DenseField] = dataclasses.field(default_factory=list)
    # domain -> non-clicks sampled per click where the data's negatives were sampled, not observed (the
    # converters' and `train.prepare tables --negatives`): what a calibration to the true click rate undoes
    negatives_per_click: dict[str, int] = dataclasses.field(default_factory=dict)

    @property
    def num_domains(self) -> int:
        return len(self.domains)

    @property
    def pretrain_domains(self) -> list[int]:
        return [k for k, d in enumerate(self.domains) if d.pretrain]

    def tables(self) -> dict[str, int]:
        """Every id table: its column name (user_id, ..., item.brand) -> rows (0 = missing included)."""
        return {**{f: self.vocab[f] for f in ID_FIELDS}, **{f.column: f.vocab for f in self.sparse_fields}}

    def columns(self) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
        """Every column of a split: name -> (dtype, shape of one row)."""
        cols: dict[str, tuple[np.dtype, tuple[int, ...]]] = {"domain": (np.dtype(np.int32), ())}
        for name in ID_FIELDS + TEXT_FIELDS:
            cols[name] = (np.dtype(np.int32), ())
        for f in self.sparse_fields:
            cols[f.column] = (np.dtype(np.int32), (f.max_len,) if f.max_len > 1 else ())
        for f in self.dense_fields:
            cols[f.column] = (np.dtype(np.float32), ())
        cols["label"] = (np.dtype(np.int8), ())
        if self.has_timestamp:
            cols["timestamp"] = (np.dtype(np.int64), ())
        return cols

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> DatasetMeta:
        d = json.loads(text)
        d["domains"] = [Domain(**x) for x in d["domains"]]
        d["sparse_fields"] = [SparseField(**x) for x in d["sparse_fields"]]
        d["dense_fields"] = [DenseField(**x) for x in d.get("dense_fields", [])]
        d["text_caches"] = {k: TextCache(**v) for k, v in d.get("text_caches", {}).items()}
        return cls(**d)

    @classmethod
    def read(cls, root: str | Path) -> DatasetMeta:
        return cls.from_json((Path(root) / "meta.json").read_text())


def numbered_keys(meta: DatasetMeta) -> dict[str, list[str]]:
    """Keys "1" ... "n-1" for every id table of data whose ids have no other name (the synthetic world,
    benchmarks): two such datasets share a key only by number."""
    return {table: [str(i) for i in range(1, rows)] for table, rows in meta.tables().items()}
