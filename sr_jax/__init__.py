"""sr-jax: the S&R Multi-Domain Foundation model (arXiv 2309.08939) in JAX/Flax NNX."""

__version__ = "0.1.0"
