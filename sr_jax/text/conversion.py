"""Encoder checkpoints in orbax form: Hugging Face safetensors -> orbax (`load_encoder` reads them back).

An orbax encoder folder holds `params/` (the Flax parameters), `config.json` and `tokenizer.json` (copied
from the source) and `sr_jax_encoder.json` (name, pooling settings and the source weights' hash, so the
features, and therefore the text caches, keep the same fingerprint as the source).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import orbax.checkpoint as ocp

from sr_jax.io import atomic_dir
from sr_jax.text.bert import params_from_safetensors
from sr_jax.text.encoder import ORBAX_MARKER, describe


def hf_to_orbax(src: str | Path, dst: str | Path) -> Path:
    """Converts a Hugging Face folder (or packaged name) into an orbax encoder folder at `dst` (atomically)."""
    spec = describe(src)
    params = params_from_safetensors(spec.folder / "model.safetensors", spec.config)
    dst = Path(dst).absolute()
    if dst.exists():
        raise FileExistsError(f"{dst} exists")
    with atomic_dir(dst) as tmp:
        checkpointer = ocp.StandardCheckpointer()
        checkpointer.save(tmp / "params", params)
        checkpointer.wait_until_finished()
        for name in ("config.json", "tokenizer.json"):
            shutil.copy(spec.folder / name, tmp / name)
        info = {
            "name": spec.name,
            "max_length": spec.max_length,
            "normalize": spec.normalize,
            "weights_id": spec.weights_id,
            "source": str(spec.folder),
        }
        (tmp / ORBAX_MARKER).write_text(json.dumps(info, indent=2) + "\n")
    return dst
