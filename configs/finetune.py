"""Fine-tuning a pretrained run for one of the two cold-start protocols of DESIGN.md.

The model and data sections are the pretrained run's (its saved config.json), so the architecture and
the text features match; this config sets the splits of the protocol and fine-tuning's own schedule.
Levels L0 and L1 are frozen by default, the paper's best split.
"""

import dataclasses

from sr_jax.config import Config, FinetuneConfig, TrainConfig

# protocol -> (train split, eval split) of the embedded dataset
PROTOCOLS = {
    "new-domain": ("heldout_train", "heldout_test"),  # a domain held out of pretraining
    "cold-items": ("cold_train", "cold_test"),  # new items in the known domains
}


def get_config(pretrained: Config | None = None, protocol: str = "new-domain") -> Config:
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown cold-start protocol {protocol!r}; expected one of {sorted(PROTOCOLS)}")
    base = pretrained or Config()
    train_split, eval_split = PROTOCOLS[protocol]
    return dataclasses.replace(
        base,
        data=dataclasses.replace(base.data, train_split=train_split, eval_split=eval_split, batch_size=256),
        train=TrainConfig(
            seed=base.train.seed,
            epochs=5.0,
            min_steps=100,
            learning_rate=2e-3,
            warmup_steps=20,
            log_every=20,
            checkpoint_every=100,
        ),
        finetune=FinetuneConfig(freeze=("l0", "l1")),
    )
