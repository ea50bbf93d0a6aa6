"""The optimizer and learning-rate schedule a TrainConfig describes, and freezing by level.

Every parameter leaf carries a role (`param_roles`):

    TRAIN        updated by the optimizer
    NEW_DOMAINS  a per-domain leaf of a frozen level: only the rows of the new domains are updated (and have
                 optimizer state); the other rows get exactly zero update
    SPARSE       an embedding table under a row-sparse rule (`sparse_update`): its gradient is the gathered
                 rows' [U, d]; the chain only clips it (it counts in the global norm) and passes it on. In a
                 frozen L0 the tables are SPARSE when some of their rows are new (never trained by the
                 pretrained run): the rule updates those rows only (`sparse_update`, "trainable")
    ROWWISE      an embedding table read by routed lookups (`model.lookup=all_to_all`) under
                 `train.embedding_update=rowwise_adagrad`: its gradient is dense over the device's own rows (the
                 routed lookup's transpose), and `rowwise_adagrad` updates it there, the row-sparse rule's exact
                 result (rows no batch read have a zero gradient and do not move)
    FROZEN       a leaf of a frozen level: not differentiated at all, no optimizer state, no weight decay
    STATS        batch statistics (STAR's partitioned normalisation, AdaptDHM's centroids, AdaSparse's alpha):
                 not differentiated or optimized; the forward pass in training writes them
    STATS_NEW_DOMAINS  a per-domain statistic of a frozen level: only the new domains' rows are written
    STATS_FROZEN       any other statistic of a frozen level: never written (`keep_frozen_stats`)

The train step splits the params by role *before* differentiating (`partition`): the loss is a
function of the trainable part only, the rest is a constant, so XLA never builds the gradient of a
frozen table (a dense [rows, d] array per table). The optimizer works on the trainable part alone.
`optax.masked` would not do for freezing: it passes masked-out gradients through unchanged, so
"frozen" leaves would still move (docs/JAX-NOTES.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sr_jax.config import TrainConfig
from sr_jax.model.levels import level_of
from sr_jax.sharding import ROW_SHARDED
from sr_jax.treeutil import path_names, path_str

TRAIN, NEW_DOMAINS, SPARSE, ROWWISE, FROZEN, STATS = "train", "new_domains", "sparse", "rowwise", "frozen", "stats"
STATS_NEW_DOMAINS, STATS_FROZEN = "stats_new_domains", "stats_frozen"
TRAINABLE = (TRAIN, NEW_DOMAINS, SPARSE, ROWWISE)
ADAGRAD_EPS = 1e-8  # row-wise Adagrad's, in either form (`rowwise_adagrad`, `sparse_update`)


def learning_rate(cfg: TrainConfig, total_steps: int, peak: float | None = None) -> optax.Schedule:
    """Warm-up, then cosine decay (to 1% of the peak) or constant; `peak` defaults to train.learning_rate
    (the row-sparse embedding rule passes train.embedding_learning_rate)."""
    peak = cfg.learning_rate if peak is None else peak
    warmup = min(cfg.warmup_steps, max(total_steps - 1, 0))
    if cfg.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(
            0.0, peak, warmup, max(total_steps, warmup + 1), end_value=0.01 * peak
        )
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), optax.constant_schedule(peak)], [warmup])


def check_levels(freeze: Sequence[str]) -> tuple[str, ...]:
    """Normalises `freeze` ("L0", "l1" ...) to level names (`config.validate` has rejected unknown ones)."""
    return tuple(dict.fromkeys(level.lower() for level in freeze))


def param_roles(
    params: Any,
    freeze: Sequence[str],
    per_domain: Any,
    new_domains: Sequence[int],
    sparse_tables: bool = False,
    stats: Any = None,
    has_new_rows: bool = False,
    new_leaves: frozenset[str] = frozenset(),
    rowwise_tables: bool = False,
) -> Any:
    """A tree like `params` of roles. `per_domain` is a tree of bools: True where the leaf's first axis
    indexes domains; `new_domains` are the domains that stay trainable in frozen levels; `sparse_tables`:
    trainable embedding tables are updated row-sparsely; `rowwise_tables`: by row-wise Adagrad in its dense
    form (ROWWISE); `stats`: a tree of bools, True for batch statistics (`sr_jax.model.stats_mask`);
    `has_new_rows`: the tables have rows that stay trainable in a frozen L0 (row-sparsely); `new_leaves`: paths
    of leaves the pretrained run lacks (a new sparse field's table and projection), trainable whatever is
    frozen."""
    frozen = check_levels(freeze)
    stats = jax.tree.map(lambda _: False, params) if stats is None else stats

    def role(path, _, is_per_domain, is_stats):
        if is_stats and level_of(path) in frozen:
            return STATS_NEW_DOMAINS if is_per_domain and new_domains else STATS_FROZEN
        if is_stats:
            return STATS
        table = path_names(path)[1] in ROW_SHARDED
        if level_of(path) not in frozen or path_str(path) in new_leaves:
            return SPARSE if sparse_tables and table else ROWWISE if rowwise_tables and table else TRAIN
        if table and has_new_rows:
            return SPARSE
        return NEW_DOMAINS if is_per_domain and new_domains else FROZEN

    return jax.tree_util.tree_map_with_path(role, params, per_domain, stats)


def partition(tree: Any, roles: Any) -> tuple[Any, Any]:
    """(trainable, fixed): two trees shaped like `tree`, each with None where the other has the leaf."""
    trainable = jax.tree.map(lambda role, x: x if role in TRAINABLE else None, roles, tree)
    fixed = jax.tree.map(lambda role, x: None if role in TRAINABLE else x, roles, tree)
    return trainable, fixed


def combine(trainable: Any, fixed: Any) -> Any:
    """The inverse of `partition`."""
    return jax.tree.map(lambda a, b: b if a is None else a, trainable, fixed, is_leaf=lambda x: x is None)


def zero_frozen_rows(grads: Any, roles: Any, new_domains: Sequence[int]) -> Any:
    """The gradient of the trainable part with the frozen rows of NEW_DOMAINS leaves set to zero."""
    if not new_domains:
        return grads
    rows = jnp.asarray(new_domains, jnp.int32)

    def keep(role, g):
        return jnp.zeros_like(g).at[rows].set(g[rows]) if role == NEW_DOMAINS else g

    return jax.tree.map(keep, partition(roles, roles)[0], grads)


def keep_frozen_stats(stats: Any, roles: Any, before: Any, new_domains: Sequence[int]) -> Any:
    """The batch statistics a train step writes (`stats`, a subtree of the params), with those of frozen levels
    kept as they were (`before`: the params the step started from), but for the new domains' rows of a
    per-domain one."""
    if not isinstance(stats, dict):
        if roles == STATS_FROZEN:
            return before
        if roles == STATS_NEW_DOMAINS:
            rows = jnp.asarray(new_domains, jnp.int32)
            return before.at[rows].set(stats[rows])
        return stats
    return {k: keep_frozen_stats(v, roles[k], before[k], new_domains) for k, v in stats.items()}


def on_rows(inner: optax.GradientTransformation, rows: Sequence[int]) -> optax.GradientTransformation:
    """Runs `inner` on rows `rows` of every leaf (its state covers those rows only); other rows get zero."""
    idx = jnp.asarray(rows, jnp.int32)

    def take(tree):
        return None if tree is None else jax.tree.map(lambda x: x[idx], tree)

    def update(updates, state, params=None):
        small, state = inner.update(take(updates), state, take(params))
        return jax.tree.map(lambda u, s: jnp.zeros_like(u).at[idx].set(s), updates, small), state

    return optax.GradientTransformation(lambda params: inner.init(take(params)), update)


class RowwiseAdagradState(NamedTuple):
    count: jax.Array  # steps taken: the schedule's position
    acc: Any  # per table [rows]: the sum over steps of the mean squared gradient of each row


def rowwise_adagrad(schedule: optax.Schedule) -> optax.GradientTransformation:
    """Row-wise Adagrad (FBGEMM/TorchRec's; `sparse_update`'s rowwise_adagrad) in its dense form over whole
    tables [R, d]: acc[r] += mean_j g[r, j]^2; update[r] = -lr g[r] / (sqrt(acc[r]) + eps). A row the batch did
    not read has g = 0 and moves by 0, so it equals the row-sparse rule exactly; its state is one float a row
    (Adam's is 2d), split by rows like the table. For tables read by routed lookups, whose gradient is already
    dense over each device's own rows."""

    def init(params):
        return RowwiseAdagradState(jnp.zeros([], jnp.int32), jax.tree.map(lambda t: jnp.zeros(t.shape[:1]), params))

    def update(grads, state, params=None):
        acc = jax.tree.map(lambda a, g: a + jnp.mean(g * g, axis=-1), state.acc, grads)
        lr = schedule(state.count)
        updates = jax.tree.map(lambda g, a: -lr * g / (jnp.sqrt(a) + ADAGRAD_EPS)[:, None], grads, acc)
        return updates, RowwiseAdagradState(optax.safe_increment(state.count), acc)

    return optax.GradientTransformation(init, update)


# Factors that start at the identity or at one, as multipliers of another weight: the Domain Adaptive Layer's
# W_k (identity) and STAR's per-domain W_k (ones, multiplying the shared kernel). Decay pulls toward zero, which
# for them is not a simpler model but another one (W_k -> 0 switches the domain's input or layer off): not decayed.
NOT_DECAYED = ("adapter/proj/kernel", "domain_kernels")


def decays(path: tuple) -> bool:
    """Weight decay applies to weight matrices (kernels) only: never to biases, norms or embeddings, nor to the
    identity- and one-initialised factors (NOT_DECAYED)."""
    name = "/".join(path_names(path))
    return "kernel" in name and not any(factor in name for factor in NOT_DECAYED)


def fresh_parts(
    params: Any, roles: Any, per_domain: Any, new_domains: Sequence[int], new_rows: Any, new_leaves: frozenset[str]
) -> Any:
    """What a fine-tune did not take from pretraining, for `guard`: per TRAIN leaf a bool mask broadcast against
    it, True where it is new (a new field's leaf; a per-domain leaf's new-domain rows; a table's rows the
    pretrained run never trained, `new_rows.mask`); None for the other roles (NEW_DOMAINS rows are all new,
    SPARSE tables take their own rule)."""
    rows = np.zeros(0, np.int32) if not new_domains else np.asarray(new_domains, np.int32)

    def fresh(path, role, leaf, is_per_domain):
        if role != TRAIN:
            return None
        shape = (-1, *[1] * (len(leaf.shape) - 1))
        key = tuple(path_names(path)[1:3])
        if path_str(path) in new_leaves:
            return np.bool_(True)
        if is_per_domain:
            mask = np.zeros(leaf.shape[0], bool)
            mask[rows] = True
            return mask.reshape(shape)
        if new_rows is not None and key in new_rows.mask:
            return np.asarray(new_rows.mask[key]).reshape(shape)
        return np.bool_(False)

    return jax.tree_util.tree_map_with_path(fresh, roles, params, per_domain)


def guard(fresh: Any, probe_steps: int, rate: float, l2sp: float) -> tuple[list, list]:
    """Fine-tuning that keeps what pretraining learned (`finetune.probe_steps`, `pretrained_lr`, `l2sp_weight`):
    (transforms before the optimizer, after it). Before: L2-SP, the gradient of l2sp/2 ||theta - theta_0||^2 of
    the pretrained parts (theta_0, the start, kept in the optimizer state). After: the pretrained parts' updates
    are zero for the first `probe_steps` steps (linear probing: only new rows, domains and fields move), then
    scaled by `rate`. `fresh`: `fresh_parts`."""
    is_none = lambda x: x is None  # noqa: E731

    def pretrained(f, x, value):
        return x if f is None or x is None else jnp.where(f, x, value)

    before, after = [], []
    if l2sp:

        def init(params):
            return jax.tree.map(lambda f, p: None if f is None else p, fresh, params, is_leaf=is_none)

        def update(updates, start, params):
            pull = jax.tree.map(
                lambda f, g, p, p0: pretrained(f, g, g + l2sp * (p - p0)) if f is not None else g,
                fresh, updates, params, start, is_leaf=is_none,
            )  # fmt: skip
            return pull, start

        before.append(optax.GradientTransformation(init, update))
    if probe_steps or rate != 1.0:

        def scale(updates, state, params=None):
            factor = jnp.where(state.count < probe_steps, 0.0, rate)
            scaled = jax.tree.map(lambda f, u: pretrained(f, u, factor * u), fresh, updates, is_leaf=is_none)
            return scaled, optax.ScaleByScheduleState(count=optax.safe_increment(state.count))

        after.append(
            optax.GradientTransformation(lambda _: optax.ScaleByScheduleState(count=jnp.zeros([], jnp.int32)), scale)
        )
    return before, after


def build_optimizer(
    cfg: TrainConfig,
    total_steps: int,
    roles: Any,
    new_domains: Sequence[int] = (),
    guarded: tuple[list, list] = ([], []),
) -> optax.GradientTransformation:
    """For the trainable part (`partition(params, roles)[0]`) of the params, its gradient already passed
    through `zero_frozen_rows`: clip -> (`guard`'s L2-SP) -> the configured optimizer on TRAIN leaves and on the
    NEW_DOMAINS rows, row-wise Adagrad on ROWWISE tables (at train.embedding_learning_rate, as the row-sparse
    rule) -> (`guard`'s probing and pretrained rate)."""
    lr = learning_rate(cfg, total_steps)
    table_lr = learning_rate(cfg, total_steps, peak=cfg.embedding_learning_rate or cfg.learning_rate)

    def decay_mask(params):
        return jax.tree_util.tree_map_with_path(lambda path, _: decays(path), params)

    optimizers = {
        "adam": lambda: optax.adam(lr),
        "adamw": lambda: optax.adamw(lr, weight_decay=cfg.weight_decay, mask=decay_mask),
        "adagrad": lambda: optax.adagrad(lr),
        "sgd": lambda: optax.sgd(lr, momentum=0.9),
    }
    opt = optimizers[cfg.optimizer]()
    clip = [optax.clip_by_global_norm(cfg.grad_clip)] if cfg.grad_clip > 0 else []
    rows = tuple(new_domains) or (0,)  # NEW_DOMAINS leaves exist only when new_domains is not empty
    before, after = guarded
    return optax.chain(
        *clip,
        *before,
        optax.multi_transform(
            {
                TRAIN: opt,
                NEW_DOMAINS: on_rows(opt, rows),
                SPARSE: optax.identity(),
                ROWWISE: rowwise_adagrad(table_lr),
            },
            partition(roles, roles)[0],
        ),
        *after,
    )
