"""The interface every frozen text featurizer implements, the model-free baseline, and cache building.

A featurizer maps texts to two vectors each, as Aspect Gating Fusion needs (docs/DESIGN.md, L0): the pooled
vector (a summary of the whole text) and the summary-token vector (what `cls` gating reads: BERT's first
token, a decoder's last; the cache calls it `first`). Its outputs are computed once per text and stored in
the dataset's text cache, tagged with `name` and `fingerprint()` so that training never mixes features from
different encoders. A featurizer may prompt queries (`query_prefix`, e.g. an embedding model's instruction):
the cache builder prefixes the texts that queries use.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import re
import shutil
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
from tqdm import tqdm

from sr_jax.data.store import open_dataset, write_text_cache
from sr_jax.io import atomic_file
from sr_jax.text.encoder import PACKAGED, describe, load_encoder, split_spec

log = logging.getLogger("sr_jax")


class TextFeaturizer(Protocol):
    name: str
    dim: int
    query_prefix: str  # put before every query text ("" for none); part of the fingerprint

    def fingerprint(self) -> str:
        """Changes whenever the features would change (weights, vocabulary, settings)."""

    def featurize(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(pooled [n, dim], first [n, dim]) float32."""


_WORD = re.compile(r"\w+")  # a run of letters or digits of any script


