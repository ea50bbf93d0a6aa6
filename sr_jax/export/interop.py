"""Parameters out of sr-jax and back: flat safetensors, the PyTorch reference module's state_dict, and
params-only run folders. Nothing here imports torch.

Name schemes (docs/EXPORT.md):
- safetensors (`to_safetensors`): the parameter's path joined by dots, `l1.backbone.experts.layers.0.kernel`;
  arrays as in JAX, so a dense kernel is [in, out] (torch's nn.Linear.weight is its transpose) and a
  per-domain layer's is [K, in, out]; an embedding table's rows as the model stores them (the model config's
  `row_layout`: row r at `sr_jax.model.rows.position`). The header's metadata holds the model config, the
  domains, the step, the training run's fingerprint and its calibration (calibration.json, as JSON).
- PyTorch (`torch_state_dict`): the names of `sr_jax.bench.torch_reference.TorchSRModel`'s state_dict
  (`id_tables.item`, `dal_kernel`, `experts.1`, ...), arrays unchanged; `TorchSRModel.load_state_dict` takes
  it as it is. The map covers what the reference covers (the default model); other models are refused by name.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import shutil
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from sr_jax.export.trained import TrainedModel
from sr_jax import io
from sr_jax.training.checkpoint import CheckpointError, seal
from sr_jax.treeutil import flatten, unflatten

# jax path (regex over "/"-joined names) -> torch name (format string over the match's groups)
_TORCH_NAMES = [
    (r"l0/id_tables/(\w+)", "id_tables.{0}"),
    (r"l0/sparse_tables/(\w+)", "sparse_tables.{0}"),
    (r"l0/sparse_proj/(\w+)/(kernel|bias)", "sparse_proj.{0}_{1}"),
    (r"l0/dense/(\w+)", "dense.{0}"),
    (r"l0/text_proj/(\w+)/(kernel|bias)", "text_proj.{0}_{1}"),
    (r"l1/domain_embedding", "domain_embedding"),
    (r"l1/gates/(\w+)/missing", "missing.{0}"),
    (r"l1/gates/(\w+)/aspect_embedding", "aspect_embedding.{0}"),
    (r"l1/adapter/proj/kernel", "dal_kernel"),
    (r"l1/adapter/proj/bias", "dal_bias"),
    (r"l1/adapter/scale", "norm_scale"),
    (r"l1/adapter/shift", "norm_bias"),
    (r"l1/backbone/experts/layers/(\d+)/(bias|kernel)", "experts.{pair}"),
    (r"l2/gate/(kernel|bias)", "gate_{0}"),
    (r"l2/tower/layers/(\d+)/(bias|kernel)", "tower.{pair}"),
    (r"l2/match/weight", "match_weight"),
]


def torch_name(path: str) -> str:
    """The reference module's name for a parameter path; layers' (bias, kernel) pairs are ParameterList entries
    2i, 2i + 1. A parameter the reference lacks raises NotImplementedError naming it."""
    for pattern, name in _TORCH_NAMES:
        if m := re.fullmatch(pattern, path):
            groups = m.groups()
            if "{pair}" in name:
                return name.format(pair=2 * int(groups[0]) + (groups[1] == "kernel"))
            return name.format(*groups)
    raise NotImplementedError(
        f"parameter {path}: the PyTorch reference (sr_jax/bench/torch_reference.py) has no counterpart; it covers "
        "the default model (gating mean|domain, regularizer js|none, MMoE, text on, no id hashing)"
    )


def torch_state_dict(params: Any) -> dict[str, np.ndarray]:
    """The parameters under the reference module's state_dict names (float32 numpy arrays)."""
    return {torch_name(path): np.asarray(v, np.float32) for path, v in flatten(params).items()}


def from_torch_state_dict(state: dict[str, Any], like: Any) -> Any:
    """A state_dict of the reference module -> parameters shaped like `like` (a params tree or its shapes); a
    CheckpointError naming every missing, unknown or misshapen entry."""
    wanted = {torch_name(path): (path, tuple(leaf.shape)) for path, leaf in flatten(like).items()}
    problems = [
        f"missing {name} (params/{path}, shape {shape})" for name, (path, shape) in wanted.items() if name not in state
    ]
    problems += [f"unknown entry {name}" for name in state if name not in wanted]
    arrays = {}
    for name, (path, shape) in wanted.items():
        if name in state:
            value = np.asarray(state[name].detach().cpu().numpy() if hasattr(state[name], "detach") else state[name])
            if value.shape != shape:
                problems.append(f"{name} (params/{path}) has shape {value.shape}, the model wants {shape}")
            elif not np.isfinite(value).all():
                problems.append(f"{name} (params/{path}) holds NaN or inf values")
            arrays[path] = value.astype(np.float32)
    if problems:
        raise CheckpointError("the state_dict does not match the model:\n  " + "\n  ".join(problems))
    return unflatten(arrays)


def tensors_digest(tensors: dict[str, np.ndarray]) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes, in name order: written into a safetensors file's
    metadata, checked when it is read back (`read_torch`), so a flipped byte is found."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        value = np.ascontiguousarray(tensors[name])
        h.update(f"{name}|{value.dtype}|{value.shape}|".encode())
        h.update(value.tobytes())
    return h.hexdigest()


