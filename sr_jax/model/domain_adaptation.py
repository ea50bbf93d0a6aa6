"""Domain Adaptive Layer and the distribution-alignment regularizers (L1).

DAL:   z = standardise(W_k x + b_k), x_hat = gamma * z + beta (a LayerNorm), x = [h_user, h_query, h_item],
       W_k, b_k of the example's domain k.
L_reg aligns the domains' distributions of z, the normalised output *before* LayerNorm's learnable
gain: regularising x_hat would let the model switch the regularizer off by shrinking gamma while the
experts scale back up. It is the mean, over pairs (i, j) of domains present in the batch, of

  js   JS(p_i || p_j) / log 2, in [0, 1], with p_k = mean over domain-k examples of softmax(z / tau);
       computed in log space, so a softmax entry that underflows cannot make it NaN
  mmd  squared Gaussian-kernel MMD between the z sets of the two domains, on a subsample of the batch
       stratified by domain (drawn with the step's key)

A mean, not a sum, so that the same shift between two domains costs the same whether the batch holds
2 domains or 8. With an `AlignmentReference` (fine-tuning: each pretrained domain's distribution of z,
fixed), pairs (a domain of the batch, a reference domain) are added, so a fine-tune batch that holds
one domain still has something to align against. Shapes are static under jit: one-hot domain
matrices and pair masks, no Python loop over domains.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from sr_jax.model.layers import Array, StackedDense, zeros

LAYER_NORM_EPS = 1e-6
REFERENCE_ROWS = 512  # z rows kept per pretrained domain for fine-tuning's alignment


def standardise(x: Array) -> Array:
    """Per example: zero mean, unit variance over the features (LayerNorm without its affine part), float32."""
    x = x.astype(jnp.float32)
    mean = x.mean(-1, keepdims=True)
    var = jnp.square(x - mean).mean(-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + LAYER_NORM_EPS)


class DomainAdaptiveLayer(nnx.Module):
    def __init__(self, num_domains: int, width: int, *, rngs: nnx.Rngs):
        self.proj = StackedDense(num_domains, width, width, rngs=rngs)
        # start every domain at the identity map (plus the random init): adaptation is learned from there
        self.proj.kernel[...] = self.proj.kernel[...] * 0.1 + jnp.eye(width)[None]
        self.scale = nnx.Param(jnp.ones((width,), jnp.float32))
        self.shift = zeros((width,))

    def __call__(self, x: Array, domain: Array, dtype: jnp.dtype) -> tuple[Array, Array]:
        """x [B, W], domain [B] -> (x_hat [B, W], z [B, W]: what the regularizer aligns)"""
        z = standardise(self.proj.own_layer(x, domain, dtype))
        return z * self.scale[...] + self.shift[...], z


class AlignmentReference(NamedTuple):
    """The pretrained domains' distributions of z (fixed), for fine-tuning. R reference domains."""

    log_p: Array  # [R, D] log of the mean of softmax(z / tau) over the domain's rows (JS)
    rows: Array  # [R, N, D] a seeded sample of the domain's z rows (MMD)
    count: Array  # [R] valid rows of each (0: no reference for that domain)
    self_kernel: Array  # [R] mean Gaussian kernel among the domain's own rows (MMD)


def make_reference(rows: Array, count: Array, temperature: float, bandwidth: float) -> AlignmentReference:
    """An AlignmentReference from sampled z rows [R, N, D] (the first count[r] of row r valid)."""
    rows, count = jnp.asarray(rows, jnp.float32), jnp.asarray(count, jnp.float32)
    r, n, d = rows.shape
    valid = jnp.arange(n)[None, :] < count[:, None]  # [R, N]
    domain = jnp.repeat(jnp.arange(r), n)
    log_probs = jax.nn.log_softmax(rows.reshape(r * n, d) / temperature, axis=-1)
    log_p, _ = domain_log_means(log_probs, domain, r, valid.reshape(-1))
    sigma = _bandwidth(bandwidth, d)
    kernel = jax.vmap(lambda x: _kernel(x, x, sigma))(rows)  # [R, N, N]
    pair_valid = valid[:, :, None] & valid[:, None, :]
    self_kernel = jnp.where(pair_valid, kernel, 0.0).sum((1, 2)) / jnp.maximum(count, 1.0) ** 2
    return AlignmentReference(log_p, rows, count, self_kernel)


def domain_log_means(log_probs: Array, domain: Array, num_domains: int, valid: Array | None = None):
    """log of each domain's mean distribution, from per-example log-probabilities [B, D], in log space
    (a per-domain max is subtracted before exp, so nothing underflows to log 0).
    -> (log_mean [K, D], count [K]); absent domains get the uniform distribution."""
    weight = jnp.ones(domain.shape, jnp.float32) if valid is None else valid.astype(jnp.float32)
    onehot = jax.nn.one_hot(domain, num_domains, dtype=jnp.float32) * weight[:, None]  # [B, K]
    count = onehot.sum(0)
    masked = jnp.where(weight[:, None] > 0, log_probs, -jnp.inf)
    peak = jax.lax.stop_gradient(jax.ops.segment_max(masked, domain, num_segments=num_domains))  # [K, D]
    peak = jnp.where(count[:, None] > 0, peak, 0.0)
    sums = onehot.T @ jnp.where(weight[:, None] > 0, jnp.exp(log_probs - peak[domain]), 0.0)  # >= 1 where present
    log_mean = peak + jnp.log(jnp.maximum(sums, 1e-30)) - jnp.log(jnp.maximum(count, 1.0))[:, None]
    uniform = -math.log(log_probs.shape[-1])
    return jnp.where(count[:, None] > 0, log_mean, uniform), count


