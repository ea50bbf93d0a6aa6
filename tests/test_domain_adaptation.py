"""The Domain Adaptive Layer and the alignment regularizers: per-domain parameters, finiteness in log space,
normalisation, the mean over pairs, stratified MMD and alignment against a pretrained reference."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sr_jax.model.domain_adaptation import (
    DomainAdaptiveLayer,
    js_regularizer,
    make_reference,
    mmd_regularizer,
    stratified_sample,
)

K, W = 4, 12
KEY = jax.random.key(0)


def test_dal_uses_each_examples_own_domain_parameters():
    dal = DomainAdaptiveLayer(K, W, rngs=nnx.Rngs(0))
    dal.proj.kernel[...] = jax.random.normal(jax.random.key(1), (K, W, W))  # make domains clearly different
    dal.proj.bias[...] = jax.random.normal(jax.random.key(2), (K, W))
    dal.scale[...] = jnp.linspace(0.5, 2.0, W)
    x = jax.random.normal(jax.random.key(3), (32, W))
    domain = jnp.arange(32) % K
    out, z = dal(x, domain, jnp.float32)
    for b in range(32):
        k = int(domain[b])
        y = np.asarray(x[b] @ dal.proj.kernel[...][k] + dal.proj.bias[...][k])
        y = (y - y.mean()) / np.sqrt(y.var() + 1e-6)
        np.testing.assert_allclose(z[b], y, rtol=1e-4, atol=1e-4)  # z: before the learnable gain
        np.testing.assert_allclose(out[b], y * np.asarray(dal.scale[...]), rtol=1e-4, atol=1e-4)
    # changing domain 3's parameters changes only domain-3 examples
    dal.proj.kernel[...] = dal.proj.kernel[...].at[3].add(1.0)
    changed = np.any(np.asarray(dal(x, domain, jnp.float32)[0]) != np.asarray(out), axis=1)
    np.testing.assert_array_equal(changed, np.asarray(domain) == 3)


def _shifted(shift: float, n: int = 256, domains=(0, 2)):
    """The same rows in every domain, each domain shifted by `shift` times its position in `domains`."""
    x = jax.random.normal(jax.random.key(0), (n, W))
    direction = jnp.linspace(-1.0, 1.0, W)
    rows = jnp.concatenate([x + i * shift * direction for i in range(len(domains))])
    domain = jnp.concatenate([jnp.full(n, k, jnp.int32) for k in domains])
    return rows, domain


REGULARIZERS = {
    "js": lambda x, d, k=K, ref=None: js_regularizer(x, d, k, temperature=1.0, reference=ref),
    "mmd": lambda x, d, k=K, ref=None: mmd_regularizer(x, d, k, 0.0, 1024, KEY, reference=ref),
}


@pytest.mark.parametrize("name", sorted(REGULARIZERS))
def test_regularizer_is_zero_for_identical_domains_and_grows_with_shift(name):
    reg = REGULARIZERS[name]
    values = [float(reg(*_shifted(s))) for s in (0.0, 0.25, 0.5, 1.0, 2.0)]
    assert abs(values[0]) < 1e-5
    assert all(b > a for a, b in zip(values, values[1:])), values
    grad = jax.grad(lambda x: reg(x, _shifted(1.0)[1]))(_shifted(1.0)[0])
    assert np.all(np.isfinite(grad)) and np.abs(grad).sum() > 0


@pytest.mark.parametrize("name", sorted(REGULARIZERS))
def test_regularizer_is_a_mean_over_pairs_not_a_sum(name):
    """Domain k shifted by k * s: with 2 domains there is one pair at distance s; with 8 domains the pairs at
    distance s are 7 of 28. A sum grows with the domains present, a mean of the same pairs does not."""
    reg = REGULARIZERS[name]
    two = float(reg(*_shifted(0.5, n=128, domains=(0, 1)), k=8))
    adjacent = [float(reg(*_shifted(0.5, n=128, domains=(j, j + 1)), k=8)) for j in range(7)]
    np.testing.assert_allclose(adjacent, two, rtol=1e-5)  # the same pair costs the same wherever it is
    eight = float(reg(*_shifted(0.5, n=128, domains=tuple(range(8))), k=8))
    assert eight < 15 * two  # a sum over 28 pairs at distances 1..7 shifts would be far above


def test_js_is_finite_when_softmax_underflows_and_bounded_by_one():
    """reg_temperature 0.05 and a domain with one example: softmax entries underflow to exactly 0, which made
    p * (log p - log m) = 0 * -inf = NaN in linear space."""
    x = 30.0 * jax.random.normal(jax.random.key(1), (65, W))
    domain = jnp.concatenate([jnp.zeros(64, jnp.int32), jnp.ones(1, jnp.int32)])
    assert np.any(np.asarray(jax.nn.softmax(x[64] / 0.05)) == 0.0)  # the underflow is real
    value, grad = jax.value_and_grad(lambda z: js_regularizer(z, domain, K, 0.05))(x)
    assert np.isfinite(value) and 0.0 < float(value) <= 1.0
    assert np.all(np.isfinite(grad))
    # two domains putting all their mass on different coordinates: JS / log 2 -> 1
    peaked = jnp.concatenate([jnp.tile(100.0 * jnp.eye(W)[0], (8, 1)), jnp.tile(100.0 * jnp.eye(W)[1], (8, 1))])
    split = jnp.repeat(jnp.arange(2), 8)
    assert float(js_regularizer(peaked, split, K, 1.0)) == pytest.approx(1.0, abs=1e-4)


def test_regularizers_ignore_absent_domains_and_single_domain_batches():
    x = jax.random.normal(jax.random.key(0), (64, W))
    one = jnp.zeros(64, jnp.int32)
    assert float(js_regularizer(x, one, K, 1.0)) == 0.0
    assert float(mmd_regularizer(x, one, K, 0.0, 64, KEY)) == 0.0


def test_mmd_subsample_is_stratified_by_domain():
    """A batch sorted by row, its small domain stored last: the first 64 rows never see it; the stratified
    subsample takes as many of its rows as it can."""
    domain = jnp.concatenate([jnp.zeros(1000, jnp.int32), jnp.ones(24, jnp.int32)])
    rows = np.asarray(stratified_sample(domain, 64, KEY))
    assert len(set(rows.tolist())) == 64 and np.sum(np.asarray(domain)[rows] == 1) == 24
    other = np.asarray(stratified_sample(domain, 64, jax.random.key(7)))
    assert set(rows.tolist()) != set(other.tolist())  # drawn with the key
    x = jnp.concatenate([jax.random.normal(KEY, (1000, W)), 3.0 + jax.random.normal(KEY, (24, W))])
    assert float(mmd_regularizer(x, domain, 2, 0.0, 64, KEY)) > 0.5


@pytest.mark.parametrize("name", sorted(REGULARIZERS))
def test_a_single_domain_batch_aligns_against_the_reference(name):
    """Fine-tuning: the batch holds one domain; its distance to the pretrained domains' reference is the loss."""
    reg = REGULARIZERS[name]
    pretrained, _ = _shifted(0.0, n=200, domains=(0, 1))
    rows = pretrained.reshape(2, 200, W)[:, :, :]
    reference = make_reference(rows, jnp.array([200, 0]), temperature=1.0, bandwidth=0.0)  # domain 1: no rows
    same = rows[0][:128]
    one = jnp.zeros(128, jnp.int32)
    far = same + 2.0 * jnp.linspace(-1.0, 1.0, W)
    assert float(reg(same, one)) == 0.0  # no pair without the reference
    near_value, far_value = float(reg(same, one, ref=reference)), float(reg(far, one, ref=reference))
    assert near_value < 0.02 < far_value
    # the reference pair is the pair of the batch with the reference's rows as a second domain
    both = jnp.concatenate([far, rows[0]])
    direct = float(reg(both, jnp.concatenate([one, jnp.ones(200, jnp.int32)]), k=2))
    assert far_value == pytest.approx(direct, rel=0.05 if name == "mmd" else 1e-4)
    grad = jax.grad(lambda z: reg(z, one, ref=reference))(far)
    assert np.all(np.isfinite(grad)) and np.abs(grad).sum() > 0
    assert math.isfinite(far_value)