SAFETENSORS, TORCH = "parameters (safetensors)", "torch state_dict"  # the kinds of file written here (io.claim)


def metadata(model: TrainedModel, tensors: dict[str, np.ndarray], kind: str) -> dict[str, str]:
    return {
        io.KIND_KEY: kind,
        "tensors_sha256": tensors_digest(tensors),
        "format": "sr-jax params",
        "model": json.dumps(dataclasses.asdict(model.config.model)),
        "domains": json.dumps(model.domains),
        "step": str(model.step),
        "fingerprint": model.fingerprint,
        # the per-domain map of the logit to the calibrated one (sr_jax.calibration: knots x -> y per domain, linear
        # between, slope beyond; p = sigmoid(map(logit))); "null": not calibrated
        "calibration": json.dumps(model.calibration),
    }


def to_safetensors(model: TrainedModel, out: str | Path, overwrite: bool = False) -> Path:
    """The run's parameters as one flat safetensors file (names: the paths joined by dots), written atomically;
    an existing file is replaced only if it is one of these, or with `overwrite` (`io.claim`)."""
    out = io.claim(out, SAFETENSORS, overwrite, inputs=(model.workdir,))
    flat = {path.replace("/", "."): np.ascontiguousarray(v) for path, v in flatten(model.params).items()}
    with io.atomic_file(out) as tmp:
        save_file(flat, str(tmp), metadata=metadata(model, flat, SAFETENSORS))
    return out


def to_torch(model: TrainedModel, out: str | Path, overwrite: bool = False) -> Path:
    """The reference module's state_dict: a .pt file (torch.save; needs torch) or, for any other suffix, a
    safetensors file of the same names (`safetensors.torch.load_file` reads it into tensors), written
    atomically; an existing file is replaced only if it is one of these, or with `overwrite` (`io.claim`: a .pt
    file carries no kind, so replacing one always takes `overwrite`)."""
    out = io.claim(out, TORCH, overwrite, inputs=(model.workdir,))
    state = torch_state_dict(model.params)
    with io.atomic_file(out) as tmp:
        if out.suffix == ".pt":
            import torch  # optional: only this format needs it

            torch.save({k: torch.from_numpy(v) for k, v in state.items()}, tmp)
        else:
            save_file(state, str(tmp), metadata=metadata(model, state, TORCH))
    return out


def read_torch(path: str | Path) -> dict[str, Any]:
    """A state_dict saved by `to_torch` or by PyTorch (.pt needs torch; safetensors does not). A safetensors file
    that carries `tensors_sha256` (every one `to_torch` writes) is checked against it: a CheckpointError names
    the file when a byte changed. (.pt files carry no digest; `from_torch_state_dict` still refuses NaN or inf.)"""
    path = Path(path)
    if path.suffix == ".pt":
        import torch

        return torch.load(path, map_location="cpu", weights_only=True)
    state = load_file(str(path))
    with safe_open(str(path), framework="numpy") as f:
        digest = (f.metadata() or {}).get("tensors_sha256")
    if digest is not None and tensors_digest(state) != digest:
        raise CheckpointError(f"{path}: the tensors differ from the digest written with them (a damaged file)")
    return state


RECORDS = (
    "config.json",
    "run_info.json",
    "vocab.json",
    "trained_rows.npz",
    "item_text_map.npz",
    "reference.npz",
    "calibration.json",
)


def write_params_run(
    model: TrainedModel, params: Any, out: str | Path, dtype: str = "float32", overwrite: bool = False
) -> Path:
    """A run folder holding only `params` (no optimizer state; floating leaves in `dtype`) at the model's step,
    with the run's records: what fine-tuning (`finetune.pretrained`), evaluation, export and scoring read.
    Written atomically; an existing folder is replaced only if it is one of these, or with `overwrite`."""
    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"dtype={dtype!r}: expected float32 or bfloat16")
    io.claim(out, io.PARAMS_RUN, overwrite, inputs=(model.workdir,))
    cast = jax.tree.map(
        lambda v: jnp.asarray(v, jnp.dtype(dtype)) if jnp.issubdtype(v.dtype, jnp.floating) else v, params
    )
    with io.atomic_dir(Path(out), io.PARAMS_RUN, overwrite=overwrite, inputs=(model.workdir,)) as tmp:
        tmp.chmod(0o755)
        for name in RECORDS:
            if (model.workdir / name).exists():
                shutil.copyfile(model.workdir / name, tmp / name)
        info = json.loads((tmp / "run_info.json").read_text())
        info["converted"] = {
            "from": str(model.workdir),
            "step": model.step,
            "chosen_by": model.chosen_by,
            "dtype": dtype,
        }
        (tmp / "run_info.json").write_text(json.dumps(info, indent=2) + "\n")
        manager = ocp.CheckpointManager(
            tmp / "checkpoints",
            options=ocp.CheckpointManagerOptions(create=True),
            item_handlers={"state": ocp.StandardCheckpointHandler()},
        )
        manager.save(model.step, args=ocp.args.Composite(state=ocp.args.StandardSave({"params": cast})))
        manager.wait_until_finished()
        manager.close()
        seal(tmp / "checkpoints", [model.step])
    return Path(out)
