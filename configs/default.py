"""The demo: the full model (domain gating, Domain Adaptive Layer, JS regularizer, MMoE) pretrained on
the embedded synthetic dataset."""

from sr_jax.config import Config


def get_config() -> Config:
    return Config()
