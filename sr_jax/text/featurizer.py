"""The interface every frozen text featurizer implements, the model-free baseline, and cache building.

A featurizer maps texts to two vectors each, as Aspect Gating Fusion needs (DESIGN.md, L0): the pooled
vector (a summary of the whole text) and the first-token vector (what `cls` gating reads). Its outputs
are computed once per text and stored in the dataset's text cache, tagged with `name` and
`fingerprint()` so that training never mixes features from different encoders.
"""

from __future__ import annotations

import re
import zlib
from pathlib import Path
from typing import Protocol

import numpy as np


class TextFeaturizer(Protocol):
    name: str
    dim: int

    def fingerprint(self) -> str:
        """Changes whenever the features would change (weights, vocabulary, settings)."""

    def featurize(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(pooled [n, dim], first [n, dim]) float32."""


_WORD = re.compile(r"[a-z0-9]+")


class HashedBagOfWords:
    """Hashed bag of words with a fixed random projection: deterministic, needs no model.

    Each lower-cased word is hashed (CRC32) into one of `buckets` rows of a Gaussian matrix drawn from
    `seed`; pooled = L2-normalised mean of the text's word rows, first = its first word's row.
    Texts sharing words get similar vectors; synonyms do not (that is what a language model adds).
    """

    name = "hashed-bow"

    def __init__(self, dim: int = 64, buckets: int = 1 << 16, seed: int = 0):
        self.dim, self.buckets, self.seed = dim, buckets, seed
        self._table = np.random.default_rng(seed).standard_normal((buckets, dim), dtype=np.float32) / np.sqrt(dim)

    def fingerprint(self) -> str:
        return f"hashed-bow-v1:dim={self.dim}:buckets={self.buckets}:seed={self.seed}"

    def featurize(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        pooled = np.zeros((len(texts), self.dim), np.float32)
        first = np.zeros((len(texts), self.dim), np.float32)
        for i, text in enumerate(texts):
            rows = [zlib.crc32(w.encode()) % self.buckets for w in _WORD.findall(text.lower())]
            if not rows:
                raise ValueError(f"text {i} has no words: {text!r}")
            vectors = self._table[rows]
            mean = vectors.mean(axis=0)
            pooled[i] = mean / max(float(np.linalg.norm(mean)), 1e-12)
            first[i] = vectors[0]
        return pooled, first


def get_featurizer(name: str) -> TextFeaturizer:
    """The featurizer a config names (`data.text_encoder`)."""
    if name == HashedBagOfWords.name:
        return HashedBagOfWords()
    raise ValueError(f"unknown text encoder {name!r}; available: {[HashedBagOfWords.name]}")


def build_text_cache(root: str | Path, featurizer: TextFeaturizer) -> None:
    """Featurizes a dataset's whole text table and stores it as that featurizer's cache."""
    from sr_jax.data.store import open_dataset, write_text_cache

    dataset = open_dataset(root, check=False)
    pooled, first = featurizer.featurize(dataset.texts())
    write_text_cache(root, featurizer.name, featurizer.fingerprint(), pooled, first)
