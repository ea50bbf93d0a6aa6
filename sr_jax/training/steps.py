"""The train state and the jit-compiled train and eval steps (split/merge style, pure functions)."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from sr_jax import model as sr_model
from sr_jax.training import sharding as shd


class TrainState(NamedTuple):
    step: jax.Array  # int32 scalar
    params: Any
    opt_state: Any


def loss_fn(graphdef: nnx.GraphDef, params, batch, text: sr_model.TextTable, reg_weight: float):
    """mean binary cross-entropy + lambda * L_reg; returns (loss, metrics)."""
    logits, aux = sr_model.apply(graphdef, params, batch, text)
    bce = optax.sigmoid_binary_cross_entropy(logits, batch["label"].astype(jnp.float32)).mean()
    loss = bce + reg_weight * aux["reg"]
    return loss, {"loss": loss, "bce": bce, "reg": aux["reg"]}


def init_state(params, tx: optax.GradientTransformation) -> TrainState:
    return TrainState(jnp.zeros((), jnp.int32), params, tx.init(params))


def state_shardings(mesh: Mesh, state: TrainState) -> TrainState:
    return shd.tree_shardings(mesh, state.params, state)


def make_train_step(
    graphdef: nnx.GraphDef, tx: optax.GradientTransformation, reg_weight: float, mesh: Mesh, state_sharding: TrainState
):
    """jit(step)(state, batch, text) -> (state, metrics); the state's buffers are donated."""

    def step(state: TrainState, batch, text):
        grad_fn = jax.value_and_grad(loss_fn, argnums=1, has_aux=True)
        (_, metrics), grads = grad_fn(graphdef, state.params, batch, text, reg_weight)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics["grad_norm"] = optax.tree.norm(grads)
        return TrainState(state.step + 1, params, opt_state), metrics

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
