"""Typed experiment configuration, command-line overrides and (de)serialisation.

A config is a tree of dataclasses. Every run saves it as `config.json` beside its outputs, and
`load_config(path)` rebuilds the exact object, so any result can be reproduced from its folder.
Overrides are `section.field=value` strings, parsed by the field's declared type.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from pathlib import Path
from typing import Any


@dataclasses.dataclass
class SyntheticConfig:
    """The embedded multi-domain S&R dataset (see `sr_jax.data.synthetic`)."""

    seed: int = 0
    num_users: int = 3000
    num_items: int = 4000
    num_queries: int = 600
    num_topics: int = 12
    train_examples: int = 1_000_000
    valid_examples: int = 20_000
    test_examples: int = 40_000
    heldout_examples: int = 40_000  # the extra domain kept out of pretraining (train + test halves)
    cold_item_fraction: float = 0.08  # items that never appear in train, only in test
    cold_examples: int = 40_000  # impressions of cold items in known domains (cold_train + cold_test halves)


@dataclasses.dataclass
class DataConfig:
    # Dataset folder in the store format. Empty: generate the synthetic dataset (cached by its config).
    path: str = ""
    synthetic: SyntheticConfig = dataclasses.field(default_factory=SyntheticConfig)
    text_encoder: str = "all-MiniLM-L6-v2"  # hashed-bow | a packaged encoder name | a checkpoint folder
    train_split: str = "train"
    train_fraction: float = 1.0  # train on this fraction of the train split (a subset drawn with train.seed)
    domains: tuple[str, ...] = ()  # train and evaluate on these domains only (one model per domain); empty: all
    eval_split: str = "test"
    batch_size: int = 1024
    eval_batch_size: int = 8192
    prefetch: int = 2  # batches placed on device ahead of the step


@dataclasses.dataclass
class ModelConfig:
    dim: int = 32  # width d of every aspect vector
    id_buckets: int = 0  # hash ids into this many rows per id table; 0: one row per id (no hashing)
    gating: str = "domain"  # aspect gating fusion: mean | cls | domain
    gate_dim: int = 16  # H, width of the domain and aspect embeddings of the domain gate
    use_text: bool = True  # text aspect on (ablation: off)
    use_domain_adapter: bool = True  # Domain Adaptive Layer on (ablation: identity)
    regularizer: str = "js"  # js | mmd | none
    reg_weight: float = 0.05  # lambda
    reg_temperature: float = 1.0  # tau of softmax(x_hat / tau) for JS
    mmd_bandwidth: float = 0.0  # Gaussian kernel sigma; 0: sqrt(feature width)
    mmd_max_examples: int = 1024  # the MMD kernel is [n, n]: use the first n examples of a batch
    backbone: str = "mmoe"  # mmoe | ple | star; Shared-Bottom is mmoe with num_experts=1
    num_experts: int = 4  # shared experts (mmoe, ple)
    domain_experts: int = 1  # each domain's own experts (ple)
    expert_hidden: tuple[int, ...] = (64, 32)  # every expert's layers (star: the star network's)
    tower_hidden: tuple[int, ...] = (32,)
    dtype: str = "float32"  # compute dtype; parameters stay float32


@dataclasses.dataclass
class TrainConfig:
    seed: int = 0
    epochs: float = 2.0  # length of the run, in passes over the train split
    min_steps: int = 0  # but at least this many steps (for tiny fine-tuning sets)
    optimizer: str = "adam"  # adam | adamw | adagrad | sgd
    learning_rate: float = 3e-3
    warmup_steps: int = 100
    schedule: str = "cosine"  # cosine | constant
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # global-norm clipping; 0: off
    # How embedding tables are updated: dense (by the optimizer above, every row every step) | rowwise_adagrad |
    # lazy_adam (row-sparse: only the rows a batch reads are read and written; see training/sparse_update.py)
    embedding_update: str = "dense"
    embedding_learning_rate: float = 0.0  # peak rate of the row-sparse updates; 0: learning_rate
    log_every: int = 50
    checkpoint_every: int = 500
    keep_checkpoints: int = 3


@dataclasses.dataclass
class FinetuneConfig:
    """Start from a pretrained run instead of a fresh init, and hold chosen levels fixed."""

    pretrained: str = ""  # a run folder (config.json, run_info.json, checkpoints/); empty: fresh init
    pretrained_step: int = -1  # which of its checkpoints; -1: the latest
    freeze: tuple[str, ...] = ()  # levels that get no update: any of l0, l1, l2


@dataclasses.dataclass
class MeshConfig:
    data: int = -1  # devices on the batch axis; -1: all that the model axis leaves
    model: int = 1  # devices on the embedding-row axis


@dataclasses.dataclass
class Config:
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    finetune: FinetuneConfig = dataclasses.field(default_factory=FinetuneConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)


class ConfigError(ValueError):
    pass


def _parse(value: str, annotation: Any, key: str) -> Any:
    origin = typing.get_origin(annotation)
    if origin is tuple:
        (item_type, _) = typing.get_args(annotation)
        parts = [p for p in value.strip("()[] ").split(",") if p.strip()]
        return tuple(_parse(p.strip(), item_type, key) for p in parts)
    if annotation is bool:
        if value.lower() in ("1", "true", "yes", "on"):
            return True
        if value.lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{key}: expected a boolean, got {value!r}")
    try:
        return annotation(value)
    except ValueError as e:
        raise ConfigError(f"{key}: cannot read {value!r} as {annotation.__name__}") from e


def override(config: Any, assignments: list[str]) -> Any:
    """Returns a copy of `config` with `a.b.c=value` assignments applied."""
    for assignment in assignments:
        key, sep, value = assignment.partition("=")
        if not sep:
            raise ConfigError(f"override {assignment!r} is not of the form section.field=value")
        config = _replace_path(config, key.split("."), value, key)
    return config


def _replace_path(node: Any, path: list[str], value: str, key: str) -> Any:
    fields = {f.name: f for f in dataclasses.fields(node)}
    if path[0] not in fields:
        raise ConfigError(f"unknown config key {key!r}: {type(node).__name__} has {sorted(fields)}")
    hints = typing.get_type_hints(type(node))
    child = getattr(node, path[0])
    if len(path) == 1:
        if dataclasses.is_dataclass(child):
            raise ConfigError(f"{key!r} is a section, not a field")
        return dataclasses.replace(node, **{path[0]: _parse(value, hints[path[0]], key)})
    if not dataclasses.is_dataclass(child):
        raise ConfigError(f"{key!r}: {path[0]!r} is a field, not a section")
    return dataclasses.replace(node, **{path[0]: _replace_path(child, path[1:], value, key)})


def to_dict(config: Any) -> dict:
    return dataclasses.asdict(config)


def from_dict(cls: type, data: dict) -> Any:
    """Rebuilds a dataclass tree; unknown keys are an error, missing keys take defaults."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ConfigError(f"{cls.__name__}: unknown keys {sorted(unknown)}")
    kwargs = {}
    for name, value in data.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            value = from_dict(hint, value)
        elif typing.get_origin(hint) is tuple:
            value = tuple(value)
        kwargs[name] = value
    return cls(**kwargs)


def save_config(config: Config, path: str | Path) -> None:
    Path(path).write_text(json.dumps(to_dict(config), indent=2) + "\n")


def load_config(path: str | Path) -> Config:
    return from_dict(Config, json.loads(Path(path).read_text()))


def config_from_name(name: str) -> Config:
    """`configs/NAME.py`'s `get_config()`: the named starting points of the CLI."""
    import importlib

    try:
        module = importlib.import_module(f"configs.{name}")
    except ModuleNotFoundError as e:
        raise ConfigError(f"no config named {name!r} in configs/") from e
    return module.get_config()
