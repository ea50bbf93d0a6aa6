"""Freezing by level: exact zero updates, no optimizer state, new-domain rows trainable."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sr_jax.config import TrainConfig
from sr_jax.training.optimizer import FROZEN, NEW_ROWS, TRAIN, build_optimizer, trainable_labels
from sr_jax.treeutil import shapes

PARAMS = {
    "l0": {"table": jnp.ones((5, 3))},
    "l1": {"domain_embedding": jnp.ones((3, 2)), "shared": jnp.ones((4,))},
    "l2": {"tower": jnp.ones((3, 2))},
}
PER_DOMAIN = {"l0": {"table": False}, "l1": {"domain_embedding": True, "shared": False}, "l2": {"tower": True}}
CFG = TrainConfig(optimizer="adamw", weight_decay=0.1, learning_rate=0.1, warmup_steps=0, grad_clip=1.0)


def _grads(seed):
    keys = iter(jax.random.split(jax.random.key(seed), 4))
    return jax.tree.map(lambda p: jax.random.normal(next(keys), p.shape), PARAMS)


def test_labels():
    labels = trainable_labels(PARAMS, ("L0", "l1"), PER_DOMAIN, new_rows=(2,))
    assert labels == {
        "l0": {"table": FROZEN},
        "l1": {"domain_embedding": NEW_ROWS, "shared": FROZEN},
        "l2": {"tower": TRAIN},
    }
    assert trainable_labels(PARAMS, ("l1",), PER_DOMAIN, new_rows=())["l1"]["domain_embedding"] == FROZEN
    with pytest.raises(ValueError, match=r"unknown level\(s\) \['l3'\]"):
        trainable_labels(PARAMS, ("l3",), PER_DOMAIN, ())


def test_frozen_leaves_and_rows_get_exactly_zero_update_and_no_state():
    labels = trainable_labels(PARAMS, ("l0", "l1"), PER_DOMAIN, new_rows=(2,))
    tx = build_optimizer(CFG, 100, labels, new_rows=(2,))
    state = tx.init(PARAMS)
    # the optimizer state holds moments for the tower and for row 2 of the domain embedding only
    state_shapes = set(shapes(state).values())
    assert (5, 3) not in state_shapes and (4,) not in state_shapes and (1, 2) in state_shapes
    params = PARAMS
    for seed in range(3):
        updates, state = tx.update(_grads(seed), state, params)
        params = optax.apply_updates(params, updates)
    assert np.array_equal(params["l0"]["table"], PARAMS["l0"]["table"])  # weight decay did not touch it
    assert np.array_equal(params["l1"]["shared"], PARAMS["l1"]["shared"])
    assert np.array_equal(params["l1"]["domain_embedding"][:2], PARAMS["l1"]["domain_embedding"][:2])
    assert not np.allclose(params["l1"]["domain_embedding"][2], 1.0)
    assert not np.allclose(params["l2"]["tower"], 1.0)


def test_trainable_part_moves_exactly_as_the_optimizer_alone_on_it():
    """Clipping and adamw see only what trains: the same as running them on the trainable subtree."""
    labels = trainable_labels(PARAMS, ("l0", "l1"), PER_DOMAIN, new_rows=(2,))
    tx = build_optimizer(CFG, 100, labels, new_rows=(2,))
    alone = build_optimizer(CFG, 100, {"row": TRAIN, "tower": TRAIN})
    sub = {"row": PARAMS["l1"]["domain_embedding"][2:], "tower": PARAMS["l2"]["tower"]}
    state, sub_state, params = tx.init(PARAMS), alone.init(sub), PARAMS
    for seed in range(3):
        g = _grads(seed)
        updates, state = tx.update(g, state, params)
        params = optax.apply_updates(params, updates)
        sub_g = {"row": g["l1"]["domain_embedding"][2:], "tower": g["l2"]["tower"]}
        sub_updates, sub_state = alone.update(sub_g, sub_state, sub)
        sub = optax.apply_updates(sub, sub_updates)
    np.testing.assert_allclose(params["l1"]["domain_embedding"][2:], sub["row"], rtol=1e-6)
    np.testing.assert_allclose(params["l2"]["tower"], sub["tower"], rtol=1e-6)
