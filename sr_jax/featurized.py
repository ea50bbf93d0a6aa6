"""The dataset a run's config names, with its text features: the synthetic one generated on first use and
its text cache built, any other opened and its cache checked against the configured encoder. It joins
`sr_jax.data` (the examples) and `sr_jax.text` (their features), so it sits above both."""

from __future__ import annotations

from sr_jax import distributed
from sr_jax.config import DataConfig
from sr_jax.data import synthetic
from sr_jax.data.store import Dataset, open_dataset
from sr_jax.io import exclusive
from sr_jax.text import build_text_cache, get_featurizer, text_identity


def load_dataset(cfg: DataConfig) -> Dataset:
    """The configured dataset (the synthetic one, generated on first use, when no path is given), with the
    text cache of `cfg.text_encoder` (built for the synthetic dataset, checked for any other)."""
    if not cfg.path and not distributed.is_primary():
        distributed.barrier("synthetic dataset")  # process 0 generates it (once) before the others read it
    if cfg.path:
        dataset = open_dataset(cfg.path)
    else:  # one process fills the shared cache at a time: two runs starting together wait, not race
        with exclusive(synthetic.default_root(cfg.synthetic).parent, "synthetic dataset cache", wait=True):
            dataset = synthetic.ensure(cfg.synthetic)
            name, fingerprint = text_identity(cfg.text_encoder)
            cache = dataset.meta.text_caches.get(name)
            if cache is None or cache.fingerprint != fingerprint:  # missing, or made by an older encoder version
                build_text_cache(dataset.root, get_featurizer(cfg.text_encoder))
                dataset = open_dataset(dataset.root)
        if distributed.is_primary():
            distributed.barrier("synthetic dataset")
    dataset.text_cache_info(*text_identity(cfg.text_encoder))
    return dataset
