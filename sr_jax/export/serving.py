"""The serving artifact: the prediction function as a `jax.export` (StableHLO) module with a symbolic batch
size, and what it needs beside it, loadable with jax alone (`serve.py`, copied in).

    out/
      manifest.json      features (shapes, valid ranges, meaning), domains, outputs, text and params files,
                         the training run's folder, step and fingerprint, jax version, platforms
      model.jaxexport    serve(params, text, features) -> {"probability": [B], "logit": [B]}
      params.npz         parameters only (no optimizer state), flat "l0/id_tables/item" names, and the
                         run's calibration ("calibration/x", "/y", "/slope", float32: `sr_jax.calibration`)
      text.npz           the run's dataset's cached text features ("pooled"; "summary" for cls gating): rows
                         the features' *_text columns index. The function takes the table as an input with
                         a symbolic row count, so another dataset's cache (same encoder) serves as well.
      vocab.json         the raw key of every table row (row r + 1 <-> keys[table][r])
      encoder.jaxexport  the text encoder (a language model's, not hashed-bow's): (params, ids, mask) ->
      encoder_params.npz {"pooled", "summary"}, with its weights and tokenizer, so `serve.py` featurizes a
      tokenizer.json     text never seen in training (a new item) as the dataset's cache was made
      serve.py           the loader

`dtype="bfloat16"` stores parameters and text features in bfloat16 (half the size) and runs the per-domain
and expert layers in bfloat16 (`model.dtype`); float32 scores equal the trainer's bit for bit at equal batch sizes.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from sr_jax import calibration
from sr_jax import model as sr_model
from sr_jax.data.history import COLUMN as HISTORY
from sr_jax.data.vocabulary import VOCAB
from sr_jax.export import serve
from sr_jax.export.trained import TrainedModel
from sr_jax import io
from sr_jax.model.encoding import SIDES, side_aspects
from sr_jax.treeutil import flatten, unflatten

FUNCTION, PARAMS, TEXT = "model.jaxexport", "params.npz", "text.npz"
CALIBRATION, CALIBRATION_ARRAYS = "calibration", ("x", "y", "slope")  # params.npz "calibration/x", ... (float32)
ENCODER_FUNCTION, ENCODER_PARAMS, TOKENIZER = "encoder.jaxexport", "encoder_params.npz", "tokenizer.json"
DTYPES = ("float32", "bfloat16")


def features(model: TrainedModel) -> list[dict]:
    """The inputs the model reads, in order: name, shape ("batch" first), valid range [low, high), meaning."""
    cfg, meta = model.config.model, model.model_meta
    aspects = side_aspects(cfg, meta)
    out = [_feature("domain", 0, meta.num_domains, f"the domain's row of {model.domains}")]
    for side in SIDES:
        out.append(_feature(f"{side}_id", 0, meta.vocab[f"{side}_id"], f"{side}'s row in vocab.json (0: missing)"))
        if "text" in aspects[side]:
            out.append(_feature(f"{side}_text", -1, "num_texts", f"the {side} text's row of the text table (-1: none)"))
    for f in meta.sparse_fields:
        out.append(
            _feature(
                f.column, 0, f.vocab, f"row in vocab.json of {f.column} (0: missing)", (f.max_len,) * (f.max_len > 1)
            )
        )
    for f in meta.dense_fields:
        meaning = f"(raw - {f.mean:.6g}) / {f.std:.6g}, the standardised number (NaN: missing)"
        out.append({**_feature(f.column, None, None, meaning), "dtype": "float32", "mean": f.mean, "std": f.std})
    if cfg.user_history > 0:  # (-1, auto, is resolved by a run; a model made from an unresolved config has none)
        meaning = "text rows of the items the user clicked before the example, latest last (-1: none)"
        out.append(_feature(HISTORY, -1, "num_texts", meaning, (cfg.user_history,)))
    return out


def _feature(name: str, low: int | None, high: int | str | None, meaning: str, trailing: tuple[int, ...] = ()) -> dict:
    return {"name": name, "shape": ["batch", *trailing], "dtype": "int32", "low": low, "high": high, "meaning": meaning}


def text_columns(model: TrainedModel) -> list[str]:
    """The text table's columns the model reads: the pooled features, and the summary token's for cls gating."""
    return ["pooled", "summary"] if model.config.model.gating == "cls" else ["pooled"]


def serving_function(model: TrainedModel, dtype: str):
    """serve(params {name: array}, text {column: [T, dim]}, features {name: [B, ...] int32 (dense: float32)})
    -> outputs."""
    cfg = dataclasses.replace(model.config.model, dtype=dtype)
    graphdef, _ = sr_model.abstract(cfg, model.model_meta, model.text_dim)
    trained = model.trained_mask()  # constants of the exported function (model.untrained_ids=missing)

    def serve_fn(params: dict[str, jax.Array], text: dict[str, jax.Array], batch: dict[str, jax.Array]):
        calibrated = {k: params[f"{CALIBRATION}/{k}"] for k in CALIBRATION_ARRAYS}
        params = unflatten({k: v.astype(jnp.float32) for k, v in params.items() if not k.startswith(CALIBRATION)})
        pooled = text["pooled"].astype(jnp.float32)
        table = sr_model.TextTable(pooled, text["summary"].astype(jnp.float32) if "summary" in text else pooled)
        out = sr_model.predict(graphdef, params, batch, table, trained, calibrated)
        return {"probability": out["probability"], "logit": out["logit"]}

    return serve_fn


def stored(model: TrainedModel, dtype: str) -> dict[str, np.ndarray]:
    """Flat parameters in the artifact's dtype (floating leaves cast), and the calibration in float32 (the
    trainer's own: "calibration/x", ...; the identity for a run without calibration.json)."""
    flat = flatten(model.params)
    params = {
        k: np.asarray(v, dtype=jnp.dtype(dtype)) if np.issubdtype(v.dtype, np.floating) else v for k, v in flat.items()
    }
    return {**params, **{f"{CALIBRATION}/{k}": v for k, v in model.calibration_table().items()}}


