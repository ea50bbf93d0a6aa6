"""The mesh and every sharding rule, in one place.

Mesh axes: `data` (the batch is split over it) and `model` (large embedding tables are split by rows
over it; a big text encoder's layers by heads and MLP columns). Axis types are Auto (GSPMD-style): a
row-sharded table lookup then compiles to a local masked gather plus an all-reduce, and its gradient keeps
the row sharding.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from sr_jax.config import ConfigError, MeshConfig
from sr_jax.treeutil import path_names

ROW_SHARDED = ("id_tables", "sparse_tables")  # params under these keys are embedding tables


def make_mesh(cfg: MeshConfig, devices: list | None = None) -> Mesh:
    devices = devices if devices is not None else jax.devices()
    model = cfg.model
    data = cfg.data if cfg.data > 0 else len(devices) // model
    if data * model > len(devices) or data * model == 0:
        raise ConfigError(f"mesh.data={cfg.data} x mesh.model={cfg.model} does not fit the {len(devices)} devices")
    grid = np.asarray(devices[: data * model]).reshape(data, model)
    return Mesh(grid, ("data", "model"), axis_types=(AxisType.Auto, AxisType.Auto))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P("data"))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def param_sharding(mesh: Mesh, path: tuple, shape: tuple[int, ...]) -> NamedSharding:
    """Embedding tables, and per-row state kept beside them, by rows over `model`; everything else
    replicated. Tables have a multiple of `model.table_row_multiple` rows, which the model axis divides
    (`config.validate`), so a table never falls back to being replicated."""
    if not any(n in ROW_SHARDED for n in path_names(path)) or len(shape) < 1:
        return replicated(mesh)
    if shape[0] % mesh.shape["model"]:
        raise ValueError(
            f"{'/'.join(path_names(path))}: {shape[0]} rows do not divide over mesh.model={mesh.shape['model']}"
        )
    return NamedSharding(mesh, P("model", *[None] * (len(shape) - 1)))


def text_sharding(mesh: Mesh) -> NamedSharding:
    """The text table (pooled and summary): by rows over `model` (`rows_over_model` places it so)."""
    return NamedSharding(mesh, P("model"))


def text_table(mesh: Mesh, pooled: np.ndarray, summary: np.ndarray, keep_summary: bool) -> tuple[jax.Array, jax.Array]:
    """The text cache's (pooled, summary) on the mesh, each by `rows_over_model`; `summary` with no real rows
    unless `keep_summary` (only cls gating reads it). The one way a text table is put on devices: training, scoring,
    embeddings and the benchmarks (on a one-device mesh, `single_device_mesh`) all call it."""
    return rows_over_model(mesh, pooled), rows_over_model(mesh, summary if keep_summary else summary[:0])


def rows_over_model(mesh: Mesh, table: np.ndarray) -> jax.Array:
    """A host table [rows, ...] (a memory map: the text cache) as a device array split by rows over `model`,
    padded with zero rows to a multiple of the axis. Each device reads only its own rows from the host, so
    nothing is first committed whole to one device, and a device holds rows / model of it; a lookup compiles
    to a local masked gather and an all-reduce, like the embedding tables'."""
    size, n = mesh.shape["model"], table.shape[0]
    rows = max(-(-n // size), 1) * size

    def shard(index: tuple) -> np.ndarray:
        start, stop, _ = index[0].indices(rows)
        part = np.asarray(table[min(start, n) : min(stop, n)], np.float32)
        missing = (stop - start) - len(part)
        return np.concatenate([part, np.zeros((missing, *table.shape[1:]), np.float32)]) if missing else part

    return jax.make_array_from_callback((rows, *table.shape[1:]), text_sharding(mesh), shard)


def table_layout(mesh: Mesh, params: Any) -> str:
    """One line per embedding table: its rows and how they lie on the mesh (logged at the start of a run)."""
    lines = []
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        names = path_names(path)
        if not any(n in ROW_SHARDED for n in names):
            continue
        sharding = param_sharding(mesh, path, leaf.shape)
        per_device = sharding.shard_shape(leaf.shape)[0]
        where = f"{per_device} per device over model={mesh.shape['model']}" if sharding.spec else "replicated"
        lines.append(f"  {'/'.join(names)}: {leaf.shape[0]} rows x {leaf.shape[1]}, {where}")
    return "\n".join(lines)


def tree_shardings(mesh: Mesh, params: Any, tree: Any) -> Any:
    """Shardings for `tree` (params, or optimizer state that mirrors them): a leaf whose path ends with a
    parameter's path and has its shape is sharded like that parameter; other leaves by `param_sharding`
    of their own path (a row-sparse rule's per-row state: like its table)."""
    by_path = {path_names(p): leaf.shape for p, leaf in jax.tree_util.tree_leaves_with_path(params)}

    def rule(path, leaf):
        keys = path_names(path)
        for start in range(len(keys)):
            if by_path.get(keys[start:]) == getattr(leaf, "shape", None):
                return param_sharding(mesh, path[start:], leaf.shape)
        return param_sharding(mesh, path, getattr(leaf, "shape", ()))

    return jax.tree_util.tree_map_with_path(rule, tree)


def process_slice(sharding: NamedSharding, batch_size: int) -> slice:
    """The rows of a global batch that this process's devices hold under `sharding` (all on one process)."""
    mine = {
        (index[0].start or 0, batch_size if index[0].stop is None else index[0].stop)
        for device, index in sharding.devices_indices_map((batch_size,)).items()
        if device.process_index == jax.process_index()
    }
    blocks = sorted(mine)
    start, stop = blocks[0][0], blocks[-1][1]
    if sum(b - a for a, b in blocks) != stop - start:
        raise ValueError(f"this process's devices hold rows {blocks} of a batch: not one contiguous block")
    return slice(start, stop)


def to_global(batch: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
    """This process's rows of a batch (`process_slice`) -> global arrays sharded on `data` (multi-host: each
    process brings its part)."""
    if jax.process_count() == 1:
        return jax.device_put(batch, sharding)  # one call for the whole batch: much less overhead
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}


def encoder_shardings(mesh: Mesh, params: Any) -> Any:
    """A text encoder's parameters (BERT or decoder), tensor parallel over `model` (Megatron's split): q/k/v,
    gate and up kernels by output columns (heads), o and down kernels by input rows, so each device computes
    its heads and MLP columns and one all-reduce per block joins them; embedding tables by vocabulary rows;
    norms and biases of row-split layers replicated. A dimension the axis does not divide stays whole
    (replicated), which is slower but equal."""
    columns, rows = (
        ("q", "k", "v", "gate", "up", "query", "key", "value", "intermediate"),
        ("o", "down", "attn_out", "output"),
    )
    size = mesh.shape["model"]

    def rule(path, leaf):
        names = path_names(path)
        owner, kind = names[-2] if len(names) > 1 else "", names[-1]
        axis = None
        if kind == "embedding":
            axis = 0
        elif owner in columns and kind in ("kernel", "bias"):
            axis = leaf.ndim - 1
        elif owner in rows and kind == "kernel":
            axis = 0
        if axis is None or leaf.shape[axis] % size:
            return NamedSharding(mesh, P())
        spec = [None] * leaf.ndim
        spec[axis] = "model"
        return NamedSharding(mesh, P(*spec))

    return jax.tree_util.tree_map_with_path(rule, params)


def single_device_mesh(device: jax.Device | None = None) -> Mesh:
    """A 1 x 1 mesh on one device (the default one): where scoring, embeddings and export place what they read."""
    return make_mesh(MeshConfig(data=1, model=1), [device or jax.devices()[0]])
