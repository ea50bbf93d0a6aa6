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


class StepConfig(NamedTuple):
    """What a train step is made of (`make_train_step`)."""

    graphdef: nnx.GraphDef
    tx: optax.GradientTransformation  # the optimizer of the trainable part (optimizer.build_optimizer)
    roles: Any  # each parameter's role (optimizer.param_roles): trainable, frozen, sparse tables, statistics
    reg_weight: float  # lambda of L_reg
    seed: int  # the MMD subsample's key, folded with the step
    grad_clip: float  # the global norm the gradient is clipped to (0: none)
    new_domains: Sequence[int] = ()  # per-domain rows that train whatever is frozen
    sparse: tuple[str, optax.Schedule] | None = None  # (rule, schedule): the embedding tables updated row-sparsely
    grad_accum: int = 1  # micro-batches per step


def make_train_step(cfg: StepConfig, mesh: Mesh, state_sharding: TrainState, rules: shd.Rules = shd.DEFAULT_RULES):
    """jit(step)(state, batch, text, reference) -> (state, metrics); the state's buffers are donated. The update is
    dense (`_dense_update`) or, with `cfg.sparse`, row-sparse for the embedding tables (`_sparse_update`), chosen
    here once.

    `grad_accum=N` splits the batch into N micro-batches (every N-th row, so each stays spread over the data
    axis), takes their gradients in turn (a scan: one micro-batch's activations live at a time) and averages
    them: the mean loss over N equal micro-batches is the batch's, so one update equals the update of the whole
    batch, but for the terms that depend on the batch's composition (L_reg between the domains of a batch, STAR's
    batch statistics), computed per micro-batch; batch statistics advance once per step (`accumulate`), those of
    frozen levels not at all (`optimizer.keep_frozen_stats`).

    Only the trainable part of the params (`roles`, see optimizer.py) is differentiated; with `sparse`, `roles`
    must mark the tables SPARSE. `reference`: the pretrained domains' distributions to align against, or None.
    Metrics: loss, bce, reg, and the trainable gradient's global norm before and after clipping."""
    update = _dense_update if cfg.sparse is None else _sparse_update

    def step(state: TrainState, batch, text, reference):
        with shd.model_context(mesh, rules):  # per-device grouping (layers.by_group)
            key = jax.random.fold_in(jax.random.key(cfg.seed), state.step)  # the MMD subsample of this step
            return update(cfg, mesh, rules, state, batch, text, reference, key)

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


def _gradients(cfg: StepConfig, mesh: Mesh, rules: shd.Rules, read, batch, text, reference, key, table_rows):
    """The gradient of the trainable part of `read` (the params as the step reads them), zero on the rows frozen
    levels keep -> (grads, metrics, batch statistics, trainable, fixed)."""
    trainable, fixed = partition(read, cfg.roles)

    def micro_grads(fixed, micro, rows, key):
        def loss_of(trainable):
            kwargs = dict(table_rows=rows, train=True, key=key, reference=reference)
            return loss_fn(cfg.graphdef, combine(trainable, fixed), micro, text, cfg.reg_weight, **kwargs)

        (_, (metrics, stats)), grads = jax.value_and_grad(loss_of, has_aux=True)(trainable)
        return grads, metrics, stats

    if cfg.grad_accum == 1:
        grads, metrics, stats = micro_grads(fixed, batch, table_rows, key)
    else:
        grads, metrics, stats = accumulate(micro_grads, fixed, batch, table_rows, key, cfg.grad_accum, mesh, rules)
    return zero_frozen_rows(grads, cfg.roles, cfg.new_domains), metrics, stats, trainable, fixed


def _with_norms(metrics: dict, grads, grad_clip: float) -> dict:
    norm = optax.tree.norm(grads)
    clipped = jnp.minimum(norm, grad_clip) if grad_clip > 0 else norm
    return {**metrics, "grad_norm": norm, "grad_norm_clipped": clipped}


def _next_state(cfg: StepConfig, state: TrainState, params, opt_state, tables_state, stats) -> TrainState:
    """The state after the update, with the batch statistics of the step (a frozen level's kept)."""
    params = sr_model.with_stats(params, keep_frozen_stats(stats, cfg.roles, state.params, cfg.new_domains))
    return TrainState(state.step + 1, params, opt_state, tables_state)


def _dense_update(cfg: StepConfig, mesh, rules, state: TrainState, batch, text, reference, key):
    """Every trainable parameter, the embedding tables too, updated by the optimizer."""
    grads, metrics, stats, trainable, fixed = _gradients(
        cfg, mesh, rules, state.params, batch, text, reference, key, None
    )
    updates, opt_state = cfg.tx.update(grads, state.opt_state, trainable)
    params = combine(optax.apply_updates(trainable, updates), fixed)
    return _next_state(cfg, state, params, opt_state, state.tables_state, stats), _with_norms(
        metrics, grads, cfg.grad_clip
    )


def _sparse_update(cfg: StepConfig, mesh, rules, state: TrainState, batch, text, reference, key):
    """The embedding tables read as the rows the batch gathers and updated row-sparsely by the sparse rule
    (`sparse_update`); the rest by the optimizer. Rows a frozen L0 keeps (all but its new rows) get no gradient."""
    gathered = sparse_update.gather(state.params, sr_model.table_rows(cfg.graphdef, state.params, batch))
    read = sparse_update.with_tables(state.params, gathered.embeddings)
    grads, metrics, stats, trainable, fixed = _gradients(
        cfg, mesh, rules, read, batch, text, reference, key, gathered.inverse
    )
    num_rows = {k: t.shape[0] for k, t in sparse_update.tables(state.params).items()}
    rows = sparse_update.writable(state.tables_state, gathered)
    grads = sparse_update.with_tables(grads, sparse_update.mask_grads(sparse_update.tables(grads), rows, num_rows))
    updates, opt_state = cfg.tx.update(grads, state.opt_state, trainable)
    no_tables = {k: None for k in gathered.uniq}
    dense = optax.apply_updates(
        sparse_update.with_tables(trainable, no_tables), sparse_update.with_tables(updates, no_tables)
    )
    rule, schedule = cfg.sparse
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
    return _next_state(cfg, state, params, opt_state, tables_state, stats), _with_norms(metrics, grads, cfg.grad_clip)


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
