"""Aspect Gating Fusion (L1): a side's aspect vectors -> one vector, h = sum_a w_a e_a.

Strategies (the paper compares all three; `domain` won):
  mean    w_a = 1 / |present aspects|
  cls     w = softmax(W c + b), c = the side's first-token text vector (zero for a side without text)
  domain  w_a = exp(E_D[k] . E_A[a]) / sum_a' exp(E_D[k] . E_A[a'])  (E_D shared by the sides, E_A per side)
Missing aspects are masked out of the softmax; a side with no aspect at all (the query of a
recommendation example) is a learned "missing" vector instead.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from sr_jax.model.encoding import Aspects
from sr_jax.model.layers import Array, masked_softmax, normal


class AspectGate(nnx.Module):
    """Fusion of one side's A aspects."""

    def __init__(self, strategy: str, num_aspects: int, dim: int, gate_dim: int, text_dim: int, *, rngs: nnx.Rngs):
        self.strategy = strategy
        self.missing = normal(rngs, (dim,), 0.05)
        if strategy == "domain":
            self.aspect_embedding = normal(rngs, (num_aspects, gate_dim), gate_dim**-0.5)
        elif strategy == "cls":
            self.cls_gate = nnx.Linear(text_dim, num_aspects, rngs=rngs)

    def __call__(self, aspects: Aspects, domain_embedding: Array) -> tuple[Array, Array]:
        """aspects [B, A, d], domain_embedding [B, H] (the example's E_D row) -> (h [B, d], w [B, A])."""
        if self.strategy == "mean":
            logits = jnp.zeros(aspects.mask.shape, jnp.float32)
        elif self.strategy == "cls":
            logits = self.cls_gate(aspects.summary)
        else:
            logits = domain_embedding @ self.aspect_embedding[...].T
        w = masked_softmax(logits, aspects.mask)
        h = jnp.einsum("ba,bad->bd", w, aspects.vectors)
        none = ~aspects.mask.any(-1, keepdims=True)
        return jnp.where(none, self.missing[...], h), w