class HashedBagOfWords:
    """Hashed bag of words with a fixed random projection: deterministic, needs no model.

    Each case-folded word (a run of letters or digits of any script: "café", "東京") is hashed (CRC32)
    into one of `buckets` rows of a Gaussian matrix drawn from `seed`; pooled = L2-normalised mean of the
    text's word rows, first = its first word's row. A text with no word ("!!! ???") gets the empty text's
    vector (the row of the empty word), as a language-model encoder gives one to a text of no tokens.
    Texts sharing words get similar vectors; synonyms do not (that is what a language model adds).
    """

    name = "hashed-bow"
    query_prefix = ""

    def __init__(self, dim: int = 64, buckets: int = 1 << 16, seed: int = 0):
        self.dim, self.buckets, self.seed = dim, buckets, seed
        self._table = np.random.default_rng(seed).standard_normal((buckets, dim), dtype=np.float32) / np.sqrt(dim)

    def fingerprint(self) -> str:
        return f"hashed-bow-v2:dim={self.dim}:buckets={self.buckets}:seed={self.seed}"

    def featurize(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        pooled = np.zeros((len(texts), self.dim), np.float32)
        first = np.zeros((len(texts), self.dim), np.float32)
        for i, text in enumerate(texts):
            words = _WORD.findall(text.casefold()) or [""]
            vectors = self._table[[zlib.crc32(w.encode("utf-8")) % self.buckets for w in words]]
            mean = vectors.mean(axis=0)
            pooled[i] = mean / max(float(np.linalg.norm(mean)), 1e-12)
            first[i] = vectors[0]
        return pooled, first


def get_featurizer(name: str, batch_size: int | None = None, dtype: str = "float32", mesh=None) -> TextFeaturizer:
    """The featurizer a config names (`data.text_encoder`): `hashed-bow`, a packaged encoder name such as
    `all-MiniLM-L6-v2`, or a checkpoint folder, with options (`encoder.py`); language models run with
    `batch_size`, `dtype` and an optional mesh."""
    if name == HashedBagOfWords.name:
        return HashedBagOfWords()
    base, _ = split_spec(name)
    if base in PACKAGED or Path(base).is_dir():
        return load_encoder(name, batch_size=batch_size, dtype=dtype, mesh=mesh)
    raise ValueError(
        f"unknown text encoder {name!r}; available: {[HashedBagOfWords.name, *PACKAGED]} or a checkpoint folder"
    )


@functools.cache
def text_identity(spec: str) -> tuple[str, str]:
    """(cache name, fingerprint) of the featurizer a config names, without loading any weights."""
    if spec == HashedBagOfWords.name:
        f = HashedBagOfWords()
        return f.name, f.fingerprint()
    encoder = describe(spec)
    return encoder.name, encoder.fingerprint


def build_text_cache(
    root: str | Path,
    featurizer: TextFeaturizer,
    chunk_size: int = 8192,
    progress: bool = True,
    reuse: Sequence[str | Path] = (),
) -> None:
    """Featurizes a dataset's whole text table into that featurizer's cache.

    Texts are read through `prompted_texts` (queries prefixed when the featurizer prompts them). Caches are
    keyed by text content: a text that a dataset in `reuse` already holds in a cache of the same
    featurizer (same fingerprint) is copied from there, not encoded again, so merging or re-preparing data
    costs only its new texts. The other texts are sorted by length and featurized in chunks; each finished
    chunk is saved (atomically) in `text_cache/.NAME.partial/`, so a build that is killed resumes where it
    stopped, as long as the featurizer's fingerprint is unchanged. The cache appears only once complete.
    """
    root = Path(root)
    texts = prompted_texts(root, featurizer.query_prefix)
    pooled = np.zeros((len(texts), featurizer.dim), np.float32)
    first = np.zeros((len(texts), featurizer.dim), np.float32)
    known = _reuse(texts, featurizer, reuse, pooled, first)
    todo = np.flatnonzero(~known)
    order = todo[np.argsort([len(texts[r]) for r in todo], kind="stable")]
    work = root / "text_cache" / f".{featurizer.name}.partial"
    manifest = {"fingerprint": featurizer.fingerprint(), "num_texts": len(texts), "chunk_size": chunk_size,
                "todo": hashlib.sha256(order.tobytes()).hexdigest()}  # fmt: skip
    if work.exists() and _read_json(work / "manifest.json") != manifest:
        shutil.rmtree(work)  # left by another encoder, text table or reuse: not reusable
    work.mkdir(parents=True, exist_ok=True)
    (work / "manifest.json").write_text(json.dumps(manifest))
    if reuse:  # say what reusing gave, nothing included
        log.log(
            logging.INFO if known.any() else logging.WARNING,
            "text cache %s: %d of %d texts reused from %s; %d to encode",
            featurizer.name, known.sum(), len(texts), [str(r) for r in reuse], len(texts) - known.sum(),
        )  # fmt: skip
    with tqdm(total=len(order), desc=f"encode {featurizer.name}", unit="text", disable=not progress) as bar:
        for start in range(0, len(order), chunk_size):
            rows = order[start : start + chunk_size]
            chunk = work / f"{start // chunk_size:06d}.npz"
            if chunk.exists():
                with np.load(chunk) as saved:
                    p, f = saved["pooled"], saved["first"]
            else:
                p, f = featurizer.featurize([texts[r] for r in rows])
                with atomic_file(chunk) as tmp:
                    np.savez(tmp, pooled=p, first=f)
            pooled[rows], first[rows] = p, f
            bar.update(len(rows))
            if tokens := getattr(featurizer, "tokens_seen", 0):  # language models count their tokens
                bar.set_postfix(tokens_per_s=f"{tokens / max(bar.format_dict['elapsed'], 1e-9):,.0f}")
    write_text_cache(root, featurizer.name, featurizer.fingerprint(), pooled, first)
    shutil.rmtree(work)


def _reuse(texts: list[str], featurizer: TextFeaturizer, sources, pooled: np.ndarray, first: np.ndarray) -> np.ndarray:
    """Copies into pooled/first the vectors of the texts that a source dataset's cache of this featurizer holds;
    -> [len(texts)] bool, which texts were found."""
    found = np.zeros(len(texts), bool)
    for source in sources:
        other = open_dataset(source, check=False)
        info = other.meta.text_caches.get(featurizer.name)
        if info is None or info.fingerprint != featurizer.fingerprint():
            log.warning("%s: no %s cache of this fingerprint to reuse", source, featurizer.name)
            continue
        row_of = {t: r for r, t in enumerate(prompted_texts(other.root, featurizer.query_prefix))}
        mine = np.array([r for r in range(len(texts)) if not found[r] and texts[r] in row_of], np.int64)
        if not len(mine):
            continue
        theirs = np.array([row_of[texts[r]] for r in mine], np.int64)
        other_pooled, other_first = other.text_cache(featurizer.name)
        pooled[mine], first[mine] = other_pooled[theirs], other_first[theirs]
        found[mine] = True
    return found


def prompted_texts(root: str | Path, query_prefix: str) -> list[str]:
    """The dataset's text table as the featurizer reads it: the texts that queries use (in any split) with
    `query_prefix` before them. A text used by both a query and an item is read as a query."""
    dataset = open_dataset(root, check=False)
    texts = dataset.texts()
    if not query_prefix:
        return texts
    rows = np.unique(np.concatenate([np.asarray(dataset.split(s)["query_text"]) for s in dataset.meta.splits]))
    for r in rows[rows >= 0]:
        texts[r] = query_prefix + texts[r]
    return texts


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
