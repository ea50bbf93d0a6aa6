"""The benchmark network (`python -m train.bench`): the reference multi-domain MMoE's shapes (32-wide
embeddings, 8 experts of [256, 128], towers of [64, 1], Adam), on the full model. The bench world has no
timestamps, so no user history aspect."""

import dataclasses

from sr_jax.config import Config


def get_config() -> Config:
    cfg = Config()
    return dataclasses.replace(
        cfg,
        data=dataclasses.replace(cfg.data, batch_size=4096, prefetch=2),
        model=dataclasses.replace(
            cfg.model, dim=32, num_experts=8, expert_hidden=(256, 128), tower_hidden=(64,), user_history=0
        ),
        train=dataclasses.replace(cfg.train, optimizer="adam", learning_rate=1e-3),
    )
