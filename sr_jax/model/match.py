"""Content match: how close the candidate item's text lies, in the frozen language model's space, to the query's
text and to the texts of the user's history (cosines of unit text vectors, `model.content_match`).

Ids, fields and even the model's projections of text are learned per catalogue; the encoder's similarity is
not: "these two texts say the same thing" means the same in a tool catalogue and a film library. So a model that
has learned, in pretraining, how much a domain's clicks follow the match of query and item, and of the user's
past items and the candidate, can score a catalogue it never saw before its first label (through the heads of
the pretrained domain a new domain starts from), and a fine-tune has two numbers per domain to adapt rather
than a network (docs/COLD_START.md: the raw cosines alone rank held-out Amazon and MovieLens test items at AUC
0.58 to 0.95).

The score is a dot product of side vectors, so the two-tower view holds: the user side carries the mean unit
vector of its history's texts, the query side its text's unit vector, the item side its text's; each domain
weighs the two cosines (the domain's row of `ContentMatch.weight`, an L2 parameter that starts at zero).

    match = w_k . [cos(query, item), cos(mean history, item)] * MATCH_SCALE   (added to the tower's logit)
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from sr_jax.model.layers import Array

MATCH_SCALE = 10.0  # cosines spread over about 0.1 between clicked and other items: a unit weight then moves a logit
TEXTS = ("user_text", "query_text", "item_text")  # the side vectors the match reads: unit text vectors [B, text_dim]


def unit(vectors: Array, present: Array) -> Array:
    """Rows scaled to unit length, zero where not present ([..., t], [...] bool)."""
    norm = jnp.sqrt(jnp.maximum(jnp.sum(vectors * vectors, -1, keepdims=True), 1e-12))
    return jnp.where(present[..., None], vectors / norm, 0.0)


Texts = tuple[Array, Array]  # (text vectors [B, t] or [B, N, t], their rows [B] or [B, N]: -1 none)


def unit_texts(query: Texts, item: Texts, history: Texts | None) -> dict[str, Array]:
    """The match's side vectors from the text vectors a batch reads: the item's and the query's unit text
    vectors, and the user's: the mean of its history items' unit vectors (zero without history).
    -> {TEXTS[k]: [B, t]}"""

    def units(texts: Texts) -> Array:
        vectors, rows = texts
        return unit(vectors.astype(jnp.float32), rows >= 0)

    user = jnp.zeros_like(units(item))
    if history is not None:
        present = (history[1] >= 0).astype(jnp.float32)
        user = jnp.einsum("bn,bnt->bt", present, units(history)) / jnp.maximum(present.sum(1, keepdims=True), 1.0)
    return {"user_text": user, "query_text": units(query), "item_text": units(item)}


class ContentMatch(nnx.Module):
    """Each domain's weights of the two cosines; zero at the start, so a fresh model begins as the network."""

    def __init__(self, num_domains: int):
        self.weight = nnx.Param(jnp.zeros((num_domains, 2), jnp.float32))

    def query_side(self, texts: dict[str, Array], domain: Array) -> Array:
        """The user and query's side of the match [B, t]: its dot product with the item's unit text vector is the
        match logit (what a retrieval index of items' unit text vectors ranks by)."""
        w = self.weight[...][domain] * MATCH_SCALE
        return w[:, :1] * texts["query_text"] + w[:, 1:] * texts["user_text"]

    def __call__(self, texts: dict[str, Array], domain: Array) -> Array:
        """texts: `unit_texts`; domain [B] -> the match logit [B] float32:
        w_k . [cos(query, item), cos(history, item)] * MATCH_SCALE."""
        return jnp.sum(self.query_side(texts, domain) * texts["item_text"], -1)
