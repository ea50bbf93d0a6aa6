"""Encoder checkpoints in orbax form: Hugging Face safetensors -> orbax (`load_encoder` reads them back).

An orbax encoder folder holds `params/` (the Flax parameters, float32 or the decoder's bf16), `config.json`,
`tokenizer.json` and `tokenizer_config.json` (copied from the source) and `sr_jax_encoder.json` (name, the
feature settings, and the source weights' hash, so the features, and therefore the text caches, keep the
same fingerprint as the source with the same options).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import orbax.checkpoint as ocp

from sr_jax import io
from sr_jax.text.encoder import ORBAX_MARKER, describe, load_params


def hf_to_orbax(src: str | Path, dst: str | Path, dtype: str = "float32", overwrite: bool = False) -> Path:
    """Converts a Hugging Face folder (or packaged name, with feature options: `encoder.py`) into an orbax
    encoder folder at `dst` (atomically; an encoder folder there is replaced, anything else only with
    `overwrite`: `io.claim`). `dtype` is the compute dtype the parameters are stored for (a decoder's weights
    are stored in it; BERT's stay float32)."""
    dst = io.claim(Path(dst).absolute(), io.ENCODER, overwrite)
    spec = describe(src)
    params = load_params(spec, dtype)
    with io.atomic_dir(dst, io.ENCODER, overwrite=overwrite, inputs=(spec.folder,)) as tmp:
        checkpointer = ocp.StandardCheckpointer()
        checkpointer.save(tmp / "params", params)
        checkpointer.wait_until_finished()
        for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
            if (spec.folder / name).exists():
                shutil.copy(spec.folder / name, tmp / name)
        p = spec.pooling
        settings = {"max_length": spec.max_length, "normalize": p.normalize, "pooling": p.method, "dim": p.dim,
                    "instruction": p.instruction, "eos": p.eos}  # fmt: skip
        info = {"name": spec.name, "settings": settings, "weights_id": spec.weights_id, "source": str(spec.folder)}
        (tmp / ORBAX_MARKER).write_text(json.dumps(info, indent=2) + "\n")
    return dst