def export(
    model: TrainedModel,
    text: sr_model.TextTable,
    out: str | Path,
    dtype: str = "float32",
    platforms: tuple[str, ...] = ("cpu", "cuda"),
    overwrite: bool = False,
) -> dict:
    """Writes the artifact of `model` to `out` (atomically: a half-written folder is never left); -> manifest.
    An existing folder is replaced only if it is an artifact, or with `overwrite` (`io.claim`)."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}: expected one of {DTYPES}")
    io.claim(out, io.ARTIFACT, overwrite, inputs=(model.workdir,))
    started = time.perf_counter()
    params = stored(model, dtype)
    columns = text_columns(model)
    table = {c: np.asarray(getattr(text, c), dtype=jnp.dtype(dtype)) for c in columns}
    spec = features(model)
    batch, rows = jax.export.symbolic_shape("batch, texts")
    feature_specs = {f["name"]: jax.ShapeDtypeStruct((batch, *f["shape"][1:]), jnp.dtype(f["dtype"])) for f in spec}
    text_specs = {c: jax.ShapeDtypeStruct((rows, model.text_dim), table[c].dtype) for c in columns}
    param_specs = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in params.items()}
    exported = jax.export.export(jax.jit(serving_function(model, dtype)), platforms=platforms)(
        param_specs, text_specs, feature_specs
    )
    serialized = exported.serialize()
    manifest = {
        "format": "sr-jax serving artifact",
        "version": 1,
        "function": FUNCTION,
        "features": spec,
        "outputs": {
            "probability": "click probability [B] float32, calibrated as `calibration` says",
            "logit": "the model's logit [B] float32, before calibration (rank by it)",
        },
        "calibration": {"summary": calibration.summary(model.calibration), "fitted": model.calibration},
        "domains": model.domains,
        "params": {"file": PARAMS, "dtype": dtype, "count": int(sum(v.size for v in params.values()))},
        "text": {
            "file": TEXT,
            "columns": columns,
            "dim": model.text_dim,
            "rows": int(len(table["pooled"])),
            "encoder": model.run_info["text_encoder"],
            "fingerprint": model.run_info["text_fingerprint"],
        },
        "vocab": VOCAB,
        "run": {
            "workdir": str(model.workdir),
            "dataset": model.run_info["dataset"],
            "trained_domains": model.run_info["trained_domains"],
            "train_split": model.run_info["train_split"],
            "step": model.step,
            "chosen_by": model.chosen_by,
            "fingerprint": model.fingerprint,
            "model": dataclasses.asdict(model.config.model),
        },
        "jax_version": jax.__version__,
        "platforms": list(platforms),
    }
    encoder = export_encoder(model, platforms)
    manifest["encoder"] = encoder[0] if encoder else None
    with io.atomic_dir(Path(out), io.ARTIFACT, overwrite=overwrite, inputs=(model.workdir,)) as tmp:
        tmp.chmod(0o755)
        if encoder:
            described, function, weights, tokenizer = encoder
            (tmp / described["function"]).write_bytes(function)
            _save_arrays(tmp / described["params"], weights)
            shutil.copyfile(tokenizer, tmp / described["tokenizer"])
        (tmp / FUNCTION).write_bytes(serialized)
        _save_arrays(tmp / PARAMS, params)
        _save_arrays(tmp / TEXT, table)
        shutil.copyfile(model.workdir / VOCAB, tmp / VOCAB)
        shutil.copyfile(serve.__file__, tmp / "serve.py")
        manifest["sha256"] = {p.name: serve.sha256(p) for p in sorted(tmp.iterdir())}
        manifest["export_seconds"] = round(time.perf_counter() - started, 3)
        manifest["manifest_sha256"] = serve.manifest_digest(manifest)
        (tmp / serve.MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def export_encoder(model: TrainedModel, platforms: tuple[str, ...]) -> tuple[dict, bytes, dict, Path] | None:
    """The run's text encoder as the artifact carries it, so that `serve.py` featurizes a text it never saw
    (a new item, a new query) as the training data's were: (its manifest entry, the serialized function
    (params, ids [b, l], mask [b, l]) -> {"pooled", "summary"} [b, dim], its weights, its tokenizer file).
    None for hashed-bow, which has no language model to carry."""
    spec_text = model.config.data.text_encoder
    if spec_text.startswith("hashed-bow"):
        return None
    from sr_jax.text.encoder import features_fn, load_encoder

    encoder = load_encoder(spec_text)
    if encoder.fingerprint() != model.run_info["text_fingerprint"]:
        raise ValueError(
            f"{spec_text}: its fingerprint {encoder.fingerprint()} is not the one the run's text features were made "
            f"with ({model.run_info['text_fingerprint']}): the artifact would featurize new texts differently"
        )
    forward = features_fn(encoder.spec)

    def encode(params, ids, mask):
        pooled, summary = forward(unflatten(params), ids, mask)
        return {"pooled": pooled.astype(jnp.float32), "summary": summary.astype(jnp.float32)}

    weights = {k: np.asarray(v) for k, v in flatten(jax.device_get(encoder.params)).items()}
    b, length = jax.export.symbolic_shape("b, l")
    tokens = jax.ShapeDtypeStruct((b, length), jnp.int32)
    specs = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in weights.items()}
    function = jax.export.export(jax.jit(encode), platforms=platforms)(specs, tokens, tokens).serialize()
    spec = encoder.spec
    described = {
        "function": ENCODER_FUNCTION,
        "params": ENCODER_PARAMS,
        "tokenizer": TOKENIZER,
        "name": encoder.name,
        "fingerprint": encoder.fingerprint(),
        "max_length": int(encoder.max_length),
        "pad_id": int(encoder.pad_id),
        "eos_id": int(spec.config.eos_token_id) if spec.pooling.eos else None,  # appended to every text
        "padding_side": spec.padding_side,
        "query_prefix": encoder.query_prefix,
    }
    return described, function, weights, spec.folder / "tokenizer.json"


def _save_arrays(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """An .npz that numpy alone reads (bfloat16 as its uint16 bits; the manifest names the dtype)."""
    with open(path, "wb") as f:
        np.savez(f, **{k: v.view(np.uint16) if v.dtype == jnp.bfloat16 else v for k, v in arrays.items()})


def size_bytes(folder: str | Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).iterdir() if p.is_file())
