"""The train state and the jit-compiled train and eval steps (split/merge style, pure functions)."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from sr_jax import model as sr_model
from sr_jax.training import sharding as shd, sparse_update


class TrainState(NamedTuple):
    step: jax.Array  # int32 scalar
    params: Any
    opt_state: Any
    tables_state: Any  # the row-sparse rule's per-table state (sparse_update.init_state; {} when dense)


def loss_fn(graphdef: nnx.GraphDef, params, batch, text: sr_model.TextTable, reg_weight: float, rows=None):
    """mean binary cross-entropy + lambda * L_reg; returns (loss, metrics). `rows`: see sr_model.apply."""
    logits, aux = sr_model.apply(graphdef, params, batch, text, rows)
    bce = optax.sigmoid_binary_cross_entropy(logits, batch["label"].astype(jnp.float32)).mean()
    loss = bce + reg_weight * aux["reg"]
    return loss, {"loss": loss, "bce": bce, "reg": aux["reg"]}


def init_state(params, tx: optax.GradientTransformation, embedding_update: str = "dense") -> TrainState:
    return TrainState(
        jnp.zeros((), jnp.int32), params, tx.init(params), sparse_update.init_state(embedding_update, params)
    )


def state_shardings(mesh: Mesh, state: TrainState) -> TrainState:
    return shd.tree_shardings(mesh, state.params, state)


def make_train_step(
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    reg_weight: float,
    mesh: Mesh,
    state_sharding: TrainState,
    sparse: tuple[str, optax.Schedule] | None = None,
):
    """jit(step)(state, batch, text) -> (state, metrics); the state's buffers are donated. `sparse`:
    (rule, learning-rate schedule) to update the embedding tables row-sparsely (`sparse_update`); the
    optimizer `tx` must then label the tables SPARSE."""
    grad_fn = jax.value_and_grad(loss_fn, argnums=1, has_aux=True)

    def step(state: TrainState, batch, text):
        if sparse is None:
            (_, metrics), grads = grad_fn(graphdef, state.params, batch, text, reg_weight)
            updates, opt_state = tx.update(grads, state.opt_state, state.params)
            params, tables_state = optax.apply_updates(state.params, updates), state.tables_state
        else:
            gathered = sparse_update.gather(state.params, sr_model.table_rows(graphdef, state.params, batch))
            small = sparse_update.with_tables(state.params, gathered.embeddings)  # tables -> their [U, d] rows
            (_, metrics), grads = grad_fn(graphdef, small, batch, text, reg_weight, gathered.inverse)
            updates, opt_state = tx.update(grads, state.opt_state, small)
            no_tables = {key: None for key in gathered.uniq}
            dense = optax.apply_updates(
                sparse_update.with_tables(state.params, no_tables), sparse_update.with_tables(updates, no_tables)
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
            params = sparse_update.with_tables(dense, tables)
        metrics["grad_norm"] = optax.tree.norm(grads)
        return TrainState(state.step + 1, params, opt_state, tables_state), metrics

    return jax.jit(
        step,
        in_shardings=(state_sharding, shd.batch_sharding(mesh), shd.replicated(mesh)),
        out_shardings=(state_sharding, shd.replicated(mesh)),
        donate_argnums=0,
    )


def make_predict_step(graphdef: nnx.GraphDef, mesh: Mesh, params_sharding):
    """jit(predict)(params, batch, text) -> click probabilities [B]."""

    def predict(params, batch, text):
        return jax.nn.sigmoid(sr_model.apply(graphdef, params, batch, text)[0])

    return jax.jit(
        predict,
        in_shardings=(params_sharding, shd.batch_sharding(mesh), shd.replicated(mesh)),
        out_shardings=shd.replicated(mesh),
    )
