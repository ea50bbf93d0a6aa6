"""Building blocks shared by every model: id hashing, stacked (per-domain / per-expert) dense layers.

Per-domain parameters are stacked on a leading K axis and applied to the whole batch at once, then
each example keeps the row of its own domain: one dense matmul instead of K masked ones or a loop,
with static shapes under jit.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

Array = jax.Array


def hash_ids(ids: Array, vocab: int, rows: int) -> Array:
    """Maps ids in [0, vocab) to table rows in [0, rows); 0 ("missing") stays 0.

    Identity when the table has a row per id; otherwise a multiplicative hash into rows 1..rows-1.
    """
    if rows >= vocab:
        return ids
    h = (ids.astype(jnp.uint32) * jnp.uint32(2654435761)) % jnp.uint32(rows - 1)
    return jnp.where(ids == 0, 0, h.astype(jnp.int32) + 1)


def normal(rngs: nnx.Rngs, shape: tuple[int, ...], stddev: float) -> nnx.Param:
    return nnx.Param(stddev * jax.random.normal(rngs.params(), shape, jnp.float32))


def zeros(shape: tuple[int, ...]) -> nnx.Param:
    return nnx.Param(jnp.zeros(shape, jnp.float32))


class StackedDense(nnx.Module):
    """`n` independent dense layers [n, in, out] (one per domain, or per expert)."""

    def __init__(self, n: int, d_in: int, d_out: int, *, rngs: nnx.Rngs):
        self.kernel = normal(rngs, (n, d_in, d_out), (1.0 / d_in) ** 0.5)
        self.bias = zeros((n, d_out))

    def all(self, x: Array, dtype: jnp.dtype) -> Array:
        """Every layer on x: [B, in] or [B, n, in] -> [B, n, out]."""
        spec = "bi,nio->bno" if x.ndim == 2 else "bni,nio->bno"
        y = jnp.einsum(spec, x.astype(dtype), self.kernel[...].astype(dtype))
        return y + self.bias[...].astype(dtype)

    def select(self, x: Array, index: Array, dtype: jnp.dtype) -> Array:
        """Layer index[b] on x[b]: [B, in] -> [B, out] (computes all n, keeps one: gathered, not looped)."""
        return jnp.take_along_axis(self.all(x, dtype), index[:, None, None], axis=1)[:, 0]


class StackedMLP(nnx.Module):
    """`n` MLPs with ReLU after every layer (or every layer but the last, with `linear_out`)."""

    def __init__(self, n: int, d_in: int, widths: tuple[int, ...], *, rngs: nnx.Rngs, linear_out: bool = False):
        dims = (d_in, *widths)
        self.layers = nnx.List([StackedDense(n, a, b, rngs=rngs) for a, b in zip(dims[:-1], dims[1:])])
        self.linear_out = linear_out

    def all(self, x: Array, dtype: jnp.dtype) -> Array:
        """[B, in] -> [B, n, out]"""
        return self._run(x, lambda layer, h: layer.all(h, dtype))

    def select(self, x: Array, index: Array, dtype: jnp.dtype) -> Array:
        """MLP index[b] on x[b]: [B, in] -> [B, out]."""
        return self._run(x, lambda layer, h: layer.select(h, index, dtype))

    def _run(self, x: Array, apply_layer) -> Array:
        for i, layer in enumerate(self.layers):
            x = apply_layer(layer, x)
            if not (self.linear_out and i == len(self.layers) - 1):
                x = jax.nn.relu(x)
        return x
