"""An embedding lookup routed by all-to-all (TorchRec's row-wise sharding, TPU SparseCore's routing), beside the
GSPMD lookup the model uses (`table[ids]` on a row-sharded table: a masked local gather and a collective).

    vectors, dropped = routed_lookup([table, ...], [ids, ...], mesh, capacity_factor=2.0)

Each table [R, d] split by contiguous rows over `table_axis` (M shards); its ids [N] split over `batch_axes`.
Each device dedupes its ids, sends each unique id to the shard that owns its row (all-to-all over `table_axis`, at most
`capacity` ids per shard), each shard gathers its rows and sends the vectors back (all-to-all), and the device
scatters them to its positions. A device sends ids and receives vectors for its own rows only: the bytes do not
grow with the global batch (GSPMD's lookup all-reduces or gathers vectors of every device's rows). Gradients
flow back the same way (all-to-all is its own transpose) into the owner's rows. Static shapes need a capacity:
`ceil(capacity_factor x N_local / M)` unique ids per owner; ids beyond it are dropped (zero vectors) and counted
in `dropped`, so a caller can see when skew exceeds it. `wire` (bfloat16) halves the bytes: the vectors travel
in it and are cast back on arrival, and their gradients travel back in it (the transpose of the casts), summed
into the owner's float32 rows after arrival. `capacity_factor=None` sizes every owner's slots for all
N_local ids, so nothing can drop (M times the buffers): what inference uses, so that evaluation, prediction and
the served model read every row, whatever the skew. Measured against GSPMD's lookup by
`python -m train.bench_scaling --lookups` (docs/PERFORMANCE.md); the model reads its tables so with
`model.lookup=all_to_all` (`encoding.FeatureEncoder`), on a mesh that splits them (`routed_axes`).
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax.sharding import AbstractMesh, Mesh, PartitionSpec as P

from sr_jax.model.layers import context_axes


def routed_lookup(
    tables: Sequence[jax.Array],
    ids: Sequence[jax.Array],
    mesh: Mesh | AbstractMesh,
    table_axis: str = "model",
    batch_axes: tuple[str, ...] = ("data", "model"),
    capacity_factor: float | None = 2.0,
    wire: jnp.dtype | None = None,
) -> tuple[list[jax.Array], jax.Array]:
    """Tables [R_t, d] (one width) and their ids [N_t] -> (vectors [N_t, d] split like the ids, ids dropped for want
    of capacity, summed over the mesh []). All tables travel together: three all-to-alls a step (ids, vectors,
    and the vectors' gradient), whatever the number of tables, so the fixed cost of a collective is paid once.
    `capacity_factor=None`: room for every id (none can drop). `wire`: the vectors' dtype in transit (default:
    the tables')."""
    shards = mesh.shape[table_axis]
    devices = math.prod(mesh.shape[a] for a in batch_axes)
    factor = shards if capacity_factor is None else capacity_factor
    capacities = [max(1, math.ceil(factor * (i.shape[0] // devices) / shards)) for i in ids]
    edges = [0, *itertools.accumulate(capacities)]

    def local(tables: list[jax.Array], ids: list[jax.Array]):
        plans = [_plan(i, t.shape[0], shards, c) for t, i, c in zip(tables, ids, capacities)]
        send = jnp.concatenate([p["send"] for p in plans], axis=1)  # [shards, sum of capacities]
        asked = jax.lax.all_to_all(send, table_axis, 0, 0, tiled=True)  # ids in my rows, from every device
        me = jax.lax.axis_index(table_axis)
        found = jnp.concatenate(
            [_read(t, asked[:, a:b], me) for t, a, b in zip(tables, edges[:-1], edges[1:])], axis=1
        )  # fmt: skip
        back = _exchange(found, table_axis, jnp.dtype(wire or found.dtype))  # [shards, sum of capacities, d]
        vectors = [_place(p, back[:, a:b]) for p, a, b in zip(plans, edges[:-1], edges[1:])]
        dropped = sum(p["dropped"] for p in plans)
        return vectors, jax.lax.psum(dropped, (*{*batch_axes, table_axis},))

    return jax.shard_map(
        local,
        mesh=mesh,
        in_specs=([P(table_axis, None)] * len(tables), [P(batch_axes)] * len(ids)),
        out_specs=([P(batch_axes, None)] * len(ids), P()),
        check_vma=False,
    )(list(tables), list(ids))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _exchange(x: jax.Array, axis: str, wire: jnp.dtype) -> jax.Array:
    """An all-to-all of `x` over `axis` (split and concatenated on dimension 0, its own transpose) travelling in
    `wire`; its gradient travels back the same way."""
    return _send(x, axis, wire)


def _send(x: jax.Array, axis: str, wire: jnp.dtype) -> jax.Array:
    if wire == x.dtype:
        return jax.lax.all_to_all(x, axis, 0, 0, tiled=True)
    # as unsigned bits of the wire's width: XLA:CPU widens a bfloat16 collective to float32 (so its compiled count
    # would not be the wire's), and every backend moves bits as they are
    bits = jax.lax.bitcast_convert_type(x.astype(wire), jnp.dtype(f"uint{8 * wire.itemsize}"))
    return jax.lax.bitcast_convert_type(jax.lax.all_to_all(bits, axis, 0, 0, tiled=True), wire).astype(x.dtype)


_exchange.defvjp(lambda x, axis, wire: (_send(x, axis, wire), None), lambda axis, wire, _, g: (_send(g, axis, wire),))


def _plan(ids: jax.Array, per_shard: int, shards: int, capacity: int) -> dict[str, jax.Array]:
    """One device's ids of one table: deduped, each unique id given its owner and a slot there; `send` [shards,
    capacity] holds them (-1: empty), those past the capacity dropped and counted."""
    uniq, inverse = jnp.unique(ids, size=ids.shape[0], fill_value=-1, return_inverse=True)
    valid = uniq >= 0
    # the unique ids come sorted, padding last, and rows lie in contiguous blocks: owners come sorted too, so an
    # id's slot at its owner is its distance from the owner's first id (no [N, shards] count: N log N)
    owner = jnp.where(valid, uniq // per_shard, shards)  # padding goes to no shard
    slot = jnp.arange(owner.shape[0]) - jnp.searchsorted(owner, owner, side="left")
    keep = valid & (slot < capacity)
    send = jnp.full((shards, capacity), -1, ids.dtype).at[jnp.where(keep, owner, shards), slot].set(uniq, mode="drop")
    return dict(send=send, owner=jnp.minimum(owner, shards - 1), slot=jnp.minimum(slot, capacity - 1), keep=keep,
                inverse=inverse.reshape(-1), dropped=jnp.sum(valid & ~keep))  # fmt: skip


def _read(rows: jax.Array, asked: jax.Array, me: jax.Array) -> jax.Array:
    """This device's rows [R/shards, d] of the ids asked of it [shards, capacity] (-1: none)
    -> [shards, capacity, d]."""
    mine = asked - me * rows.shape[0]
    return rows[jnp.clip(mine, 0, rows.shape[0] - 1)] * (asked >= 0)[..., None]


def _place(plan: dict[str, jax.Array], back: jax.Array) -> jax.Array:
    """The vectors returned for one table's sent ids [shards, capacity, d] -> [N, d] in the ids' order."""
    vectors = back[plan["owner"], plan["slot"]] * plan["keep"][:, None]
    return vectors[plan["inverse"]]


def routed_axes(ids: int) -> tuple[str, tuple[str, ...]] | None:
    """Under the context mesh and logical rules (`sharding.model_context`): (the one mesh axis the tables' rows are
    split over, the batch's axes) when a routed lookup applies to `ids` ids: the rows split over more than one
    device, on an axis the batch is split over too, and the ids divide over the batch's devices. None: gather."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return None
    rows, batch = context_axes("table_rows", "model"), context_axes("batch", "data")
    shape = dict(mesh.shape)
    if len(rows) != 1 or shape.get(rows[0], 1) == 1 or rows[0] not in batch:
        return None
    if ids % math.prod(shape[a] for a in batch):
        return None
    return rows[0], batch
