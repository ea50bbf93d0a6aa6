"""Hugging Face weights without torch: safetensors files read lazily, and mapped onto a Flax parameter tree.

`open_weights(folder)` reads `model.safetensors`, or the shards that `model.safetensors.index.json` lists,
as memory maps: a tensor is read from disk only when it is placed, one at a time, so a model is never held
twice in host memory. bfloat16 tensors (which `safetensors.numpy` cannot read) come back as ml_dtypes
bfloat16 arrays.

`assemble(weights, mapping, template, place)` builds the parameter tree a module expects from a key map
(Hugging Face key -> where each tensor goes and how it is transformed), naming the file and key of every
unknown, missing or misshapen tensor.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import struct
from collections.abc import Callable
from pathlib import Path

import ml_dtypes
import numpy as np

SINGLE, INDEX = "model.safetensors", "model.safetensors.index.json"
DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}


class Weights:
    """The tensors of a checkpoint folder by key, read on demand from memory-mapped safetensors files."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.files = weight_files(self.folder)
        self._where: dict[str, tuple[Path, int, dict]] = {}  # key -> (file, where its data starts, entry)
        listed = _index(self.folder)
        for file in self.files:
            data_start, header = _header(file)
            for key, entry in header.items():
                if key in self._where:
                    raise ValueError(f"{file}: tensor {key!r} is also in {self._where[key][0]}")
                if listed is not None and listed.get(key) != file.name:
                    where = f"listed in {INDEX} under {listed[key]!r}" if key in listed else f"not listed in {INDEX}"
                    raise ValueError(f"{file}: tensor {key!r} is {where}")
                self._where[key] = (file, data_start, entry)
        if listed is not None and (absent := sorted(set(listed) - set(self._where))):
            raise KeyError(f"{self.folder / INDEX}: tensor {absent[0]!r} is listed under {listed[absent[0]]!r}, "
                           f"which does not hold it ({len(absent)} such)")  # fmt: skip

    def keys(self) -> list[str]:
        return list(self._where)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._where[key][2]["shape"])

    def source(self, key: str) -> str:
        return f"{self._where[key][0]}: tensor {key!r}"

    def __getitem__(self, key: str) -> np.ndarray:
        file, data_start, entry = self._where[key]
        start, end = entry["data_offsets"]
        dtype = np.dtype(DTYPES[entry["dtype"]])
        return np.memmap(file, dtype, "r", data_start + start, ((end - start) // dtype.itemsize,)).reshape(
            entry["shape"]
        )

    def digest(self) -> str:
        """A short content hash of all weight files (the single file's own hash when there is one). Computed
        once per process for files of unchanged size and modification time: a big model is read once, not
        once per `describe`."""
        return _digest(tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in self.files))


