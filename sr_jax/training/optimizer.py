"""The optimizer and learning-rate schedule a TrainConfig describes, and freezing by level.

Every parameter leaf carries a label (`trainable_labels`):

    TRAIN     updated by the optimizer
    FROZEN    exactly zero update, no optimizer state, no weight decay, not counted by gradient clipping
    NEW_ROWS  a per-domain leaf of a frozen level: only the rows of the new domains are updated (and have
              optimizer state); the other rows are frozen as above
    SPARSE    an embedding table under a row-sparse rule (`sparse_update`): its gradient is the gathered
              rows' [U, d]; the chain only clips it (it counts in the global norm) and passes it on

`optax.masked` would not do: it passes masked-out gradients through unchanged, so "frozen" leaves
would still move (JAX-NOTES.md). The gradients of frozen leaves are replaced by zeros before anything
reads them, so XLA drops their backward computation.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

from sr_jax.config import TrainConfig
from sr_jax.model.levels import LEVELS, level_of
from sr_jax.training.sharding import ROW_SHARDED
from sr_jax.treeutil import path_names

TRAIN, FROZEN, NEW_ROWS, SPARSE = "train", "frozen", "new_rows", "sparse"


def learning_rate(cfg: TrainConfig, total_steps: int) -> optax.Schedule:
    warmup = min(cfg.warmup_steps, max(total_steps - 1, 0))
    if cfg.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(
            0.0, cfg.learning_rate, warmup, max(total_steps, warmup + 1), end_value=0.01 * cfg.learning_rate
        )
    if cfg.schedule == "constant":
        return optax.join_schedules(
            [optax.linear_schedule(0.0, cfg.learning_rate, warmup), optax.constant_schedule(cfg.learning_rate)],
            [warmup],
        )
    raise ValueError(f"train.schedule={cfg.schedule!r}: expected cosine or constant")


def check_levels(freeze: Sequence[str]) -> tuple[str, ...]:
    """Normalises `freeze` ("L0", "l1" ...) to level names; an unknown level is an error."""
    levels = tuple(dict.fromkeys(level.lower() for level in freeze))
    unknown = [level for level in levels if level not in LEVELS]
    if unknown:
        raise ValueError(f"finetune.freeze={list(freeze)}: unknown level(s) {unknown}; expected any of {LEVELS}")
    return levels


def trainable_labels(
    params: Any, freeze: Sequence[str], per_domain: Any, new_rows: Sequence[int], sparse_tables: bool = False
) -> Any:
    """A tree like `params` of TRAIN / FROZEN / NEW_ROWS / SPARSE. `per_domain` is a tree of bools: True
    where the leaf's first axis indexes domains; `new_rows` are the domains that stay trainable in frozen
    levels; `sparse_tables`: trainable embedding tables are updated row-sparsely."""
    frozen = check_levels(freeze)

    def label(path, _, is_per_domain):
        if level_of(path) not in frozen:
            return SPARSE if sparse_tables and path_names(path)[1] in ROW_SHARDED else TRAIN
        return NEW_ROWS if is_per_domain and new_rows else FROZEN

    return jax.tree_util.tree_map_with_path(label, params, per_domain)


def _zero_frozen_gradients(labels: Any, rows: jax.Array) -> optax.GradientTransformation:
    """Zeros for FROZEN leaves and for the frozen rows of NEW_ROWS leaves (stateless)."""

    def keep(label, g):
        if label == FROZEN:
            return jnp.zeros_like(g)
        if label == NEW_ROWS:
            return jnp.zeros_like(g).at[rows].set(g[rows])
        return g

    def update(updates, state, params=None):
        return jax.tree.map(keep, labels, updates), state

    return optax.GradientTransformation(lambda _: optax.EmptyState(), update)


def on_rows(inner: optax.GradientTransformation, rows: Sequence[int]) -> optax.GradientTransformation:
    """Runs `inner` on rows `rows` of every leaf (its state covers those rows only); other rows get zero."""
    idx = jnp.asarray(rows, jnp.int32)

    def take(tree):
        return None if tree is None else jax.tree.map(lambda x: x[idx], tree)

    def update(updates, state, params=None):
        small, state = inner.update(take(updates), state, take(params))
        return jax.tree.map(lambda u, s: jnp.zeros_like(u).at[idx].set(s), updates, small), state

    return optax.GradientTransformation(lambda params: inner.init(take(params)), update)


def build_optimizer(
    cfg: TrainConfig, total_steps: int, labels: Any, new_rows: Sequence[int] = ()
) -> optax.GradientTransformation:
    """clip(trainable gradients) -> the configured optimizer on TRAIN leaves and on the NEW_ROWS rows."""
    lr = learning_rate(cfg, total_steps)
    optimizers = {
        "adam": lambda: optax.adam(lr),
        "adamw": lambda: optax.adamw(lr, weight_decay=cfg.weight_decay),
        "adagrad": lambda: optax.adagrad(lr),
        "sgd": lambda: optax.sgd(lr, momentum=0.9),
    }
    if cfg.optimizer not in optimizers:
        raise ValueError(f"train.optimizer={cfg.optimizer!r}: expected one of {sorted(optimizers)}")
    opt = optimizers[cfg.optimizer]()
    clip = [optax.clip_by_global_norm(cfg.grad_clip)] if cfg.grad_clip > 0 else []
    rows = tuple(new_rows) or (0,)  # NEW_ROWS leaves exist only when new_rows is not empty
    return optax.chain(
        _zero_frozen_gradients(labels, jnp.asarray(rows, jnp.int32)),
        *clip,
        optax.multi_transform(
            {TRAIN: opt, NEW_ROWS: on_rows(opt, rows), FROZEN: optax.set_to_zero(), SPARSE: optax.identity()}, labels
        ),
    )
