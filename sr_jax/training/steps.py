"""The train state and the jit-compiled train and eval steps (split/merge style, pure functions)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from sr_jax import calibration
from sr_jax import model as sr_model
from sr_jax import sharding as shd
from sr_jax.training import sparse_update
from sr_jax.training.optimizer import combine, keep_frozen_stats, partition, zero_frozen_rows


class TrainState(NamedTuple):
    step: jax.Array  # int32 scalar
    params: Any
    opt_state: Any  # the optimizer's state of the trainable part of params (optimizer.partition)
    tables_state: Any  # the row-sparse rule's per-table state (sparse_update.init_state; {} when dense)


def loss_fn(graphdef: nnx.GraphDef, params, batch, text: sr_model.TextTable, reg_weight: float, **apply_kwargs):
    """mean binary cross-entropy + lambda * L_reg (+ the backbone's own term) -> (loss, (metrics, batch
    statistics)). `apply_kwargs`: see sr_model.apply (the step passes train=True)."""
    logits, aux = sr_model.apply(graphdef, params, batch, text, **apply_kwargs)
    bce = optax.sigmoid_binary_cross_entropy(logits, batch["label"].astype(jnp.float32)).mean()
    loss = bce + reg_weight * aux["reg"]
    metrics = {"loss": loss, "bce": bce, "reg": aux["reg"]}
    if "backbone_reg" in aux:  # a backbone's own term, weighted by its options (AdaSparse's sparsity)
        loss = loss + aux["backbone_reg"]
        metrics.update(loss=loss, backbone_reg=aux["backbone_reg"])
    if "lookup_dropped" in aux:  # ids a routed lookup dropped for want of capacity (model.lookup_capacity)
        metrics["lookup_dropped"] = aux["lookup_dropped"].astype(jnp.float32)
    return loss, (metrics, aux.get("stats", {}))


def init_state(
    params, roles, tx: optax.GradientTransformation, embedding_update: str = "dense", trainable_rows=None
) -> TrainState:
    """`trainable_rows`: see sparse_update.init_state (a frozen L0's new rows)."""
    return TrainState(
        jnp.zeros((), jnp.int32),
        params,
        tx.init(partition(params, roles)[0]),
        sparse_update.init_state(embedding_update, params, trainable_rows),
    )


def state_shardings(mesh: Mesh, state: TrainState, rules: shd.Rules = shd.DEFAULT_RULES) -> TrainState:
    return shd.tree_shardings(mesh, state.params, state, rules)


def make_train_step(
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    roles: Any,
    reg_weight: float,
    mesh: Mesh,
    state_sharding: TrainState,
    seed: int,
    grad_clip: float,
    new_domains: Sequence[int] = (),
    sparse: tuple[str, optax.Schedule] | None = None,
    grad_accum: int = 1,
    rules: shd.Rules = shd.DEFAULT_RULES,
):
    """jit(step)(state, batch, text, reference) -> (state, metrics); the state's buffers are donated.

    `grad_accum=N` splits the batch into N micro-batches (every N-th row, so each stays spread over the data
    axis), takes their gradients in turn (a scan: one micro-batch's activations live at a time) and averages
    them: the mean loss over N equal micro-batches is the batch's, so one update equals the update of the whole
    batch, but for the terms that depend on the batch's composition (L_reg between the domains of a batch, STAR's
    batch statistics), computed per micro-batch; batch statistics advance once per step (`accumulate`), those of
    frozen levels not at all (`optimizer.keep_frozen_stats`).

    Only the trainable part of the params (`roles`, see optimizer.py) is differentiated. `sparse`: (rule,
    learning-rate schedule) to update the embedding tables row-sparsely (`sparse_update`); `roles` must then
    mark the tables SPARSE. `reference`: the pretrained domains' distributions to align against, or None.
    Metrics: loss, bce, reg, and the trainable gradient's global norm before and after clipping."""

    def step(state: TrainState, batch, text, reference):
        with shd.model_context(mesh, rules):  # per-device grouping (layers.by_group)
            return _step(state, batch, text, reference)

    def _step(state: TrainState, batch, text, reference):
        key = jax.random.fold_in(jax.random.key(seed), state.step)  # the MMD subsample of this step
        if sparse is None:
            read, table_rows = state.params, None
        else:  # the params as this step reads them: each table replaced by the rows the batch gathers
            gathered = sparse_update.gather(state.params, sr_model.table_rows(graphdef, state.params, batch))
            read, table_rows = sparse_update.with_tables(state.params, gathered.embeddings), gathered.inverse
        trainable, fixed = partition(read, roles)

        def micro_grads(fixed, micro, rows, key):
            def loss_of(trainable):
                kwargs = dict(table_rows=rows, train=True, key=key, reference=reference)
                return loss_fn(graphdef, combine(trainable, fixed), micro, text, reg_weight, **kwargs)

            (_, (metrics, stats)), grads = jax.value_and_grad(loss_of, has_aux=True)(trainable)
            return grads, metrics, stats

        if grad_accum == 1:
            grads, metrics, stats = micro_grads(fixed, batch, table_rows, key)
        else:
            grads, metrics, stats = accumulate(micro_grads, fixed, batch, table_rows, key, grad_accum, mesh, rules)
        grads = zero_frozen_rows(grads, roles, new_domains)
        if sparse is not None:  # rows a frozen L0 keeps (all but its new rows) get no gradient
            num_rows = {k: t.shape[0] for k, t in sparse_update.tables(state.params).items()}
            rows = sparse_update.writable(state.tables_state, gathered)
            grads = sparse_update.with_tables(
                grads, sparse_update.mask_grads(sparse_update.tables(grads), rows, num_rows)
            )
        norm = optax.tree.norm(grads)
        metrics["grad_norm"] = norm
        metrics["grad_norm_clipped"] = jnp.minimum(norm, grad_clip) if grad_clip > 0 else norm
        updates, opt_state = tx.update(grads, state.opt_state, trainable)
        if sparse is None:
            params, tables_state = combine(optax.apply_updates(trainable, updates), fixed), state.tables_state
        else:
            no_tables = {key: None for key in gathered.uniq}
            dense = optax.apply_updates(
                sparse_update.with_tables(trainable, no_tables), sparse_update.with_tables(updates, no_tables)
            )
            rule, schedule = sparse
            tables, tables_state = sparse_update.apply(
                rule,
                schedule(state.step),
                state.step,
                sparse_update.tables(state.params),
                state.tables_state,
                gathered,
                sparse_update.tables(updates),
            )
            params = sparse_update.with_tables(combine(dense, fixed), tables)
        params = sr_model.with_stats(params, keep_frozen_stats(stats, roles, state.params, new_domains))
        return TrainState(state.step + 1, params, opt_state, tables_state), metrics

    return jax.jit(
        step,
        in_shardings=(
            state_sharding,
            shd.batch_sharding(mesh, rules),
            shd.text_sharding(mesh, rules),
            shd.replicated(mesh),
        ),
        out_shardings=(state_sharding, shd.replicated(mesh)),
        donate_argnums=0,
    )


def accumulate(micro_grads, fixed, batch, table_rows, key, n: int, mesh: Mesh, rules: shd.Rules):
    """`micro_grads` over n micro-batches (rows r, r + n, r + 2n, ... form micro-batch r) in a scan: the mean of
    their gradients, metrics and updated batch statistics. Every micro-batch reads the statistics as the step
    found them, so the statistics advance once per step whatever n is: AdaSparse's alpha by one step; a moving
    average (STAR's, AdaptDHM's) by its momentum times the mean over micro-batches of its masked update, i.e. a
    domain held by a share s of the micro-batches moves by s times the momentum (with n = 1, by all of it)."""

    def split(a):
        a = a.reshape(a.shape[0] // n, n, *a.shape[1:]).swapaxes(0, 1)
        return jax.lax.with_sharding_constraint(a, NamedSharding(mesh, shd.spec(rules, None, "batch")))

    micro = jax.tree.map(split, (batch, table_rows))

    def body(carry, xs):
        total, k = carry
        grads, metrics, stats = micro_grads(fixed, *xs, jax.random.fold_in(key, k))
        return (jax.tree.map(jnp.add, total, (grads, metrics, stats)), k + 1), None

    shapes = jax.eval_shape(lambda: micro_grads(fixed, *jax.tree.map(lambda a: a[0], micro), key))
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    (total, _), _ = jax.lax.scan(body, (zeros, 0), micro)
    return jax.tree.map(lambda a: a / n, total)


def make_predict_step(
    graphdef: nnx.GraphDef,
    mesh: Mesh,
    params_sharding,
    num_domains: int,
    output: str | tuple[str, ...] = ("logit", "calibrated_logit", "probability"),
    rules: shd.Rules = shd.DEFAULT_RULES,
):
    """jit(predict)(params, batch, text, trained=None, calibration=None) -> `sr_model.predict`'s `output` of the
    model in inference mode, replicated (every process can read it): by default {"logit", "calibrated_logit",
    "probability"}, each [B] (rank the logits); one name, e.g. "adapted" for z [B, 3d], gives that array alone.
    `trained`, `calibration`: see sr_model.predict (None: the identity map, of a Platt map's shape, so scoring
    before and after a Platt fit is one compiled program)."""
    identity = jax.device_put(calibration.arrays(None, [""] * num_domains), shd.replicated(mesh))

    def predict(params, batch, text, trained, table):
        with shd.model_context(mesh, rules):  # per-device grouping (layers.by_group)
            out = sr_model.predict(graphdef, params, batch, text, trained, table)
        return out[output] if isinstance(output, str) else {name: out[name] for name in output}

    jitted = jax.jit(
        predict,
        in_shardings=(
            params_sharding,
            shd.batch_sharding(mesh, rules),
            shd.text_sharding(mesh, rules),
            shd.replicated(mesh),
            shd.replicated(mesh),
        ),
        out_shardings=shd.replicated(mesh),
    )
    return lambda params, batch, text, trained=None, table=None: jitted(
        params, batch, text, trained, identity if table is None else table
    )
