"""Text features: frozen featurizers that turn query and item text into vectors, cached per dataset."""

from sr_jax.text.featurizer import HashedBagOfWords, TextFeaturizer, build_text_cache, get_featurizer

__all__ = ["HashedBagOfWords", "TextFeaturizer", "build_text_cache", "get_featurizer"]
