"""Building blocks shared by every model: id hashing, stacked (per-domain / per-expert) dense layers.

Per-domain parameters are stacked on a leading K axis and applied to the whole batch at once, then
each example keeps the row of its own domain (`pick`): one dense matmul instead of K masked ones or
a loop, with static shapes under jit.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

Array = jax.Array


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


def normal(rngs: nnx.Rngs, shape: tuple[int, ...], stddev: float) -> nnx.Param:
    return nnx.Param(stddev * jax.random.normal(rngs.params(), shape, jnp.float32))


def zeros(shape: tuple[int, ...]) -> nnx.Param:
    return nnx.Param(jnp.zeros(shape, jnp.float32))


def pick(every: Array, index: Array) -> Array:
    """[B, n, ...] -> [B, ...]: row index[b] of example b (its domain's output)."""
    return jnp.take_along_axis(every, index.reshape(-1, *[1] * (every.ndim - 1)), axis=1)[:, 0]


class StackedDense(nnx.Module):
    """`n` independent dense layers [n, in, out] (one per domain, or per expert).

    `dtype` is the matmul's input dtype; `out_dtype` (default: `dtype`) the dtype it accumulates into
    and returns, so a bf16 layer can still give float32 logits."""

    def __init__(self, n: int, d_in: int, d_out: int, *, rngs: nnx.Rngs):
        self.kernel = normal(rngs, (n, d_in, d_out), (1.0 / d_in) ** 0.5)
        self.bias = zeros((n, d_out))

    def every(self, x: Array, dtype: jnp.dtype, out_dtype: jnp.dtype | None = None) -> Array:
        """Every layer on x: [B, in] or [B, n, in] -> [B, n, out]."""
        out_dtype = out_dtype or dtype
        spec = "bi,nio->bno" if x.ndim == 2 else "bni,nio->bno"
        y = jnp.einsum(spec, x.astype(dtype), self.kernel[...].astype(dtype), preferred_element_type=out_dtype)
        return y + self.bias[...].astype(out_dtype)

    def select(self, x: Array, index: Array, dtype: jnp.dtype, out_dtype: jnp.dtype | None = None) -> Array:
        """Layer index[b] on x[b]: [B, in] -> [B, out] (computes all n, keeps one: gathered, not looped)."""
        return pick(self.every(x, dtype, out_dtype), index)


class StackedMLP(nnx.Module):
    """`n` MLPs with ReLU after every layer (or every layer but the last, with `linear_out`, whose output
    is then float32 whatever the compute dtype: logits are not rounded to bf16)."""

    def __init__(self, n: int, d_in: int, widths: tuple[int, ...], *, rngs: nnx.Rngs, linear_out: bool = False):
        dims = (d_in, *widths)
        self.layers = nnx.List([StackedDense(n, a, b, rngs=rngs) for a, b in zip(dims[:-1], dims[1:])])
        self.linear_out = linear_out

    def every(self, x: Array, dtype: jnp.dtype) -> Array:
        """[B, in] -> [B, n, out]"""
        return self._run(x, lambda layer, h, out: layer.every(h, dtype, out))

    def select(self, x: Array, index: Array, dtype: jnp.dtype) -> Array:
        """MLP index[b] on x[b]: [B, in] -> [B, out]."""
        return self._run(x, lambda layer, h, out: layer.select(h, index, dtype, out))

    def _run(self, x: Array, apply_layer) -> Array:
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            linear = self.linear_out and i == last
            x = apply_layer(layer, x, jnp.float32 if linear else None)
            if not linear:
                x = jax.nn.relu(x)
        return x
