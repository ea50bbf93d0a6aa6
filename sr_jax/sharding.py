"""The partitioner: the mesh, and every sharding rule, in one place.

Mesh axes: `data` and `model` (large embedding tables are split by rows over `model`; a big text encoder's layers
by heads and MLP columns). Arrays name *logical* axes (`config.LOGICAL_AXES`: batch, table_rows, text_rows, heads,
mlp, vocab) and `mesh.rules` maps each onto mesh axes (as MaxText's logical axis rules), so a layout changes from
the command line. By default the batch is split over both axes (every layer data-parallel on all devices, the
tables by rows over `model`), so `mesh.model > 1` never repeats the dense work; `mesh.rules=batch=data` keeps the
batch on `data` alone (each device of a model group then computes its group's rows: M times its share). Axis types
are Auto (GSPMD-style): a row-sharded table lookup compiles to a local masked gather plus a collective, and its
gradient keeps the row sharding.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np
from flax.core import spmd
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from sr_jax.config import MESH_AXES, ConfigError, MeshConfig, Rules, parse_rules
from sr_jax.treeutil import path_names

log = logging.getLogger("sr_jax")

ROW_SHARDED = ("id_tables", "sparse_tables")  # params under these keys are embedding tables
DEFAULT_RULES = parse_rules(())


def spec(rules: Rules, *logical: str | None) -> P:
    """The PartitionSpec of an array whose axes are `logical` (None: an axis no rule splits)."""
    table = dict(rules)
    return P(*(None if name is None else table[name] for name in logical))


@contextlib.contextmanager
def model_context(mesh: Mesh, rules: Rules) -> Iterator[None]:
    """Inside a jitted step: the abstract mesh and the logical rules the model's layers read to keep their
    grouping on each device (`layers.by_group`)."""
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), spmd.logical_axis_rules(rules):
        yield


def make_mesh(cfg: MeshConfig, devices: list | None = None) -> Mesh:
    """A data x model mesh over `devices` (default: all), laid out by jax's mesh utilities so that neighbouring
    devices of an axis are neighbours on the interconnect (TPU torus, NVLink island); with `mesh.slices` > 1 the
    data axis spans slices joined by DCN (multi-slice TPU, several GPU hosts), the model axis stays inside one.
    A device count the axes do not divide is an error, never devices silently left idle; an explicit smaller
    mesh (mesh.data=1 on a host of 8) takes the first devices and says so in the log."""
    devices = list(devices if devices is not None else jax.devices())
    model = cfg.model
    data = cfg.data if cfg.data > 0 else len(devices) // max(model, 1)
    axes = f"mesh.data={cfg.data} x mesh.model={cfg.model}"
    if data * model > len(devices) or data * model == 0:
        raise ConfigError(f"{axes} needs {data * model} devices; there are {len(devices)}")
    if len(devices) % (data * model):
        raise ConfigError(f"{axes} = {data * model} devices does not divide the {len(devices)} devices")
    if data * model < len(devices):
        log.warning("mesh.data=%d x mesh.model=%d: %d of %d devices idle", data, model, len(devices) - data * model,
                    len(devices))  # fmt: skip
        devices = devices[: data * model]
    if data % cfg.slices:
        raise ConfigError(f"mesh.slices={cfg.slices} does not divide the data axis ({data} devices)")
    if cfg.slices > 1:
        grid = mesh_utils.create_hybrid_device_mesh((data // cfg.slices, model), (cfg.slices, 1), devices)
    elif len(devices) > 1 and devices[0].platform != "cpu":
        grid = mesh_utils.create_device_mesh((data, model), devices)
    else:  # CPU devices have no topology (and virtual ones no coords)
        grid = np.asarray(devices).reshape(data, model)
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto, AxisType.Auto))


def batch_sharding(mesh: Mesh, rules: Rules = DEFAULT_RULES) -> NamedSharding:
    return NamedSharding(mesh, spec(rules, "batch"))


def encoder_batch_sharding(mesh: Mesh) -> NamedSharding:
    """The text encoder's batch: over `data` only, as its layers are split over `model` (heads, MLP columns)."""
    return NamedSharding(mesh, P("data"))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def _devices_on(mesh: Mesh, partition: P) -> int:
    """How many shards the first axis of `partition` cuts an array into on `mesh`."""
    axes = partition[0] if len(partition) else None
    return int(np.prod([mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes or ())]))


def batch_shards(mesh: Mesh, rules: Rules = DEFAULT_RULES) -> int:
    """How many devices split a batch (the `batch` rule's axes): what batch sizes must be a multiple of."""
    return _devices_on(mesh, spec(rules, "batch"))


def param_sharding(mesh: Mesh, path: tuple, shape: tuple[int, ...], rules: Rules = DEFAULT_RULES) -> NamedSharding:
    """Embedding tables, and per-row state kept beside them, by rows (`table_rows`: over `model`); everything
    else replicated. Tables have a multiple of `model.table_row_multiple` rows, which the model axis divides
    (`config.validate`), so a table never falls back to being replicated."""
    if not any(n in ROW_SHARDED for n in path_names(path)) or len(shape) < 1:
        return replicated(mesh)
    partition = spec(rules, "table_rows", *[None] * (len(shape) - 1))
    if shape[0] % _devices_on(mesh, partition):
        raise ValueError(f"{'/'.join(path_names(path))}: {shape[0]} rows do not divide over {partition[0]}")
    return NamedSharding(mesh, partition)


def text_sharding(mesh: Mesh, rules: Rules = DEFAULT_RULES) -> NamedSharding:
    """The text table (pooled and summary): by rows as the `text_rows` rule says (over `model`); `text_rows()`
    places it."""
    return NamedSharding(mesh, spec(rules, "text_rows"))


