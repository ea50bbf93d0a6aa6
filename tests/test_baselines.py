"""The baselines share the framework: each backbone routes examples by domain, and each trains. STAR is the
paper's (partitioned normalisation with per-domain batch statistics), PLE has progressive levels, and a
backbone with one expert output has no gate."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import baselines
from helpers import TINY, config, model_inputs
from sr_jax import model as sr_model
from sr_jax.training import loop, restore, trainer
from sr_jax.treeutil import path_str


@pytest.fixture(scope="module")
def data():
    return model_inputs()


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
    last = bumped["l1"]["backbone"]["levels"][0]["own"][1]["layers"][1]
    last["bias"] = last["bias"].at[k].add(1.0)
    changed, _ = sr_model.apply(graphdef, bumped, batch, text)
    in_k = np.asarray(batch["domain"]) == k
    assert np.all(np.asarray(changed != logits)[in_k])
    np.testing.assert_array_equal(np.asarray(changed)[~in_k], np.asarray(logits)[~in_k])


def _inputs(x_hat, domain):
    """A backbone's input record for STAR, which reads x_hat and the domains only."""
    from sr_jax.model.backbones import BackboneInput

    return BackboneInput(x_hat, x_hat, domain, jnp.zeros((domain.shape[0], 1)))


def test_star_starts_as_the_shared_network_and_then_specialises(data):
    graphdef, params = _model(data, "star", star_norm="layer")
    x_hat = jax.random.normal(jax.random.key(0), (8, 3 * 32))
    net = nnx.merge(graphdef, params).l1.backbone
    a = net(_inputs(x_hat, jnp.zeros(8, jnp.int32)), jnp.float32, False).experts
    b = net(_inputs(x_hat, jnp.full(8, 3, jnp.int32)), jnp.float32, False).experts
    np.testing.assert_allclose(a, b, rtol=1e-6)  # domain factors start at one and zero
    net.domain_kernels[0][...] = net.domain_kernels[0][...].at[3].multiply(2.0)
    c = net(_inputs(x_hat, jnp.full(8, 3, jnp.int32)), jnp.float32, False).experts
    again = net(_inputs(x_hat, jnp.zeros(8, jnp.int32)), jnp.float32, False).experts
    assert not np.allclose(a, c) and np.allclose(a, again)


def test_star_normalises_each_domain_by_its_own_batch_statistics_then_by_moving_averages(data):
    """Partitioned normalisation (Sheng et al. 2021): in training, an example is normalised by the mean and
    variance of its domain's rows in the batch, so shifting one domain's inputs changes nothing; the
    per-domain moving averages follow, for present domains only, and are what inference uses."""
    graphdef, params = _model(data, "star")
    norm = nnx.merge(graphdef, params).l1.backbone.norm
    x = jax.random.normal(jax.random.key(0), (64, 96))
    domain = jnp.arange(64) % 2 * 3  # domains 0 and 3
    out = norm(x, domain, True)
    mean0 = np.asarray(norm.mean[...])
    shifted = norm(x + jnp.where(domain[:, None] == 3, 5.0, 0.0), domain, True)
    np.testing.assert_allclose(out, shifted, atol=1e-4)
    in0 = np.asarray(domain) == 0
    np.testing.assert_allclose(np.asarray(out)[in0].mean(0), 0.0, atol=1e-5)  # gamma 1, beta 0 at init
    np.testing.assert_allclose(np.asarray(out)[in0].std(0), 1.0, atol=1e-2)
    np.testing.assert_allclose(mean0[0], 0.01 * np.asarray(x)[in0].mean(0), rtol=1e-4, atol=1e-6)  # momentum 0.99
    assert np.all(mean0[[1, 2, 4, 5, 6]] == 0.0)  # absent domains keep theirs
    inference = norm(x, domain, False)  # the (debiased) moving averages, not the batch's
    mean, var = (np.asarray(a) for a in norm.debiased())
    expected = (np.asarray(x) - mean[np.asarray(domain)]) / np.sqrt(var[np.asarray(domain)] + 1e-5)
    np.testing.assert_allclose(inference, expected, rtol=1e-4, atol=1e-4)


