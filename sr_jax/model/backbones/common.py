"""What several backbones share: the records every backbone reads and gives, the softmax mix of expert outputs,
shared-plus-own experts and the masked moving average of batch statistics (plain dense layers and MLPs are
`layers.Dense` and `layers.MLP`)."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from sr_jax.config import ModelConfig
from sr_jax.model.layers import Array, StackedMLP


class BackboneInput(NamedTuple):
    """What a backbone reads, for a batch of B examples of width W = 3d (the user, query and item sides)."""

    x_hat: Array  # [B, W] the fused sides after the domain adaptive layer (x itself without it)
    x: Array  # [B, W] the fused sides [user | query | item] before it: each side's own vector
    domain: Array  # [B] int32 each example's domain
    embedding: Array  # [B, g] each example's domain's row of L1's domain embedding (the model's one embedding of it)


class BackboneOutput(NamedTuple):
    """What a backbone gives L2."""

    experts: Array  # [B, E, h] E expert outputs per example (E = 1: L2 takes it as it is)
    gate_input: Array | None = None  # [B, g] what L2's domain gates read when E > 1; None: x_hat


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
