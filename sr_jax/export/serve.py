"""Loads and calls an sr-jax serving artifact with jax and numpy alone: this file is copied into every artifact
(`python -m train.export`) and imports nothing from sr_jax.

    import serve                                   # from the artifact's folder
    model = serve.load("exported/")
    rows = model.rows("item_id", ["B00123", "B00456"])          # raw keys -> the model's rows (unknown: 0)
    out = model({"domain": ["search-a", "rec-b"], "user_id": ..., "item_id": rows, ...})
    out["probability"], out["logit"]                            # [B] float32 numpy arrays
    table, rows = model.with_texts(["Bench vise. Industrial & Scientific ..."])  # a new item, from its text
    out = model({..., "item_text": rows}, text=table)         # (needs the `tokenizers` package)
    rating = model.standardise("item.dense.rating", [4.5, None])  # a dense feature's raw numbers (None: missing)

`model.features` lists every input with its shape and valid range; anything else (a missing feature, a
float or string where ids are due, an id outside its table, an unknown domain) raises `InputError` naming the
feature and the first bad row, before anything is computed. `load` first checks every file against the
manifest's sha256 list and the manifest against its own digest (`ArtifactError`). Row 0 of every table means
"missing" (an unknown key, a recommendation example's query); text rows index the artifact's text table (-1: no
text); a dense feature is a float32 number standardised as in training (NaN: missing).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

MANIFEST = "manifest.json"


class InputError(ValueError):
    """A batch the model cannot score as given."""


class ArtifactError(ValueError):
    """An artifact whose files are not the ones its manifest lists (damaged, swapped or edited)."""


def manifest_digest(manifest: dict) -> str:
    """sha256 of the manifest without its own digest: what `verify` compares, so an edited manifest (two domain
    names swapped, an id range raised) is found like a changed file."""
    rest = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return hashlib.sha256(json.dumps(rest, sort_keys=True).encode()).hexdigest()


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def verify(folder: Path, manifest: dict) -> None:
    """An ArtifactError naming the first file that differs from the manifest's sha256 list, or the manifest
    itself when it was edited."""
    if manifest.get("manifest_sha256") != manifest_digest(manifest):
        raise ArtifactError(f"{folder / MANIFEST}: edited since it was exported (its digest differs)")
    for name, digest in manifest.get("sha256", {}).items():
        path = folder / name
        if not path.is_file():
            raise ArtifactError(f"{path}: missing (the manifest lists it)")
        if sha256(path) != digest:
            raise ArtifactError(f"{path}: not the file exported with this manifest (sha256 differs)")


def read_manifest(folder: Path) -> dict:
    """The artifact's manifest; an ArtifactError naming it when it is missing or is not one."""
    path = folder / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ArtifactError(f"{path}: missing; is {folder} a folder written by python -m train.export?") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{path}: damaged, not JSON ({e})") from None
    if not isinstance(manifest, dict):
        raise ArtifactError(f"{path}: damaged, not a manifest (a JSON {type(manifest).__name__})")
    return manifest