def test_star_statistics_are_written_by_training_and_not_optimized(tmp_path):
    cfg = config(TINY, model=dataclasses.asdict(baselines.get_config("star").model), train={"checkpoint_every": 1000})
    run = trainer.build_run(cfg, tmp_path)
    start = restore.initial_state(run.spec)
    stats = {path for path, label in _labelled(run.spec.program.roles) if label == "stats"}
    assert stats == {"l1/backbone/norm/mean", "l1/backbone/norm/var", "l1/backbone/norm/updates"}
    assert not [p for p, _ in jax.tree_util.tree_leaves_with_path(start.opt_state) if path_str(p).endswith("norm/mean")]
    before = np.asarray(start.params["l1"]["backbone"]["norm"]["mean"])  # the step donates the state
    end = loop.train(run, start, until=3)
    assert not np.array_equal(np.asarray(end.params["l1"]["backbone"]["norm"]["mean"]), before)


def _labelled(labels):
    return [(path_str(p), label) for p, label in jax.tree_util.tree_leaves_with_path(labels)]


def test_ple_levels_pass_each_domain_its_own_gated_input(data):
    """Two PLE levels: level 1's domain gate of domain k shapes the input of domain k's examples only."""
    _, text, batch = data
    graphdef, params = _model(data, "ple", ple_levels=2)
    levels = params["l1"]["backbone"]["levels"]
    assert "domain_gate" in levels[0] and "domain_gate" not in levels[1] and "gate" in params["l2"]
    logits, aux = sr_model.apply(graphdef, params, batch, text)
    k = int(batch["domain"][0])
    bumped = jax.tree.map(lambda a: a, params)
    gate = bumped["l1"]["backbone"]["levels"][0]["domain_gate"]
    gate["bias"] = gate["bias"].at[k].add(jnp.arange(5.0))
    changed, _ = sr_model.apply(graphdef, bumped, batch, text)
    in_k = np.asarray(batch["domain"]) == k
    assert np.all(np.asarray(changed != logits)[in_k])
    np.testing.assert_array_equal(np.asarray(changed)[~in_k], np.asarray(logits)[~in_k])


@pytest.mark.parametrize("name, extra", [("shared-bottom", {}), ("star", {})])
def test_one_expert_output_has_no_gate(data, name, extra):
    _, text, batch = data
    graphdef, params = _model(data, name, **extra)
    assert "gate" not in params["l2"]
    _, aux = sr_model.apply(graphdef, params, batch, text)
    np.testing.assert_array_equal(aux["expert_weights"], np.ones((64, 1)))


@pytest.mark.parametrize("name", sorted(baselines.BASELINES))
def test_each_baseline_trains_and_beats_a_constant_predictor(tmp_path, name):
    base = baselines.get_config(name)
    cfg = config(TINY, model=dataclasses.asdict(base.model), train={"epochs": 2.0, "checkpoint_every": 1000})
    result = trainer.fit(cfg, tmp_path)
    assert result["overall"]["auc"] > 0.6, result["overall"]  # a constant predictor scores 0.5
    params = trainer.build_run(cfg, tmp_path).spec.program.abstract_state.params
    assert ("norm" in params["l1"]["backbone"]) == ("aux" in params["l2"]) == name.startswith("star")
    assert "adapter" not in params["l1"]


def test_star_inference_statistics_of_a_domain_seen_20_batches_are_its_data_s():
    """A fine-tune's first validation comes after about 20 steps: the moving averages (momentum 0.99, started at
    0 and 1) then still hold 82% of the start; debiased, a new domain's inference statistics are within 5% of
    its data's mean and variance."""
    from sr_jax.model.backbones.star import PartitionedNorm

    norm = PartitionedNorm(num_domains=3, width=8, per_example=False)
    rng = np.random.default_rng(0)
    for _ in range(20):
        x = jnp.asarray(rng.normal(3.0, 2.0, (256, 8)), jnp.float32)  # mean 3, variance 4
        norm(x, jnp.full(256, 2), True)
    mean, var = (np.asarray(a) for a in norm.debiased())
    np.testing.assert_allclose(mean[2], 3.0, rtol=0.05)
    np.testing.assert_allclose(var[2], 4.0, rtol=0.05)
    assert np.all(mean[:2] == 0.0) and np.all(var[:2] == 1.0)  # domains never seen keep the start
