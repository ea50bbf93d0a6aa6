"""What several backbones share: the record every backbone reads, plain dense stacks, the softmax mix of expert
outputs, shared-plus-own experts and the masked moving average of batch statistics."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from sr_jax.config import ModelConfig
from sr_jax.model.layers import Array, StackedDense, StackedMLP


class BackboneInput(NamedTuple):
    """What a backbone reads, for a batch of B examples of width W = 3d (the user, query and item sides)."""

    x_hat: Array  # [B, W] the fused sides after the domain adaptive layer (x itself without it)
    x: Array  # [B, W] the fused sides [user | query | item] before it: each side's own vector
    domain: Array  # [B] int32 each example's domain
    embedding: Array  # [B, g] each example's domain's row of L1's domain embedding (the model's one embedding of it)


def dense_stack(rngs: nnx.Rngs, dims: tuple[int, ...]) -> nnx.List:
    """One shared dense layer per consecutive pair of `dims` (StackedDense with one member)."""
    return nnx.List([StackedDense(1, a, b, rngs=rngs) for a, b in zip(dims[:-1], dims[1:])])


def relu_layer(layer: StackedDense, h: Array, dtype: jnp.dtype) -> Array:
    """relu(h W + b) of a shared dense layer: [B, in] -> [B, out]."""
    return jax.nn.relu(layer.all_layers(h, dtype)[:, 0])


def mix(logits: Array, experts: Array, dtype: jnp.dtype) -> Array:
    """Experts [B, E, h] weighted by softmax(logits [B, E]) (in float32) -> [B, h]."""
    weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    return jnp.einsum("be,beh->bh", weights.astype(dtype), experts)


def own_experts(cfg: ModelConfig, num_domains: int, width: int, *, rngs: nnx.Rngs) -> nnx.List:
    """`cfg.domain_experts` experts per domain: each a stack of one MLP per domain (an example runs its own)."""
    return nnx.List([StackedMLP(num_domains, width, cfg.expert_hidden, rngs=rngs) for _ in range(cfg.domain_experts)])


def shared_and_own(
    shared: StackedMLP, own: nnx.List, h_shared: Array, h_own: Array, domain: Array, dtype: jnp.dtype
) -> Array:
    """Every shared expert on `h_shared` and the example's own domain's experts on `h_own` -> [B, E + D, h]."""
    mine = jnp.stack([stack.own_layer(h_own, domain, dtype) for stack in own], axis=1)
    return jnp.concatenate([shared.all_layers(h_shared, dtype), mine], axis=1)


def masked_average(old: Array, new: Array, count: Array, momentum: float) -> Array:
    """The moving average m x old + (1 - m) x new of rows [K, ...], moved only where count [K, 1] > 0 (a row
    the batch did not hold keeps its value)."""
    return jnp.where(count > 0, momentum * old + (1 - momentum) * new, old)