class ServedModel:
    def __init__(self, folder: str | Path, check_files: bool = True):
        self.folder = Path(folder)
        self.manifest = read_manifest(self.folder)
        if check_files:
            verify(self.folder, self.manifest)
        try:
            function, params, text = (self.manifest[k] for k in ("function", "params", "text"))
            self.exported = jax.export.deserialize(bytearray((self.folder / function).read_bytes()))
            self.params = _load_arrays(self.folder / params["file"], params["dtype"])
            self.text = _load_arrays(self.folder / text["file"], params["dtype"])
            self.features = {f["name"]: f for f in self.manifest["features"]}
            self.domains = list(self.manifest["domains"])
        except (KeyError, TypeError) as e:  # only without check_files: the digest finds any edit
            raise ArtifactError(f"{self.folder / MANIFEST}: damaged, lacks {e}") from None
        self._vocab = None
        self._encoder = None  # (tokenizer, encoder function, weights), loaded on the first `encode`
        self._call = jax.jit(self.exported.call)  # compiled once per batch size

    def __call__(self, features: dict, text: dict | None = None) -> dict[str, np.ndarray]:
        """Scores a batch: `features` maps every name of `self.features` to an array [B] or [B, L]; `text`
        (optional) replaces the artifact's text table ({"pooled": [T, dim]}: another dataset's cache from the
        same encoder). -> {"probability": [B], "logit": [B]}"""
        text = self.text if text is None else self._check_text(text)
        batch = self.check(features, num_texts=len(text["pooled"]))
        out = self._call(self.params, text, batch)
        return {k: np.asarray(v) for k, v in out.items()}

    def check(self, features: dict, num_texts: int | None = None) -> dict[str, np.ndarray]:
        """The batch as the function takes it (int32 arrays; dense features float32), or an InputError naming what
        is wrong."""
        if not hasattr(features, "keys"):
            raise InputError(f"features: expected a dict of arrays, got {type(features).__name__}")
        if missing := [n for n in self.features if n not in features]:
            raise InputError(f"missing feature(s) {missing}; the model reads {list(self.features)}")
        num_texts = len(self.text["pooled"]) if num_texts is None else num_texts
        batch, size = {}, None
        for name, spec in self.features.items():
            value = np.asarray(features[name])
            if name == "domain" and value.dtype.kind in "USO":
                value = self.domain_ids(value)
            if spec.get("dtype") == "float32":  # a dense field: standardised numbers, NaN for missing
                batch[name], size = self._dense(name, value, size), len(value)
                continue
            if value.dtype.kind not in "iu":
                raise InputError(f"feature {name!r}: dtype {value.dtype}; expected integer row ids (int32)")
            trailing = spec["shape"][1:]
            if value.ndim != len(spec["shape"]) or list(value.shape[1:]) != trailing:
                want = "[B" + "".join(f", {d}" for d in trailing) + "]"
                raise InputError(f"feature {name!r}: shape {list(value.shape)}; expected {want}")
            if size is None:
                size = len(value)
            elif len(value) != size:
                raise InputError(f"feature {name!r}: {len(value)} rows; the other features have {size}")
            high = num_texts if spec["high"] == "num_texts" else spec["high"]
            bad = (value < spec["low"]) | (value >= high)
            if bad.any():
                row = int(np.argwhere(bad)[0][0])
                raise InputError(
                    f"feature {name!r}, row {row}: {value[row].tolist()} is out of range [{spec['low']}, {high}) "
                    f"({spec['meaning']})"
                )
            batch[name] = value.astype(np.int32)
        if not size:
            raise InputError("an empty batch: nothing to score")
        return batch

    def _dense(self, name: str, value: np.ndarray, size: int | None) -> np.ndarray:
        if value.dtype.kind not in "iuf" or value.ndim != 1:
            raise InputError(
                f"feature {name!r}: {value.dtype} {list(value.shape)}; expected float32 [B] (NaN: missing)"
            )
        if size is not None and len(value) != size:
            raise InputError(f"feature {name!r}: {len(value)} rows; the other features have {size}")
        with np.errstate(over="ignore"):
            cast = value.astype(np.float32)
        if np.isinf(cast).any():  # after the cast: a finite float64 past float32's range is infinite here
            row = int(np.argmax(np.isinf(cast)))
            what = "infinite" if np.isinf(value[row]) else "beyond float32's range"
            raise InputError(f"feature {name!r}, row {row}: {value[row]} is {what} (NaN is missing)")
        return cast

    def standardise(self, name: str, raw) -> np.ndarray:
        """A dense feature's raw numbers (None or NaN: missing) -> the standardised values the model reads, with the
        training data's statistics (the manifest's mean and std)."""
        spec = self.features.get(name)
        if spec is None or spec.get("dtype") != "float32":
            dense = [n for n, f in self.features.items() if f.get("dtype") == "float32"]
            raise InputError(f"{name!r} is not a dense feature of this model; it has {dense}")
        values = np.full(len(raw), np.nan)
        for row, v in enumerate(raw):
            if v is not None and (isinstance(v, (str, bytes, bool)) or not np.isscalar(v) or np.iscomplexobj(v)):
                raise InputError(f"{name!r}, row {row}: {v!r} is not a number (None or NaN: missing)")
            values[row] = np.nan if v is None else v
        with np.errstate(over="ignore", invalid="ignore"):
            out = ((values - spec["mean"]) / spec["std"]).astype(np.float32)
        if np.isinf(out).any():
            row = int(np.argmax(np.isinf(out)))
            raise InputError(f"{name!r}, row {row}: {values[row]} standardised is beyond float32's range")
        return out

    def domain_ids(self, names) -> np.ndarray:
        """Domain names -> their rows; an InputError naming an unknown one."""
        index = {n: k for k, n in enumerate(self.domains)}
        names = np.asarray(names)
        for row, name in enumerate(names.tolist()):
            if name not in index:
                raise InputError(f"feature 'domain', row {row}: unknown domain {name!r}; the model has {self.domains}")
        return np.array([index[n] for n in names.tolist()], np.int32)

    def rows(self, table: str, keys, unknown: str = "missing") -> np.ndarray:
        """Raw keys of an id table (user_id, query_id, item_id, or a sparse field such as item.brand) -> the
        model's rows; an unknown key reads as 0, missing (`unknown="error"`: an InputError instead)."""
        if self._vocab is None:
            saved = json.loads((self.folder / self.manifest["vocab"]).read_text(encoding="utf-8"))["keys"]
            self._vocab = {t: {k: r + 1 for r, k in enumerate(keys)} for t, keys in saved.items()}
        if table not in self._vocab:
            raise InputError(f"no table {table!r}; the model has {sorted(self._vocab)}")
        position = self._vocab[table]
        out = np.array([position.get(str(k), 0) for k in keys], np.int32)
        if unknown == "error" and (out == 0).any():
            row = int(np.argmax(out == 0))
            raise InputError(f"table {table!r}, row {row}: unknown key {list(keys)[row]!r}")
        return out

    def encode(self, texts: list[str], queries: bool = False) -> dict[str, np.ndarray]:
        """Raw texts -> their features {"pooled", "summary"} [n, dim], made by the artifact's copy of the
        training run's text encoder as the dataset's cache was (`queries`: with the encoder's query prefix)."""
        spec = self.manifest.get("encoder")
        if not spec:
            made_by = self.manifest["text"]["encoder"]
            raise InputError(
                f"this artifact carries no text encoder (its text features came from {made_by!r}): featurize new "
                "texts with that encoder and pass the table as `text`"
            )
        if self._encoder is None:
            from tokenizers import Tokenizer

            tokenizer = Tokenizer.from_file(str(self.folder / spec["tokenizer"]))
            tokenizer.no_padding()
            tokenizer.enable_truncation(spec["max_length"] - (spec["eos_id"] is not None))
            function = jax.export.deserialize(bytearray((self.folder / spec["function"]).read_bytes()))
            weights = _load_arrays(self.folder / spec["params"], "float32")
            self._encoder = (tokenizer, jax.jit(function.call), weights)
        tokenizer, call, weights = self._encoder
        prefix = spec["query_prefix"] if queries else ""
        ids = [e.ids + ([spec["eos_id"]] if spec["eos_id"] is not None else []) for e in
               tokenizer.encode_batch([prefix + t for t in texts])]  # fmt: skip
        width = max((len(x) for x in ids), default=1)
        tokens = np.full((len(ids), width), spec["pad_id"], np.int32)
        mask = np.zeros((len(ids), width), np.int32)
        for r, row in enumerate(ids):
            span = slice(width - len(row), width) if spec["padding_side"] == "left" else slice(0, len(row))
            tokens[r, span], mask[r, span] = row, 1
        out = call(weights, tokens, mask)
        return {k: np.asarray(v, np.float32) for k, v in out.items()}

    def with_texts(self, texts: list[str], queries: bool = False) -> tuple[dict, np.ndarray]:
        """(the artifact's text table with `texts`' features appended, their rows [n] int32): score an item or a
        query never seen in training from its text, `model({..., "item_text": rows}, text=table)`."""
        new = self.encode(texts, queries)
        table = {
            c: np.concatenate([np.asarray(self.text[c], np.float32), new[c]]) for c in self.manifest["text"]["columns"]
        }
        start = len(self.text["pooled"])
        return table, np.arange(start, start + len(texts), dtype=np.int32)

    def _check_text(self, text: dict) -> dict:
        spec = self.manifest["text"]
        if missing := [c for c in spec["columns"] if c not in text]:
            raise InputError(f"text: missing {missing}; the model reads {spec['columns']}")
        out = {}
        for column in spec["columns"]:
            value = np.asarray(text[column])
            if value.ndim != 2 or value.shape[1] != spec["dim"] or value.dtype.kind != "f":
                raise InputError(
                    f"text[{column!r}]: {value.dtype} {list(value.shape)}; expected float [T, {spec['dim']}]"
                )
            if not np.isfinite(value).all():
                row = int(np.argwhere(~np.isfinite(value))[0][0])
                raise InputError(f"text[{column!r}], row {row}: NaN or inf")
            out[column] = value.astype(self.text[column].dtype)
        return out


def _load_arrays(path: Path, dtype: str) -> dict[str, jax.Array]:
    """An .npz of the artifact (bfloat16 arrays are stored as their uint16 bits)."""
    with np.load(path) as saved:
        arrays = {k: saved[k] for k in saved.files}
    if dtype == "bfloat16":
        arrays = {k: v.view(jnp.bfloat16) if v.dtype == np.uint16 else v for k, v in arrays.items()}
    return {k: jnp.asarray(v) for k, v in arrays.items()}


def load(folder: str | Path, check_files: bool = True) -> ServedModel:
    """The artifact in `folder`, every file first checked against the manifest's sha256 list (an ArtifactError
    names the one that differs); `check_files=False` skips that (a large artifact on a trusted store)."""
    return ServedModel(folder, check_files)
