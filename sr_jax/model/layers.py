"""Building blocks shared by every model: id hashing, stacked (per-domain / per-expert) dense layers.

Per-domain and per-expert parameters are stacked on a leading axis. Every expert sees every example
(`all_layers`: one matmul). A per-domain layer runs each example through its own domain's weights only
(`own_layer`, through `by_group`): examples are sorted into tiles of one domain each, so the work grows with
the batch, not with the number of domains K (computing all K and keeping one grew linearly: docs/PERFORMANCE.md,
"Many domains"), with static shapes under jit.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx
from flax.core import spmd
from jax.sharding import PartitionSpec as P

Array = jax.Array
TILE = 32  # rows per tile of by_group: a multiple of the vector width; fastest of 8..64 on CPU at K = 7..100


def fmix32(x: Array) -> Array:
    """MurmurHash3's 32-bit finaliser: every input bit flips each output bit with probability ~1/2."""
    x = x.astype(jnp.uint32)
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x85EBCA6B)
    x = x ^ (x >> 13)
    x = x * jnp.uint32(0xC2B2AE35)
    return x ^ (x >> 16)


def hash_ids(ids: Array, vocab: int, rows: int) -> Array:
    """Maps ids in [0, vocab) to table rows in [0, rows); 0 ("missing") stays 0.

    Identity when the table has a row per id; otherwise a mixed hash into rows 1..rows-1. The mixing
    matters: a bare multiplicative hash modulo a power of two keeps the low bits, so ids that differ
    by a multiple of the bucket count would always collide.
    """
    if rows >= vocab:
        return ids
    h = fmix32(ids) % jnp.uint32(rows - 1)
    return jnp.where(ids == 0, 0, h.astype(jnp.int32) + 1)


def masked_softmax(logits: Array, mask: Array) -> Array:
    """Softmax over the last axis where mask is True; 0 elsewhere, and all-0 where nothing is present."""
    logits = jnp.where(mask, logits, -jnp.inf)
    safe = jnp.where(mask.any(-1, keepdims=True), logits, 0.0)
    return jnp.where(mask, jax.nn.softmax(safe, axis=-1), 0.0)


def normal(rngs: nnx.Rngs, shape: tuple[int, ...], stddev: float) -> nnx.Param:
    return nnx.Param(stddev * jax.random.normal(rngs.params(), shape, jnp.float32))


def zeros(shape: tuple[int, ...]) -> nnx.Param:
    return nnx.Param(jnp.zeros(shape, jnp.float32))


