import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sr_jax.model.encoding import Aspects
from sr_jax.config import GATINGS
from sr_jax.model.fusion import AspectGate
from sr_jax.model.layers import masked_softmax

B, A, D, H, T = 16, 3, 8, 4, 10


def _aspects(mask):
    k = jax.random.split(jax.random.key(0), 2)
    return Aspects(jax.random.normal(k[0], (B, A, D)), jnp.asarray(mask), jax.random.normal(k[1], (B, T)))


def _mask():
    m = np.ones((B, A), bool)
    m[0] = [True, False, True]  # one aspect missing
    m[1] = [False, False, True]  # only one present
    m[2] = False  # nothing present (a recommendation example's query side)
    return m


@pytest.mark.parametrize("strategy", GATINGS)
def test_gates_sum_to_one_and_masked_aspects_get_zero(strategy):
    gate = AspectGate(strategy, A, D, H, T, rngs=nnx.Rngs(0))
    mask = _mask()
    aspects = _aspects(mask)
    h, w = gate(aspects, jax.random.normal(jax.random.key(1), (B, H)))
    w = np.asarray(w)
    present = mask.any(1)
    np.testing.assert_allclose(w[present].sum(1), 1.0, rtol=1e-6)
    assert np.all(w[~mask] == 0.0)
    assert w[1].tolist() == [0.0, 0.0, 1.0]
    np.testing.assert_allclose(h[1], aspects.vectors[1, 2], rtol=1e-6)  # one aspect: it is the fusion
    np.testing.assert_allclose(h[2], gate.missing[...], rtol=1e-6)  # none: the learned "missing" vector
    np.testing.assert_allclose(h[3], np.einsum("a,ad->d", w[3], aspects.vectors[3]), rtol=1e-5)


def test_domain_gate_follows_the_paper_formula():
    gate = AspectGate("domain", A, D, H, T, rngs=nnx.Rngs(0))
    e_d = jax.random.normal(jax.random.key(1), (B, H))
    _, w = gate(_aspects(np.ones((B, A), bool)), e_d)
    logits = np.asarray(e_d) @ np.asarray(gate.aspect_embedding[...]).T
    expected = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    np.testing.assert_allclose(w, expected, rtol=1e-5)


def test_mean_gate_is_uniform_over_present_aspects():
    gate = AspectGate("mean", A, D, H, T, rngs=nnx.Rngs(0))
    _, w = gate(_aspects(_mask()), jnp.zeros((B, H)))
    np.testing.assert_allclose(w[0], [0.5, 0.0, 0.5])
    np.testing.assert_allclose(w[5], [1 / 3] * 3, rtol=1e-6)


def test_cls_gate_reads_the_summary_token_vector():
    gate = AspectGate("cls", A, D, H, T, rngs=nnx.Rngs(0))
    aspects = _aspects(np.ones((B, A), bool))
    _, w1 = gate(aspects, jnp.zeros((B, H)))
    _, w2 = gate(aspects._replace(summary=aspects.summary + 1.0), jnp.zeros((B, H)))
    assert not np.allclose(w1, w2)


def test_masked_softmax_gradient_is_finite_when_all_masked():
    g = jax.grad(lambda x: masked_softmax(x, jnp.zeros((2, 3), bool)).sum())(jnp.ones((2, 3)))
    assert np.all(np.isfinite(g))