def js_matrix(log_p: Array) -> Array:
    """Jensen-Shannon divergence between every pair of distributions given as logs [G, D] -> [G, G],
    normalised by log 2 (so in [0, 1])."""
    lp_i, lp_j = log_p[:, None, :], log_p[None, :, :]
    log_m = jnp.logaddexp(lp_i, lp_j) - math.log(2.0)
    kl_i = jnp.sum(jnp.exp(lp_i) * (lp_i - log_m), -1)
    kl_j = jnp.sum(jnp.exp(lp_j) * (lp_j - log_m), -1)
    return 0.5 * (kl_i + kl_j) / math.log(2.0)


def _pair_mean(batch_pairs: Array, present: Array, cross: Array | None, reference: AlignmentReference | None):
    """Mean over the pairs of domains present in the batch (upper triangle of batch_pairs [K, K]) and,
    with a reference, over (present batch domain, reference domain) pairs (cross [K, R])."""
    k = present.shape[0]
    mask = present[:, None] & present[None, :] & jnp.triu(jnp.ones((k, k), bool), 1)
    total, pairs = jnp.sum(jnp.where(mask, batch_pairs, 0.0)), mask.sum()
    if reference is not None:
        cross_mask = present[:, None] & (reference.count > 0)[None, :]
        total, pairs = total + jnp.sum(jnp.where(cross_mask, cross, 0.0)), pairs + cross_mask.sum()
    return total / jnp.maximum(pairs, 1).astype(jnp.float32)


def js_regularizer(
    z: Array, domain: Array, num_domains: int, temperature: float, reference: AlignmentReference | None = None
) -> Array:
    """Mean normalised JS divergence between the domains' mean softmax(z / tau) distributions."""
    log_probs = jax.nn.log_softmax(z.astype(jnp.float32) / temperature, axis=-1)  # [B, D]
    log_p, count = domain_log_means(log_probs, domain, num_domains)
    if reference is None:
        return _pair_mean(js_matrix(log_p), count > 0, None, None)
    js = js_matrix(jnp.concatenate([log_p, reference.log_p]))
    return _pair_mean(js[:num_domains, :num_domains], count > 0, js[:num_domains, num_domains:], reference)


def stratified_sample(domain: Array, size: int, key: Array) -> Array:
    """`size` row indices of a batch, drawn evenly across its domains (round robin over the domains, in
    a random order within each): a domain stored last in the batch is sampled like the others."""
    u = jax.random.uniform(key, domain.shape)
    order = jnp.lexsort((u, domain))  # by domain, random within
    sorted_domain = domain[order]
    start = jnp.searchsorted(sorted_domain, sorted_domain, side="left")
    rank = jnp.zeros(domain.shape, jnp.int32).at[order].set(jnp.arange(domain.shape[0]) - start)
    return jnp.lexsort((u, rank))[:size]


def _bandwidth(bandwidth: float, width: int) -> float:
    return bandwidth if bandwidth > 0 else float(width) ** 0.5


def _kernel(a: Array, b: Array, sigma: float) -> Array:
    dist2 = jnp.sum(a * a, 1)[:, None] + jnp.sum(b * b, 1)[None, :] - 2.0 * a @ b.T
    return jnp.exp(-jnp.maximum(dist2, 0.0) / (2.0 * sigma**2))


def mmd_regularizer(
    z: Array,
    domain: Array,
    num_domains: int,
    bandwidth: float,
    max_examples: int,
    key: Array,
    reference: AlignmentReference | None = None,
) -> Array:
    """Mean squared Gaussian-kernel MMD between the domains' z sets, on a stratified subsample of at
    most `max_examples` rows."""
    if max_examples < z.shape[0]:
        rows = stratified_sample(domain, max_examples, key)
        z, domain = z[rows], domain[rows]
    x = z.astype(jnp.float32)
    sigma = _bandwidth(bandwidth, x.shape[1])
    onehot = jax.nn.one_hot(domain, num_domains, dtype=jnp.float32)
    n = jnp.maximum(onehot.sum(0), 1.0)
    mean = (onehot.T @ _kernel(x, x, sigma) @ onehot) / (n[:, None] * n[None, :])  # [K, K]
    diag = jnp.diag(mean)
    mmd2 = diag[:, None] + diag[None, :] - 2.0 * mean
    present = onehot.sum(0) > 0
    if reference is None:
        return _pair_mean(mmd2, present, None, None)
    r, m, d = reference.rows.shape
    valid = (jnp.arange(m)[None, :] < reference.count[:, None]).reshape(-1).astype(jnp.float32)
    ref_onehot = jax.nn.one_hot(jnp.repeat(jnp.arange(r), m), r, dtype=jnp.float32) * valid[:, None]
    cross_kernel = onehot.T @ _kernel(x, reference.rows.reshape(r * m, d), sigma) @ ref_onehot  # [K, R]
    cross_mean = cross_kernel / (n[:, None] * jnp.maximum(reference.count, 1.0)[None, :])
    cross = diag[:, None] + reference.self_kernel[None, :] - 2.0 * cross_mean
    return _pair_mean(mmd2, present, cross, reference)
