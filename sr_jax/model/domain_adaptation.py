"""Domain Adaptive Layer and the distribution-alignment regularizers (L1).

DAL:   x_hat = LayerNorm(W_k x + b_k), x = [h_user, h_query, h_item], W_k, b_k of the example's domain k.
L_reg: sum over pairs (i, j) of domains present in the batch of d(p_i, p_j), with
  js   p_k = mean over domain-k examples of softmax(x_hat / tau); d = Jensen-Shannon divergence
  mmd  d = squared Gaussian-kernel MMD between the x_hat sets of the two domains.
Both use a one-hot [B, K] domain matrix and pair masks, so shapes are static under jit.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from sr_jax.model.layers import Array, StackedDense

REGULARIZERS = ("js", "mmd", "none")


class DomainAdaptiveLayer(nnx.Module):
    def __init__(self, num_domains: int, width: int, *, rngs: nnx.Rngs):
        self.proj = StackedDense(num_domains, width, width, rngs=rngs)
        # start every domain at the identity map (plus the random init): adaptation is learned from there
        self.proj.kernel[...] = self.proj.kernel[...] * 0.1 + jnp.eye(width)[None]
        self.norm = nnx.LayerNorm(width, rngs=rngs)

    def __call__(self, x: Array, domain: Array, dtype: jnp.dtype) -> Array:
        """x [B, W], domain [B] -> x_hat [B, W]"""
        return self.norm(self.proj.select(x, domain, dtype).astype(jnp.float32))


def _pair_mask(counts: Array) -> Array:
    present = counts > 0
    k = counts.shape[0]
    return present[:, None] & present[None, :] & jnp.triu(jnp.ones((k, k), bool), 1)


def js_regularizer(x_hat: Array, domain: Array, num_domains: int, temperature: float) -> Array:
    """Sum of Jensen-Shannon divergences between the domains' mean softmax distributions."""
    onehot = jax.nn.one_hot(domain, num_domains, dtype=jnp.float32)  # [B, K]
    counts = onehot.sum(0)
    probs = jax.nn.softmax(x_hat.astype(jnp.float32) / temperature, axis=-1)  # [B, D]
    p = (onehot.T @ probs) / jnp.maximum(counts, 1.0)[:, None]  # [K, D]
    p = jnp.where(counts[:, None] > 0, p, 1.0 / p.shape[1])  # absent domains: any valid distribution
    m = 0.5 * (p[:, None, :] + p[None, :, :])  # [K, K, D]
    log_p = jnp.log(p)
    kl_i = jnp.sum(p[:, None, :] * (log_p[:, None, :] - jnp.log(m)), -1)
    kl_j = jnp.sum(p[None, :, :] * (log_p[None, :, :] - jnp.log(m)), -1)
    return jnp.sum(jnp.where(_pair_mask(counts), 0.5 * (kl_i + kl_j), 0.0))


def mmd_regularizer(x_hat: Array, domain: Array, num_domains: int, bandwidth: float, max_examples: int) -> Array:
    """Sum of squared Gaussian-kernel MMDs between the domains' x_hat sets (first max_examples rows)."""
    x = x_hat[:max_examples].astype(jnp.float32)
    onehot = jax.nn.one_hot(domain[:max_examples], num_domains, dtype=jnp.float32)
    counts = onehot.sum(0)
    sigma = bandwidth if bandwidth > 0 else float(x.shape[1]) ** 0.5
    sq = jnp.sum(x * x, 1)
    dist2 = jnp.maximum(sq[:, None] + sq[None, :] - 2.0 * x @ x.T, 0.0)
    kernel = jnp.exp(-dist2 / (2.0 * sigma**2))
    sums = onehot.T @ kernel @ onehot  # [K, K]: sum of k(a, b) over a in domain i, b in domain j
    n = jnp.maximum(counts, 1.0)
    mean = sums / (n[:, None] * n[None, :])
    diag = jnp.diag(mean)
    mmd2 = diag[:, None] + diag[None, :] - 2.0 * mean
    return jnp.sum(jnp.where(_pair_mask(counts), mmd2, 0.0))
