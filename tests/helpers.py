"""Configs and inputs shared by the tests."""

import dataclasses

from sr_jax.config import Config, SyntheticConfig

# A small world in which a short run gets close to the oracle (see test_training_quality).
SMALL = SyntheticConfig(
    num_users=500,
    num_items=800,
    num_queries=150,
    train_examples=300_000,
    valid_examples=5_000,
    test_examples=20_000,
    heldout_examples=4_000,
    cold_examples=4_000,
)
TINY = SyntheticConfig(
    num_users=60,
    num_items=120,
    num_queries=30,
    train_examples=4_096,
    valid_examples=512,
    test_examples=1_024,
    heldout_examples=1_024,
    cold_examples=1_024,
)


def config(synthetic: SyntheticConfig = TINY, **sections) -> Config:
    """A Config on one device, with the fast hashed-bow text features, no validation (the tests of validation
    turn it on; the default config validates), and `sections` (e.g. train={"epochs": 1}) replaced."""
    cfg = Config()
    cfg = dataclasses.replace(
        cfg,
        data=dataclasses.replace(
            cfg.data, synthetic=synthetic, batch_size=256, eval_batch_size=512, text_encoder="hashed-bow"
        ),
        mesh=dataclasses.replace(cfg.mesh, data=1),
        train=dataclasses.replace(cfg.train, eval_every=0, evals_per_epoch=0.0),
    )
    for name, fields in sections.items():
        cfg = dataclasses.replace(cfg, **{name: dataclasses.replace(getattr(cfg, name), **fields)})
    return cfg


def model_inputs(rows: int = 64):
    """(the TINY dataset, its hashed-bow text table on the default device, its first `rows` train rows): what a
    test applies a model to directly."""
    import jax.numpy as jnp

    from sr_jax import model as sr_model
    from sr_jax.featurized import load_dataset

    ds = load_dataset(config(TINY).data)
    pooled, first = ds.text_cache("hashed-bow")
    batch = {k: jnp.asarray(v[:rows]) for k, v in ds.split("train").items()}
    return ds, sr_model.TextTable(jnp.asarray(pooled), jnp.asarray(first)), batch
