"""The baselines share the framework: each backbone routes examples by domain, and each trains."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import baselines
from helpers import TINY, config
from sr_jax import model as sr_model
from sr_jax.training import trainer


@pytest.fixture(scope="module")
def data():
    ds = trainer.load_dataset(config(TINY).data)
    pooled, first = ds.text_cache("hashed-bow")
    batch = {k: jnp.asarray(v[:64]) for k, v in ds.split("train").items()}
    return ds, sr_model.TextTable(jnp.asarray(pooled), jnp.asarray(first)), batch


def _model(data, name, **fields):
    ds, text, _ = data
    cfg = dataclasses.replace(baselines.get_config(name).model, **fields)
    return sr_model.init(cfg, ds.meta, text.pooled.shape[1], seed=0)


def test_ple_examples_use_their_own_domain_experts(data):
    _, text, batch = data
    graphdef, params = _model(data, "ple", domain_experts=2)
    logits, aux = sr_model.apply(graphdef, params, batch, text)
    assert aux["expert_weights"].shape == (64, 4 + 2)
    k = int(batch["domain"][0])
    bumped = jax.tree.map(lambda a: a, params)
    last = bumped["l1"]["domain_experts"]["stacks"][1]["layers"][1]
    last["bias"] = last["bias"].at[k].add(1.0)
    changed, _ = sr_model.apply(graphdef, bumped, batch, text)
    in_k = np.asarray(batch["domain"]) == k
    assert np.all(np.asarray(changed != logits)[in_k])
    np.testing.assert_array_equal(np.asarray(changed)[~in_k], np.asarray(logits)[~in_k])


def test_star_starts_as_the_shared_network_and_then_specialises(data):
    graphdef, params = _model(data, "star")
    x_hat = jax.random.normal(jax.random.key(0), (8, 3 * 32))
    net = nnx.merge(graphdef, params).l1.star
    a = net(x_hat, jnp.zeros(8, jnp.int32), jnp.float32)
    b = net(x_hat, jnp.full(8, 3, jnp.int32), jnp.float32)
    np.testing.assert_allclose(a, b, rtol=1e-6)  # domain factors start at one and zero
    net.domain_kernels[0][...] = net.domain_kernels[0][...].at[3].multiply(2.0)
    c = net(x_hat, jnp.full(8, 3, jnp.int32), jnp.float32)
    assert not np.allclose(a, c) and np.allclose(a, net(x_hat, jnp.zeros(8, jnp.int32), jnp.float32))


@pytest.mark.parametrize("name", sorted(baselines.BASELINES))
def test_each_baseline_trains_and_beats_a_constant_predictor(tmp_path, name):
    base = baselines.get_config(name)
    cfg = config(TINY, model=dataclasses.asdict(base.model), train={"epochs": 2.0, "checkpoint_every": 1000})
    result = trainer.fit(cfg, tmp_path)
    assert result["overall"]["auc"] > 0.6, result["overall"]  # a constant predictor scores 0.5
    params = trainer.build_run(cfg, tmp_path).steps.abstract_state.params
    assert ("star" in params["l1"]) == ("aux" in params["l2"]) == (name == "star") and "adapter" not in params["l1"]
