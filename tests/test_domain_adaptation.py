import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sr_jax.model.domain_adaptation import DomainAdaptiveLayer, js_regularizer, mmd_regularizer

K, W = 4, 12


def test_dal_uses_each_examples_own_domain_parameters():
    dal = DomainAdaptiveLayer(K, W, rngs=nnx.Rngs(0))
    dal.proj.kernel[...] = jax.random.normal(jax.random.key(1), (K, W, W))  # make domains clearly different
    dal.proj.bias[...] = jax.random.normal(jax.random.key(2), (K, W))
    x = jax.random.normal(jax.random.key(3), (32, W))
    domain = jnp.arange(32) % K
    out = np.asarray(dal(x, domain, jnp.float32))
    for b in range(32):
        k = int(domain[b])
        y = np.asarray(x[b] @ dal.proj.kernel[...][k] + dal.proj.bias[...][k])
        y = (y - y.mean()) / np.sqrt(y.var() + 1e-6)
        np.testing.assert_allclose(
            out[b], y * np.asarray(dal.norm.scale[...]) + np.asarray(dal.norm.bias[...]), rtol=1e-4, atol=1e-4
        )
    # changing domain 3's parameters changes only domain-3 examples
    dal.proj.kernel[...] = dal.proj.kernel[...].at[3].add(1.0)
    changed = np.any(np.asarray(dal(x, domain, jnp.float32)) != out, axis=1)
    np.testing.assert_array_equal(changed, np.asarray(domain) == 3)


def _two_domain_batch(shift: float, n: int = 256):
    x = jax.random.normal(jax.random.key(0), (n, W))
    x = jnp.concatenate([x, x + shift * jnp.linspace(-1.0, 1.0, W)])  # domain 1: domain 0's rows, shifted
    domain = jnp.concatenate([jnp.zeros(n, jnp.int32), jnp.full(n, 2, jnp.int32)])  # domains 1 and 3 absent
    return x, domain


@pytest.mark.parametrize(
    "reg",
    [
        lambda x, d: js_regularizer(x, d, K, temperature=1.0),
        lambda x, d: mmd_regularizer(x, d, K, bandwidth=0.0, max_examples=1024),
    ],
    ids=["js", "mmd"],
)
def test_regularizer_is_zero_for_identical_domains_and_grows_with_shift(reg):
    values = [float(reg(*_two_domain_batch(s))) for s in (0.0, 0.25, 0.5, 1.0, 2.0)]
    assert abs(values[0]) < 1e-5
    assert all(b > a for a, b in zip(values, values[1:])), values
    grad = jax.grad(lambda x: reg(x, _two_domain_batch(1.0)[1]))(_two_domain_batch(1.0)[0])
    assert np.all(np.isfinite(grad)) and np.abs(grad).sum() > 0


def test_regularizers_ignore_absent_domains_and_single_domain_batches():
    x = jax.random.normal(jax.random.key(0), (64, W))
    one = jnp.zeros(64, jnp.int32)
    assert float(js_regularizer(x, one, K, 1.0)) == 0.0
    assert float(mmd_regularizer(x, one, K, 0.0, 64)) == 0.0