def by_group(x: Array, index: Array, n: int, apply: Callable[[Array, Array], Array], tile: int = TILE) -> Array:
    """Runs `apply` on the examples of each group at once: x [B, in], index [B] in [0, n) -> [B, out].

    Examples are placed, group by group, into tiles of `tile` rows that each hold one group (a group's last
    tile padded with zeros): at most B + n * (tile - 1) rows, a static bound. `apply(tiles [T, tile, in],
    group [T]) -> [T, tile, out]` computes each tile with its group's parameters (e.g. `kernel[group]`), and
    every example's output row is read back in the original order; padding rows are never read, so they get
    no gradient. Equal to computing every group on every example and keeping the example's own, in a cost
    that does not grow with n.

    Under a mesh that splits the batch (the context mesh, `jax.sharding.use_abstract_mesh`, and the logical
    `batch` rule, which the train and predict steps set: `sharding.model_context`), the batch is grouped shard
    by shard: [D, B / D] with D on the batch's mesh axes, each shard into its own tiles (at most B / D + n *
    (tile - 1) rows), so that the sort, the scatter and the layers stay on the device that holds the rows.
    Sorting the global batch instead would gather it onto every device, each then computing every tile of the
    global batch."""
    b, d = x.shape[0], data_shards(x.shape[0])
    shard = lambda a: constrain(a.reshape(d, b // d, *a.shape[1:]))  # noqa: E731
    rows, tiles, group = jax.vmap(lambda x, i: _tiles(x, i, n, tile))(shard(x), shard(index))
    out = apply(tiles.reshape(-1, tile, x.shape[1]), group.reshape(-1))  # every shard's tiles, on its device
    out = constrain(out.reshape(d, -1, out.shape[-1]))
    return jax.vmap(lambda o, r: o[r])(out, rows).reshape(b, -1)


def context_axes(logical: str, default: str) -> tuple[str, ...]:
    """The mesh axes a logical axis lies on under the logical rules in context (`sharding.model_context`;
    `default` when none is set)."""
    axes = dict(spmd.get_logical_axis_rules()).get(logical, default)
    return (axes,) if isinstance(axes, str) else tuple(axes or ())


def _batch_axes() -> tuple[str, ...]:
    """The mesh axes the batch lies on (`data` when no rule says)."""
    return context_axes("batch", "data")


def context_shards(logical: str, default: str) -> int:
    """How many devices of the context mesh a logical axis is split over (`context_axes`; 1 without a mesh)."""
    mesh = jax.sharding.get_abstract_mesh()
    shape = {} if mesh.empty else dict(mesh.shape)
    return math.prod(shape.get(a, 1) for a in context_axes(logical, default))


def data_shards(batch: int) -> int:
    """How many shards of the batch's mesh axes split a batch of this size under the context mesh (1: none)."""
    d = context_shards("batch", "data")
    return d if batch % d == 0 else 1


def constrain(a: Array) -> Array:
    """`a` [D, ...] with its first axis on the batch's mesh axes (nothing without a context mesh)."""
    if jax.sharding.get_abstract_mesh().empty or a.shape[0] == 1:
        return a
    return jax.lax.with_sharding_constraint(a, P(_batch_axes()))


def _tiles(x: Array, index: Array, n: int, tile: int) -> tuple[Array, Array, Array]:
    """One shard's grouping: (each row's place in the tiles [B], the tiles [T, tile, in], each tile's group [T])."""
    b = x.shape[0]
    num_tiles = -(-(b + n * (tile - 1)) // tile)
    sizes = jnp.bincount(index, length=n)
    padded = -(-sizes // tile) * tile
    ends = jnp.cumsum(padded)
    order = jnp.argsort(index, stable=True)
    rank = jnp.arange(b) - (jnp.cumsum(sizes) - sizes)[index[order]]  # place within its group, sorted order
    row = jnp.zeros(b, jnp.int32).at[order].set((ends - padded)[index[order]] + rank)  # [B] row in the tiles
    tiles = jnp.zeros((num_tiles * tile, x.shape[1]), x.dtype).at[row].set(x).reshape(num_tiles, tile, -1)
    starts = jnp.arange(num_tiles) * tile
    group = jnp.minimum(jnp.searchsorted(ends, starts, side="right"), n - 1)  # [T]; spare tiles: any group
    return row, tiles, group


class Dense(nnx.Module):
    """One dense layer [in, out] that every example goes through (`dtype`, `out_dtype` as StackedDense's)."""

    def __init__(self, d_in: int, d_out: int, *, rngs: nnx.Rngs):
        self.kernel = normal(rngs, (d_in, d_out), (1.0 / d_in) ** 0.5)
        self.bias = zeros((d_out,))

    def __call__(self, x: Array, dtype: jnp.dtype, out_dtype: jnp.dtype | None = None) -> Array:
        """[B, in] -> [B, out]"""
        out_dtype = out_dtype or dtype
        y = jnp.einsum("bi,io->bo", x.astype(dtype), self.kernel[...].astype(dtype), preferred_element_type=out_dtype)
        return y + self.bias[...].astype(out_dtype)


class MLP(nnx.Module):
    """Dense layers with ReLU after every one (or every one but the last, with `linear_out`: float32 out)."""

    def __init__(self, d_in: int, widths: tuple[int, ...], *, rngs: nnx.Rngs, linear_out: bool = False):
        dims = (d_in, *widths)
        self.layers = nnx.List([Dense(a, b, rngs=rngs) for a, b in zip(dims[:-1], dims[1:])])
        self.linear_out = linear_out

    def __call__(self, x: Array, dtype: jnp.dtype) -> Array:
        """[B, in] -> [B, out]"""
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            if self.linear_out and i == last:
                return layer(x, dtype, jnp.float32)
            x = jax.nn.relu(layer(x, dtype))
        return x


class StackedDense(nnx.Module):
    """`n` independent dense layers [n, in, out] (one per domain, or per expert).

    `dtype` is the matmul's input dtype; `out_dtype` (default: `dtype`) the dtype it accumulates into
    and returns, so a bf16 layer can still give float32 logits."""

    def __init__(self, n: int, d_in: int, d_out: int, *, rngs: nnx.Rngs):
        self.kernel = normal(rngs, (n, d_in, d_out), (1.0 / d_in) ** 0.5)
        self.bias = zeros((n, d_out))

    def all_layers(self, x: Array, dtype: jnp.dtype, out_dtype: jnp.dtype | None = None) -> Array:
        """Every layer on x: [B, in] or [B, n, in] -> [B, n, out]."""
        out_dtype = out_dtype or dtype
        spec = "bi,nio->bno" if x.ndim == 2 else "bni,nio->bno"
        y = jnp.einsum(spec, x.astype(dtype), self.kernel[...].astype(dtype), preferred_element_type=out_dtype)
        return y + self.bias[...].astype(out_dtype)

    def per_tile(self, x: Array, group: Array, dtype: jnp.dtype, out_dtype: jnp.dtype | None = None) -> Array:
        """Layer group[t] on tile t: [T, rows, in] -> [T, rows, out] (by_group's `apply`)."""
        out_dtype = out_dtype or dtype
        kernel = self.kernel[...][group].astype(dtype)
        y = jnp.einsum("tri,tio->tro", x.astype(dtype), kernel, preferred_element_type=out_dtype)
        return y + self.bias[...][group][:, None].astype(out_dtype)

    def own_layer(self, x: Array, index: Array, dtype: jnp.dtype, out_dtype: jnp.dtype | None = None) -> Array:
        """Layer index[b] on x[b]: [B, in] -> [B, out], each example through its own layer only."""
        return by_group(x, index, self.kernel.shape[0], lambda t, g: self.per_tile(t, g, dtype, out_dtype))


class StackedMLP(nnx.Module):
    """`n` MLPs with ReLU after every layer (or every layer but the last, with `linear_out`, whose output
    is then float32 whatever the compute dtype: logits are not rounded to bf16)."""

    def __init__(self, n: int, d_in: int, widths: tuple[int, ...], *, rngs: nnx.Rngs, linear_out: bool = False):
        dims = (d_in, *widths)
        self.layers = nnx.List([StackedDense(n, a, b, rngs=rngs) for a, b in zip(dims[:-1], dims[1:])])
        self.linear_out = linear_out

    def all_layers(self, x: Array, dtype: jnp.dtype) -> Array:
        """[B, in] -> [B, n, out]"""
        return self._run(x, lambda layer, h, out: layer.all_layers(h, dtype, out))

    def own_layer(self, x: Array, index: Array, dtype: jnp.dtype) -> Array:
        """MLP index[b] on x[b]: [B, in] -> [B, out] (grouped once for all its layers)."""
        n = self.layers[0].kernel.shape[0]
        return by_group(x, index, n, lambda t, g: self._run(t, lambda layer, h, out: layer.per_tile(h, g, dtype, out)))

    def _run(self, x: Array, apply_layer) -> Array:
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            linear = self.linear_out and i == last
            x = apply_layer(layer, x, jnp.float32 if linear else None)
            if not linear:
                x = jax.nn.relu(x)
        return x
