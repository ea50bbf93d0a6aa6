"""Row-sparse updates of the embedding tables: a step reads and writes only the rows its batch reads.

A dense optimizer step over a [R, d] table reads and writes all R rows (and Adam's two moments) even
though a batch of B examples touches at most B of them; at 1M rows per field that traffic dominates the
step. With `train.embedding_update` set to a row-sparse rule, the train step instead

    1. finds each table's unique rows in the batch: `uniq` [U] (U = the lookups' count, padded with the
       out-of-range row R) and `inverse` (the batch's rows as positions in `uniq`);
    2. gathers them, `table[uniq]` [U, d], and differentiates the loss w.r.t. these gathered rows
       (the model reads them through `inverse`), so the gradient is [U, d], never [R, d];
    3. lets the dense optimizer chain clip, with the gathered rows counted in the global norm exactly as
       the dense gradient's non-zero rows would be;
    4. applies the rule below to the touched rows by scatter (padding rows are dropped).

Rules (state per table, sharded by rows like the table):

    rowwise_adagrad  acc[r] += mean_j g[r, j]^2;  w[r] -= lr * g[r] / (sqrt(acc[r]) + eps)
                     (FBGEMM/TorchRec's row-wise Adagrad: one accumulator per row). Untouched rows have
                     g = 0 and would not change under the dense rule either, so sparse == dense exactly.
    lazy_adam        optax.adam's update, applied to touched rows only (moments of other rows are not
                     decayed, as in TF's LazyAdam and torch's SparseAdam; bias correction by the global
                     step). Equal to dense Adam on every row a step touches while all earlier steps
                     touched it too (e.g. the first step).

Weight decay is not applied to tables under a row-sparse rule. Frozen tables (`finetune.freeze=l0`) take
no update whatever the rule, except their new rows (rows the pretrained run never trained: new keys,
cold ids): a fine-tune with a frozen L0 and new rows runs a row-sparse rule (lazy Adam when
`train.embedding_update` is dense), and each table's state holds a `trainable` row mask; the other rows
get zero gradient (they do not count in the global norm) and are never written.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from sr_jax.training.optimizer import ADAGRAD_EPS, check_levels
from sr_jax.sharding import ROW_SHARDED

TableKey = tuple[str, str]  # a table's path under params["l0"], e.g. ("id_tables", "user")
ADAM_B1, ADAM_B2, ADAM_EPS = 0.9, 0.999, 1e-8  # optax.adam's defaults


def effective_rule(rule: str, freeze: tuple[str, ...], has_new_rows: bool = False) -> str:
    """The configured rule; with L0 (the tables' level) frozen: dense (no table takes an update) unless the
    tables have `has_new_rows`, which a row-sparse rule trains (lazy Adam when the configured one is dense)."""
    if "l0" not in check_levels(freeze):
        return rule
    if not has_new_rows:
        return "dense"
    return "lazy_adam" if rule == "dense" else rule


def tables(params: Any) -> dict[TableKey, jax.Array]:
    """The embedding tables of a params tree, by key."""
    return {(group, name): t for group in ROW_SHARDED for name, t in params["l0"][group].items()}


def map_tables(params: Any, fn: Callable[[jax.Array], jax.Array]) -> Any:
    """`params` with `fn` applied to every embedding table."""
    return with_tables(params, {k: fn(t) for k, t in tables(params).items()})


def with_tables(params: Any, new: dict[TableKey, Any]) -> Any:
    """A shallow copy of `params` whose tables in `new` are replaced."""
    l0 = dict(params["l0"])
    for group in ROW_SHARDED:
        l0[group] = {name: new.get((group, name), t) for name, t in params["l0"][group].items()}
    return {**params, "l0": l0}


def init_state(rule: str, params: Any, trainable_rows: dict[TableKey, Any] | None = None) -> dict:
    """Per-table state, {group: {name: {arrays whose first axis is the table's rows}}}; empty for dense.
    `trainable_rows` ([R] bool per table): the only rows the rule may update (a frozen L0's new rows)."""
    if rule == "dense":
        return {}
    state: dict = {}
    for key, t in tables(params).items():
        if rule == "rowwise_adagrad":
            arrays = {"acc": jnp.zeros(t.shape[:1], jnp.float32)}
        else:
            arrays = {"mu": jnp.zeros(t.shape, jnp.float32), "nu": jnp.zeros(t.shape, jnp.float32)}
        if trainable_rows is not None:
            arrays["trainable"] = jnp.asarray(trainable_rows[key], bool)
        state.setdefault(key[0], {})[key[1]] = arrays
    return state


def writable(state: dict, gathered: Gathered) -> dict[TableKey, jax.Array]:
    """Each table's gathered rows as the rule may write them: rows outside its `trainable` mask become the
    out-of-range row (reads fill, writes drop)."""
    out = {}
    for (group, name), u in gathered.uniq.items():
        mask = state.get(group, {}).get(name, {}).get("trainable")
        out[(group, name)] = (
            u if mask is None else jnp.where(mask.at[u].get(mode="fill", fill_value=False), u, mask.shape[0])
        )
    return out


def mask_grads(grads: dict[TableKey, jax.Array], rows: dict[TableKey, jax.Array], num_rows: dict[TableKey, int]):
    """The gathered rows' gradients with the rows the rule may not write (`writable`) set to zero."""
    return {k: jnp.where((rows[k] < num_rows[k])[:, None], g, 0.0) for k, g in grads.items()}


class Gathered(NamedTuple):
    uniq: dict[TableKey, jax.Array]  # [U] the distinct rows read, padded with the out-of-range row R
    inverse: dict[TableKey, jax.Array]  # like the batch's rows: positions in uniq
    embeddings: dict[TableKey, jax.Array]  # [U, d] the gathered rows (zeros for padding)


def gather(params: Any, table_rows: dict[TableKey, jax.Array]) -> Gathered:
    """Each table's distinct rows in the batch, and their embeddings."""
    uniq, inverse, embeddings = {}, {}, {}
    for key, table in tables(params).items():
        flat = table_rows[key].reshape(-1)
        u, inv = jnp.unique(flat, size=flat.shape[0], fill_value=table.shape[0], return_inverse=True)
        uniq[key], inverse[key] = u, inv.reshape(table_rows[key].shape)
        embeddings[key] = table.at[u].get(mode="fill", fill_value=0)
    return Gathered(uniq, inverse, embeddings)


def apply(
    rule: str,
    lr: jax.Array,
    step: jax.Array,
    current: dict[TableKey, jax.Array],
    state: dict,
    gathered: Gathered,
    grads: dict[TableKey, jax.Array],
) -> tuple[dict[TableKey, jax.Array], dict]:
    """Updates the touched rows of the `current` tables by their gradients ([U, d] each, w.r.t.
    gathered.embeddings) -> (tables, state). `step` is the 0-based step count (lazy Adam's bias
    correction), `lr` this step's learning rate."""

    def read(x, u):
        return x.at[u].get(mode="fill", fill_value=0)

    new_tables, new_state = {}, {group: dict(by_name) for group, by_name in state.items()}
    rows = writable(state, gathered)
    for (group, name), g in grads.items():
        u, w, old = rows[(group, name)], gathered.embeddings[(group, name)], state[group][name]
        if rule == "rowwise_adagrad":
            acc = read(old["acc"], u) + jnp.mean(g * g, axis=-1)
            w = w - lr * g / (jnp.sqrt(acc) + ADAGRAD_EPS)[:, None]
            new = {"acc": acc}
        else:
            mu = ADAM_B1 * read(old["mu"], u) + (1 - ADAM_B1) * g
            nu = ADAM_B2 * read(old["nu"], u) + (1 - ADAM_B2) * g * g
            t = (step + 1).astype(jnp.float32)
            w = w - lr * (mu / (1 - ADAM_B1**t)) / (jnp.sqrt(nu / (1 - ADAM_B2**t)) + ADAM_EPS)
            new = {"mu": mu, "nu": nu}
        new_state[group][name] = {**old, **{k: old[k].at[u].set(v, mode="drop") for k, v in new.items()}}
        table = current[(group, name)]
        new_tables[(group, name)] = table.at[u].set(w.astype(table.dtype), mode="drop")
    return new_tables, new_state