def text_table(
    mesh: Mesh, pooled: np.ndarray, summary: np.ndarray, keep_summary: bool, rules: Rules = DEFAULT_RULES
) -> tuple[jax.Array, jax.Array]:
    """The text cache's (pooled, summary) on the mesh, each by `text_rows`; `summary` with no real rows
    unless `keep_summary` (only cls gating reads it). The one way a text table is put on devices: training, scoring,
    embeddings and the benchmarks (on a one-device mesh, `single_device_mesh`) all call it."""
    rows = lambda table: text_rows(mesh, table, rules)  # noqa: E731
    return rows(pooled), rows(summary if keep_summary else summary[:0])


def text_rows(mesh: Mesh, table: np.ndarray, rules: Rules = DEFAULT_RULES) -> jax.Array:
    """A host table [rows, ...] (a memory map: the text cache) as a device array split by rows as `text_rows`
    says (over `model`), padded with zero rows to a multiple of the shards S, and strided as the embedding tables
    are (`model.row_layout`): shard k holds rows k, k + S, k + 2S, ..., so that a catalogue's queries (its first
    rows), its popular or its newest texts spread over every shard rather than fill one owner's capacity
    (`model.lookup=all_to_all`). The layout lives on the devices only (the table is frozen, never saved); the
    model reads it through `encoding.text_position`. Each device reads only its own rows from the host, so nothing is
    first committed whole to one device, and a device holds rows / S of it."""
    sharding = text_sharding(mesh, rules)
    size, n = _devices_on(mesh, sharding.spec), table.shape[0]
    rows = max(-(-n // size), 1) * size
    per = rows // size

    def shard(index: tuple) -> np.ndarray:
        start, _, _ = index[0].indices(rows)
        part = np.asarray(table[start // per :: size], np.float32)  # (a replicated table: start 0, size 1)
        missing = per - len(part)
        return np.concatenate([part, np.zeros((missing, *table.shape[1:]), np.float32)]) if missing else part

    return jax.make_array_from_callback((rows, *table.shape[1:]), sharding, shard)


def table_layout(mesh: Mesh, params: Any, rules: Rules = DEFAULT_RULES) -> str:
    """One line per embedding table: its rows and how they lie on the mesh (logged at the start of a run)."""
    lines = []
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        names = path_names(path)
        if not any(n in ROW_SHARDED for n in names):
            continue
        sharding = param_sharding(mesh, path, leaf.shape, rules)
        per_device = sharding.shard_shape(leaf.shape)[0]
        axes = sharding.spec[0] if sharding.spec else None
        over = "+".join((axes,) if isinstance(axes, str) else axes or ())
        where = f"{per_device} per device over {over}={leaf.shape[0] // per_device}" if over else "replicated"
        lines.append(f"  {'/'.join(names)}: {leaf.shape[0]} rows x {leaf.shape[1]}, {where}")
    return "\n".join(lines)


def tree_shardings(mesh: Mesh, params: Any, tree: Any, rules: Rules = DEFAULT_RULES) -> Any:
    """Shardings for `tree` (params, or optimizer state that mirrors them): a leaf whose path ends with a
    parameter's path and has its shape is sharded like that parameter; other leaves by `param_sharding`
    of their own path (a row-sparse rule's per-row state: like its table)."""
    by_path = {path_names(p): leaf.shape for p, leaf in jax.tree_util.tree_leaves_with_path(params)}

    def rule(path, leaf):
        keys = path_names(path)
        for start in range(len(keys)):
            if by_path.get(keys[start:]) == getattr(leaf, "shape", None):
                return param_sharding(mesh, path[start:], leaf.shape, rules)
        return param_sharding(mesh, path, getattr(leaf, "shape", ()), rules)

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


def encoder_shardings(mesh: Mesh, params: Any, rules: Rules = DEFAULT_RULES) -> Any:
    """A text encoder's parameters (BERT or decoder), tensor parallel (Megatron's split): q/k/v kernels by
    output columns (`heads`), gate/up/intermediate by output columns (`mlp`), the o kernel by input rows
    (`heads`) and down/output kernels by input rows (`mlp`), so each device computes its heads and MLP columns
    and one all-reduce per block joins them; embedding tables by rows (`vocab`); norms and biases of row-split
    layers replicated. A dimension its shards do not divide stays whole (replicated), which is slower but equal."""
    by_columns = {"q": "heads", "k": "heads", "v": "heads", "query": "heads", "key": "heads", "value": "heads",
                  "gate": "mlp", "up": "mlp", "intermediate": "mlp"}  # fmt: skip
    by_rows = {"o": "heads", "attn_out": "heads", "down": "mlp", "output": "mlp"}

    def rule(path, leaf):
        names = path_names(path)
        owner, kind = names[-2] if len(names) > 1 else "", names[-1]
        axis, logical = None, None
        if kind == "embedding":
            axis, logical = 0, "vocab"
        elif owner in by_columns and kind in ("kernel", "bias"):
            axis, logical = leaf.ndim - 1, by_columns[owner]
        elif owner in by_rows and kind == "kernel":
            axis, logical = 0, by_rows[owner]
        if axis is None:
            return NamedSharding(mesh, P())
        partition = spec(rules, *[logical if i == axis else None for i in range(leaf.ndim)])
        if leaf.shape[axis] % _devices_on(mesh, P(partition[axis])):
            return NamedSharding(mesh, P())
        return NamedSharding(mesh, partition)

    return jax.tree_util.tree_map_with_path(rule, params)


def single_device_mesh(device: jax.Device | None = None) -> Mesh:
    """A 1 x 1 mesh on one device (the default one): where scoring, embeddings and export place what they read."""
    return make_mesh(MeshConfig(data=1, model=1), [device or jax.devices()[0]])
