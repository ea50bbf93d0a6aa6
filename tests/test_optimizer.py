"""Freezing by level: frozen leaves are not differentiated, get no update and no optimizer state; new-domain
rows stay trainable; weight decay touches kernels only."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sr_jax.config import TrainConfig
from sr_jax.training.optimizer import (
    FROZEN,
    NEW_DOMAINS,
    STATS,
    STATS_FROZEN,
    STATS_NEW_DOMAINS,
    TRAIN,
    build_optimizer,
    combine,
    partition,
    param_roles,
    zero_frozen_rows,
)
from sr_jax.treeutil import shapes

PARAMS = {
    "l0": {"table": jnp.ones((5, 3))},
    "l1": {"domain_embedding": jnp.ones((3, 2)), "shared": jnp.ones((4,)), "mean": jnp.zeros((3, 2))},
    "l2": {"tower": {"kernel": jnp.ones((3, 2)), "bias": jnp.ones((3,))}},
}
PER_DOMAIN = {
    "l0": {"table": False},
    "l1": {"domain_embedding": True, "shared": False, "mean": True},
    "l2": {"tower": {"kernel": True, "bias": True}},
}
STATS_MASK = jax.tree.map(lambda _: False, PARAMS) | {"l1": {"domain_embedding": False, "shared": False, "mean": True}}
CFG = TrainConfig(optimizer="adamw", weight_decay=0.1, learning_rate=0.1, warmup_steps=0, grad_clip=1.0)


def _grads(seed, tree):
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return treedef.unflatten([jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])


def _step(tx, labels, state, params, seed, new_domains=(2,)):
    trainable, fixed = partition(params, labels)
    grads = zero_frozen_rows(_grads(seed, trainable), labels, new_domains)
    updates, state = tx.update(grads, state, trainable)
    return combine(optax.apply_updates(trainable, updates), fixed), state


def test_labels():
    labels = param_roles(PARAMS, ("L0", "l1"), PER_DOMAIN, new_domains=(2,), stats=STATS_MASK)
    assert labels == {
        "l0": {"table": FROZEN},
        "l1": {"domain_embedding": NEW_DOMAINS, "shared": FROZEN, "mean": STATS_NEW_DOMAINS},
        "l2": {"tower": {"kernel": TRAIN, "bias": TRAIN}},
    }
    assert param_roles(PARAMS, ("l1",), PER_DOMAIN, new_domains=())["l1"]["domain_embedding"] == FROZEN
    # statistics: written where their level trains; in a frozen level only a new domain's rows, else never
    assert param_roles(PARAMS, ("l0",), PER_DOMAIN, new_domains=(2,), stats=STATS_MASK)["l1"]["mean"] == STATS
    assert param_roles(PARAMS, ("l1",), PER_DOMAIN, new_domains=(), stats=STATS_MASK)["l1"]["mean"] == STATS_FROZEN


def test_partition_leaves_frozen_leaves_out_of_what_is_differentiated():
    labels = param_roles(PARAMS, ("l0", "l1"), PER_DOMAIN, new_domains=(2,), stats=STATS_MASK)
    trainable, fixed = partition(PARAMS, labels)
    assert trainable["l0"]["table"] is None and fixed["l0"]["table"] is not None
    assert trainable["l1"]["mean"] is None and trainable["l1"]["domain_embedding"] is not None
    assert jax.tree.structure(combine(trainable, fixed)) == jax.tree.structure(PARAMS)
    grads = jax.grad(lambda t: sum(jnp.sum(x) for x in jax.tree.leaves(combine(t, fixed))))(trainable)
    assert grads["l0"]["table"] is None and grads["l2"]["tower"]["kernel"].shape == (3, 2)


def test_frozen_leaves_and_rows_get_exactly_zero_update_and_no_state():
    labels = param_roles(PARAMS, ("l0", "l1"), PER_DOMAIN, new_domains=(2,), stats=STATS_MASK)
    tx = build_optimizer(CFG, 100, labels, new_domains=(2,))
    state = tx.init(partition(PARAMS, labels)[0])
    # the optimizer state holds moments for the tower and for row 2 of the domain embedding only
    state_shapes = set(shapes(state).values())
    assert (5, 3) not in state_shapes and (4,) not in state_shapes and (1, 2) in state_shapes
    params = PARAMS
    for seed in range(3):
        params, state = _step(tx, labels, state, params, seed)
    assert np.array_equal(params["l0"]["table"], PARAMS["l0"]["table"])  # weight decay did not touch it
    assert np.array_equal(params["l1"]["shared"], PARAMS["l1"]["shared"])
    assert np.array_equal(params["l1"]["mean"], PARAMS["l1"]["mean"])  # statistics: the forward pass writes them
    assert np.array_equal(params["l1"]["domain_embedding"][:2], PARAMS["l1"]["domain_embedding"][:2])
    assert not np.allclose(params["l1"]["domain_embedding"][2], 1.0)
    assert not np.allclose(params["l2"]["tower"]["kernel"], 1.0)


def test_trainable_part_moves_exactly_as_the_optimizer_alone_on_it():
    """Clipping and adamw see only what trains: the same as running them on the trainable subtree."""
    labels = param_roles(PARAMS, ("l0", "l1"), PER_DOMAIN, new_domains=(2,), stats=STATS_MASK)
    tx = build_optimizer(CFG, 100, labels, new_domains=(2,))
    sub = {"row": PARAMS["l1"]["domain_embedding"][2:], "tower": PARAMS["l2"]["tower"]}
    alone = build_optimizer(CFG, 100, jax.tree.map(lambda _: TRAIN, sub))
    state, sub_state, params = tx.init(partition(PARAMS, labels)[0]), alone.init(sub), PARAMS
    for seed in range(3):
        trainable, fixed = partition(params, labels)
        g = zero_frozen_rows(_grads(seed, trainable), labels, (2,))
        updates, state = tx.update(g, state, trainable)
        params = combine(optax.apply_updates(trainable, updates), fixed)
        sub_g = {"row": g["l1"]["domain_embedding"][2:], "tower": g["l2"]["tower"]}
        sub_updates, sub_state = alone.update(sub_g, sub_state, sub)
        sub = optax.apply_updates(sub, sub_updates)
    np.testing.assert_allclose(params["l1"]["domain_embedding"][2:], sub["row"], rtol=1e-6)
    np.testing.assert_allclose(params["l2"]["tower"]["kernel"], sub["tower"]["kernel"], rtol=1e-6)


@pytest.mark.parametrize("optimizer", ["adamw"])
def test_weight_decay_applies_to_kernels_only(optimizer):
    """With zero gradients, adamw moves only what it decays: kernels, never biases or embeddings."""
    params = {"l1": {"layer": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}, "domain_embedding": jnp.ones((3, 2))}}
    labels = jax.tree.map(lambda _: TRAIN, params)
    cfg = TrainConfig(optimizer=optimizer, weight_decay=0.5, learning_rate=0.1, warmup_steps=0, grad_clip=0.0)
    tx = build_optimizer(cfg, 10, labels)
    updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
    moved = optax.apply_updates(params, updates)
    assert np.all(np.asarray(moved["l1"]["layer"]["kernel"]) < 1.0)
    np.testing.assert_array_equal(moved["l1"]["layer"]["bias"], params["l1"]["layer"]["bias"])
    np.testing.assert_array_equal(moved["l1"]["domain_embedding"], params["l1"]["domain_embedding"])


@pytest.mark.parametrize("backbone", ["mmoe", "star"])
def test_identity_and_one_initialised_factors_are_not_decayed(backbone):
    """The DAL's W_k starts at the identity and STAR's per-domain kernels at one: adamw with zero gradients
    leaves them where they are (decay toward zero would switch a domain's input or layer off); the other kernels
    of the same model decay."""
    from helpers import TINY, config
    from sr_jax import model as sr_model
    from sr_jax.featurized import load_dataset
    from sr_jax.treeutil import flatten

    cfg = config(TINY, model={"backbone": backbone})
    meta = load_dataset(cfg.data).meta
    _, params = sr_model.init(cfg.model, meta, 32, seed=0)
    roles = jax.tree.map(lambda _: TRAIN, params)
    tx = build_optimizer(TrainConfig(optimizer="adamw", weight_decay=0.5, learning_rate=0.1, warmup_steps=0), 10, roles)
    updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
    before, after = flatten(params), flatten(optax.apply_updates(params, updates))
    factors = [p for p in before if "adapter/proj/kernel" in p or "domain_kernels" in p]
    assert factors and any("adapter/proj/kernel" in p for p in factors)
    assert backbone != "star" or any("domain_kernels" in p for p in factors)
    for path in factors:
        np.testing.assert_array_equal(after[path], before[path], err_msg=path)
    decayed = [p for p in before if p.endswith("kernel") and p not in factors]
    assert decayed and all(np.abs(after[p]).sum() < np.abs(before[p]).sum() for p in decayed)
