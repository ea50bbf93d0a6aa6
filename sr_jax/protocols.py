"""The cold-start protocols of docs/DESIGN.md ("Cold start"): which splits each trains and evaluates on, and
the fine-tune config each starts from. Config data, like `sr_jax.config`: named configs build on it."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from sr_jax.config import Config, FinetuneConfig, TrainConfig

# protocol -> (train split, eval split) in the embedded dataset (docs/DESIGN.md, "Cold start"); a dataset
# prepared apart for the new domain or items names its own (`protocol_splits`)
PROTOCOLS = {
    "new-domain": ("heldout_train", "heldout_test"),  # a domain held out of pretraining
    "cold-items": ("cold_train", "cold_test"),  # new items in the known domains
}
OWN_SPLITS = ("train", "test")  # a separately prepared dataset's splits, when it has no protocol's names
OWN_VALID = "valid"  # ... and its validation split, used when it has one


def protocol_splits(splits: Sequence[str], protocol: str, train: str = "", evaluate: str = "") -> tuple[str, str]:
    """The (train, eval) splits of `protocol` in a dataset with `splits`: those given, else the protocol's names
    when the dataset has them (the embedded dataset), else its `train` and `test` (a dataset prepared apart)."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown cold-start protocol {protocol!r}; expected one of {sorted(PROTOCOLS)}")
    for default in (PROTOCOLS[protocol], OWN_SPLITS):
        if set(default) <= set(splits):
            train, evaluate = train or default[0], evaluate or default[1]
            break
    missing = [s for s in (train, evaluate) if s not in splits]
    if not (train and evaluate) or missing:
        raise ValueError(
            f"protocol {protocol}: the dataset has splits {sorted(splits)}, not "
            f"{missing or list(PROTOCOLS[protocol])}; "
            "name the cold training and evaluation splits with --train-split and --eval-split"
        )
    return train, evaluate


def finetune_config(
    pretrained: Config,
    protocol: str = "new-domain",
    splits: tuple[str, str] | None = None,
    data_path: str | None = None,
) -> Config:
    """A fine-tune run of `protocol` from a pretrained run's config: its model (so the architecture matches),
    its data settings on `data_path` (default: its dataset), the (train, eval) `splits` (default: the
    protocol's in the embedded dataset), and fine-tuning's own schedule, every level trained
    (docs/COLD_START.md: freezing L0 and L1, the paper's best split, fell below it on real data;
    `finetune.freeze=l0,l1` keeps it). It validates on the dataset's own `valid` split when it is a dataset
    prepared apart that has one, else on a tenth of the labelled rows it is given (`data.train_fraction` of the
    cold train split; at least 16 rows, at most half; each user's latest where there are timestamps), which it
    never trains on: four times an epoch, at least 20 steps apart; it stops after 4 validations without a gain
    (an epoch), never before step 100, and keeps the best step."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown cold-start protocol {protocol!r}; expected one of {sorted(PROTOCOLS)}")
    train_split, eval_split = splits or PROTOCOLS[protocol]
    data = dataclasses.replace(
        pretrained.data,
        path=pretrained.data.path if data_path is None else data_path,
        train_split=train_split,
        eval_split=eval_split,
        batch_size=256,
        pretrain_domains_only=False,
        domains=(),
        valid_split=OWN_VALID if train_split == OWN_SPLITS[0] else "",  # not the pretraining domains' split
        valid_from_train=0.1,
    )
    return dataclasses.replace(
        pretrained,
        data=data,
        train=TrainConfig(
            seed=pretrained.train.seed,
            epochs=5.0,
            min_steps=100,
            learning_rate=2e-3,
            warmup_steps=20,
            log_every=20,
            checkpoint_every=100,
            eval_every=20,
            evals_per_epoch=4.0,
            early_stopping_patience=4,
        ),
        finetune=FinetuneConfig(freeze=(), protocol=protocol),  # every level: docs/COLD_START.md's evidence
    )


ZERO_SHOT = "zero-shot"


def zero_shot(cfg: Config) -> Config:
    """`cfg` as a zero-shot run: no step and no label (train.max_steps=0, no validation), the pretrained start is
    the result; a new domain starts as `match` (its source's rows, the network's logit constant: scored by the
    source's content match), which scores a catalogue it never saw best with no label to adapt the network to
    (docs/COLD_START.md), where a fine-tune starts it as `source`."""
    return dataclasses.replace(
        cfg,
        train=dataclasses.replace(cfg.train, max_steps=0, eval_every=0),
        finetune=dataclasses.replace(cfg.finetune, new_domain_init="match"),
    )
