"""Text features: frozen featurizers that turn query and item text into vectors, cached per dataset."""

from sr_jax.text.encoder import TextEncoder, load_encoder
from sr_jax.text.featurizer import (
    HashedBagOfWords,
    TextFeaturizer,
    build_text_cache,
    get_featurizer,
    text_identity,
)

__all__ = [
    "HashedBagOfWords",
    "TextEncoder",
    "TextFeaturizer",
    "build_text_cache",
    "get_featurizer",
    "load_encoder",
    "text_identity",
]