@functools.lru_cache(maxsize=64)
def _digest(files: tuple[tuple[str, int, int], ...]) -> str:
    h = hashlib.sha256()
    for name, _, _ in files:
        with open(name, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
    return h.hexdigest()[:16]


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a checkpoint folder: the index's shards (sorted), else model.safetensors."""
    listed = _index(folder)
    if listed is not None:
        files = [folder / name for name in sorted(set(listed.values()))]
        if missing := [f for f in files if not f.exists()]:
            raise FileNotFoundError(f"{folder / INDEX} lists {missing[0].name}, which is missing")
        return files
    if not (folder / SINGLE).exists():
        raise FileNotFoundError(f"{folder}: no {SINGLE} and no {INDEX}")
    return [folder / SINGLE]


def _index(folder: Path) -> dict[str, str] | None:
    path = folder / INDEX
    if not path.exists():
        return None
    try:
        return dict(json.loads(path.read_text())["weight_map"])
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: not a safetensors index (a JSON object with a weight_map): {e}") from e


def _header(file: Path) -> tuple[int, dict[str, dict]]:
    """(where the data starts, the tensor entries of the JSON header), checked against the file's size."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else size
        if n > size - 8:
            raise ValueError(f"{file}: not a safetensors file (header length {n} exceeds the file)")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{file}: not a safetensors file (unreadable header: {e})") from e
    header.pop("__metadata__", None)
    for key, entry in header.items():
        if entry.get("dtype") not in DTYPES:
            raise ValueError(f"{file}: tensor {key!r} has dtype {entry.get('dtype')!r}, not one of {sorted(DTYPES)}")
        start, end = entry["data_offsets"]
        expected = int(np.prod(entry["shape"], dtype=np.int64)) * np.dtype(DTYPES[entry["dtype"]]).itemsize
        if end - start != expected or 8 + n + end > size:
            raise ValueError(f"{file}: tensor {key!r} is truncated or misdescribed (the file is {size} bytes)")
    return 8 + n, header


@dataclasses.dataclass(frozen=True)
class Entry:
    """Where one Hugging Face tensor goes: the parameter paths it fills and how (`convert` maps the tensor to
    one array per path, e.g. a transpose, or a split of a fused projection)."""

    targets: tuple[tuple, ...]
    convert: Callable[[np.ndarray], tuple[np.ndarray, ...]]


def copy(target: tuple) -> Entry:
    return Entry((target,), lambda x: (x,))


def transposed(target: tuple) -> Entry:
    """A torch Linear weight [out, in] -> a Flax kernel [in, out]."""
    return Entry((target,), lambda x: (x.T,))


def split_transposed(*targets: tuple) -> Entry:
    """A fused torch Linear weight [k * out, in] -> k Flax kernels [in, out] (its row blocks, in order)."""
    return Entry(targets, lambda x: tuple(part.T for part in np.split(x, len(targets), axis=0)))


def assemble(
    weights: Weights,
    mapping: dict[str, Entry],
    template: dict,
    place: Callable[[tuple, np.ndarray], object],
    prefixes: tuple[str, ...] = (),
    ignored: Callable[[str], bool] = lambda key: False,
) -> dict:
    """The parameter tree shaped like `template` (a nested dict of ShapeDtypeStructs) from `weights`.

    A key is looked up in `mapping` after removing the first of `prefixes` it starts with; keys for which
    `ignored(key)` holds (buffers, heads a featurizer does not use) are skipped. Any other unknown key, any
    mapped key the checkpoint lacks and any tensor whose shape is not the template's is an error naming the
    file and key. `place(path, array)` puts each converted array where it belongs (a dtype cast, a sharded
    device array) and is called once per parameter, in checkpoint order.
    """
    found: dict[str, str] = {}
    for key in weights.keys():
        name = _strip(key, prefixes)
        if name in mapping:
            found[name] = key
        elif not ignored(name):
            unknown = [
                k for k in weights.keys() if not ignored(_strip(k, prefixes)) and _strip(k, prefixes) not in mapping
            ]
            raise KeyError(f"{weights.source(key)} is unknown to this model ({len(unknown)} unknown: {unknown[:5]})")
    if missing := [name for name in mapping if name not in found]:
        raise KeyError(f"{weights.folder}: missing weight {missing[0]!r} ({len(missing)} missing: {missing[:5]})")
    params: dict = {}
    for name, key in found.items():
        entry = mapping[name]
        for target, value in zip(entry.targets, entry.convert(weights[key]), strict=True):
            node, leaf = params, template
            for part in target[:-1]:
                node, leaf = node.setdefault(part, {}), leaf[part]
            expected = tuple(leaf[target[-1]].shape)
            if value.shape != expected:
                raise ValueError(f"{weights.source(key)} has shape {weights.shape(key)}, the config implies "
                                 f"{expected} for {'/'.join(map(str, target))}")  # fmt: skip
            node[target[-1]] = place(target, value)
    return params


def _strip(key: str, prefixes: tuple[str, ...]) -> str:
    return next((key.removeprefix(p) for p in prefixes if key.startswith(p)), key)
