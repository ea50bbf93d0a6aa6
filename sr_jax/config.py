"""Typed experiment configuration, command-line overrides and (de)serialisation.

A config is a tree of dataclasses. Every run saves it as `config.json` beside its outputs, and
`load_config(path)` rebuilds the exact object, so any result can be reproduced from its folder.
Overrides are `section.field=value` strings, parsed by the field's declared type.
"""

from __future__ import annotations

import dataclasses
import json
import math
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
    # hashed-bow | a packaged encoder name | a checkpoint folder (BERT family or decoder LM), optionally with
    # feature options: FOLDER?pooling=last&dim=256&instruction=... (docs/TEXT_FEATURES.md)
    text_encoder: str = "all-MiniLM-L6-v2"
    train_split: str = "train"
    train_fraction: float = 1.0  # train on this fraction of the train split (a subset drawn with train.seed)
    domains: tuple[str, ...] = ()  # train and evaluate on these domains only (one model per domain); empty: all
    # Leave out the domains meta.json marks `pretrain: false` (held out for cold start). The fine-tune
    # config turns it off: fine-tuning (and training from scratch on the cold data) is what they are for.
    pretrain_domains_only: bool = True
    eval_split: str = "test"
    # What train.eval_every validates on: the dataset's own validation split when it has this one (""
    # : never), else a part of the labelled train rows carved out and never trained on (`valid_from_train`
    # of them, at least 16, at most half; each user's latest interactions where the data have timestamps).
    valid_split: str = "valid"
    valid_from_train: float = 0.1
    batch_size: int = 1024
    eval_batch_size: int = 8192
    prefetch: int = 2  # batches placed on device ahead of the step
    # Where training reads each example's text vectors from the frozen text table: device (the table on the mesh,
    # read by gathers or, with model.lookup=all_to_all, routed lookups) | host (joined into each batch by the input
    # pipeline, `pipeline.join_texts`: the device holds no text table and no text row crosses the network; the
    # pod's choice, docs/SCALE.md). Inference (predict, scoring, serving) reads the table on its device either way.
    text_join: str = "device"
    # Rows shuffled together: a train split up to this size is shuffled whole each epoch; a bigger one streams
    # in windows of this many rows (blocks of window/64 rows in shuffled order), O(window) host memory
    # (sr_jax/data/pipeline.py).
    shuffle_window: int = 1 << 20


@dataclasses.dataclass
class ModelConfig:
    dim: int = 32  # width d of every aspect vector
    id_buckets: int = 0  # hash ids into this many rows per id table; 0: one row per id (no hashing)
    # Embedding tables get a multiple of this many rows (padding no id reaches), so that any mesh.model
    # dividing it shards them evenly, and a checkpoint's shapes do not depend on the mesh.
    table_row_multiple: int = 64
    # Where a table stores row r: strided (at (r mod m) x R/m + r div m, m the multiple above, so that appended
    # and popular rows spread over every shard of the model axis) | contiguous (at r); sr_jax/model/rows.py
    row_layout: str = "strided"
    # How a table split by rows over several devices is read: gspmd (XLA's masked gather and collectives, whose
    # bytes grow with the global batch) | all_to_all (each id routed to its row's owner and the vector back:
    # bytes grow with a device's own batch; sr_jax/model/lookup.py). The same on one device or unsplit tables.
    lookup: str = "gspmd"
    lookup_capacity: float = 2.0  # all_to_all: unique ids a device may send each owner, x its fair share
    # all_to_all: the dtype the looked-up vectors (and their gradients) travel in during training, float32 |
    # bfloat16 (half the bytes; tables, their updates and the sums of gradients stay float32; inference reads
    # float32; docs/PERFORMANCE.md measures both)
    lookup_wire: str = "float32"
    # The std of the embedding tables' initial rows. 1e-4, so that a row no example trains stays near zero,
    # cost 0.016 AUC on MovieLens against 0.05 (docs/COLD_START.md); in a fine-tune, never-trained rows start
    # from finetune.new_rows_init instead.
    embedding_init_std: float = 0.05
    gating: str = "domain"  # aspect gating fusion: mean | cls | domain
    gate_dim: int = 16  # H, width of the domain and aspect embeddings of the domain gate
    use_text: bool = True  # text aspect on (ablation: off)
    # The user's history aspect: the text features of the last N items the user clicked strictly before the
    # example (sr_jax.data.history); 0: off (N > 0 needs use_text). -1 (auto): HISTORY_AUTO where the dataset has
    # timestamps and the model reads text, else 0, resolved when a run is built (its config.json holds the
    # number). A fine-tune of a model with history on data without timestamps reads the aspect as missing.
    user_history: int = -1
    # How the history's items become one vector: mean (their mean text features) | attention (the candidate
    # item's text attends over them, DIN's target attention: the user vector depends on the candidate).
    history_pooling: str = "mean"
    # The content match (sr_jax/model/match.py): each domain's weights of the cosines, in the frozen text space,
    # of the candidate item's text with the query's and with the user's history: what a catalogue the model never
    # saw shares with the ones it did. Needs use_text.
    content_match: bool = True
    # In training, each example's user, query and item id is read as missing with this probability, so the
    # model learns to score from text, fields and history, as it must for a new user or item (DropoutNet).
    # 0.3 with untrained_ids=missing: +0.03 to +0.10 AUC over scratch where nothing but content is shared, and
    # no loss on the embedded data (docs/COLD_START.md).
    id_dropout: float = 0.3
    # An id or field value whose row the model never trained (a new user or item, a cold item): read as its row
    # (row: a random or fresh vector) or as a missing aspect (missing: the gate weighs text, fields and history).
    untrained_ids: str = "missing"
    use_domain_adapter: bool = True  # Domain Adaptive Layer on (ablation: identity)
    regularizer: str = "js"  # js | mmd | none
    reg_weight: float = 0.05  # lambda
    reg_temperature: float = 1.0  # tau of softmax(z / tau) for JS
    mmd_bandwidth: float = 0.0  # Gaussian kernel sigma; 0: sqrt(feature width)
    mmd_max_examples: int = 1024  # the MMD kernel is [n, n]: a subsample of n examples, stratified by domain
    # mmoe | ple | star | m3oe | sarnet | adaptdhm | epnet | ppnet | hamur | m2m | adasparse (the registry
    # `sr_jax.model.backbones.BACKBONES`, which checks the name when the model is built; docs/MODELS.md);
    # Shared-Bottom is mmoe with num_experts=1
    backbone: str = "mmoe"
    num_experts: int = 4  # shared experts (mmoe, ple, m3oe, m2m)
    domain_experts: int = 1  # each domain's own experts (ple, m3oe)
    ple_levels: int = 1  # PLE's extraction levels (ple; 1 is CGC)
    star_norm: str = "partitioned"  # STAR's normalisation: partitioned (the paper's) | layer (a LayerNorm variant)
    gate_hidden: int = 64  # the hidden width of a gate NU (epnet, ppnet) or of the hyper-network (hamur)
    adapter_rank: int = 8  # the bottleneck r of each HAMUR adapter (hamur)
    meta_layers: int = 2  # the residual meta layers of M2M's meta tower (m2m)
    adasparse_sparsity: float = 0.2  # the share of pruned neurons each layer's regularizer aims at (adasparse)
    adasparse_weight: float = 0.05  # that regularizer's weight in the loss (adasparse)
    adaptdhm_clusters: int = 4  # the clusters (and cluster layers) examples are routed to (adaptdhm)
    adasparse_alpha_step: float = 1e-4  # how much the pruner's sharpness alpha grows each train step (adasparse)
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
    # Gradients of N micro-batches of data.batch_size / N rows each, averaged into one update: the same global
    # batch on fewer devices (or in less memory). L_reg and STAR's batch statistics see one micro-batch at a time;
    # the statistics advance once per step (the mean of the micro-batches' updates).
    grad_accum: int = 1
    # How embedding tables are updated: dense (by the optimizer above, every row every step) | rowwise_adagrad |
    # lazy_adam (row-sparse: only the rows a batch reads are read and written; see training/sparse_update.py)
    embedding_update: str = "dense"
    embedding_learning_rate: float = 0.0  # peak rate of the row-sparse updates; 0: learning_rate
    log_every: int = 50
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    # "A:B": a jax.profiler trace of steps A+1..B (A steps done first, so compilation is not in it) written to
    # RUN/profile (TensorBoard's profile plugin reads it: `tensorboard --logdir RUN/profile`); "": none.
    profile_steps: str = ""
    # Validation during training (0: never), on data.valid_split or a carved part of the train split: every
    # `eval_every` steps, or `evals_per_epoch` times an epoch when that is longer (so a large run validates,
    # and stops, on the scale of epochs; eval_every is the floor). The step with the best
    # `early_stopping_metric` is kept in best/ (orbax's best-checkpoint policy) and evaluated on the test split
    # at the end. `early_stopping_patience` validations without a gain of `early_stopping_min_delta` stop the
    # run (0: never stop early), never before `min_steps`.
    eval_every: int = 50
    evals_per_epoch: float = 2.0
    early_stopping_metric: str = "mean_domain_auc"  # mean_domain_auc | overall_auc (higher is better)
    early_stopping_patience: int = 4
    early_stopping_min_delta: float = 0.0
    max_steps: int = -1  # at most this many steps (-1: the epochs decide; 0: none, the start is the result)
    # After training, a monotone map of each domain's logit fitted on the validation data (sr_jax/calibration.py),
    # carried into eval.json, batch scoring, the serving artifact and the torch conversion: platt (a temperature
    # and a bias) | isotonic | none. A domain with fewer than `calibration_min_clicks` clicks (or non-clicks) in
    # the validation data uses the map of all domains pooled. `calibration_rate` > 0 targets that click rate
    # instead of the validation data's (negatives sampled at k per click, traffic at another rate).
    calibration: str = "platt"
    calibration_min_clicks: int = 30
    calibration_rate: float = 0.0


@dataclasses.dataclass
class FinetuneConfig:
    """Start from a pretrained run instead of a fresh init, and hold chosen levels fixed."""

    pretrained: str = ""  # a run folder (config.json, run_info.json, checkpoints/); empty: fresh init
    protocol: str = ""  # the cold-start protocol a fine-tune (or its scratch baseline) was made for, if any
    pretrained_step: int = -1  # which of its checkpoints; -1: the latest
    freeze: tuple[str, ...] = ()  # levels that get no update: any of l0, l1, l2
    # Align against the pretrained domains' saved distributions (reference.npz of the pretrained run): a
    # fine-tune batch of one domain has no pair of domains of its own to align.
    align_reference: bool = True
    replay_fraction: float = 0.0  # this share of every fine-tune batch replays the pretraining examples
    # Table rows the pretrained run never trained (new keys, cold ids, a new field's values) stay trainable
    # in a frozen L0 and start from: zero | mean (of the table's trained rows) | text (items: the pretrained
    # run's ridge map from an item's text features to its id row; other tables and items without text: mean).
    # The three tie on real data (docs/COLD_START.md): zero, the simplest, is the default.
    new_rows_init: str = "zero"
    # A domain the pretrained run never trained (a new domain) starts its per-domain rows (domain embedding,
    # DAL W_k and b_k, expert gates, tower, content match, each backbone's per-domain parts) from: source (its
    # source domain's rows: best after 1%, 10% and 100% of a new catalogue's labels, docs/COLD_START.md) |
    # match (the same, but the tower's output layer at zero: the network's logit starts constant, so the new
    # domain is scored by its source's content match; what `--strategy zero-shot` runs, best with no label) |
    # mean (of the pretrained domains of its task) | fresh (a fresh init). Its source: `domain_source`'s NEW=OLD
    # pair, else the pretrained domain of its task whose rows score the run's validation data best (the one with
    # the most pretraining examples when there is none).
    new_domain_init: str = "source"
    domain_source: tuple[str, ...] = ()  # NEW=OLD pairs: a new domain and the pretrained domain it starts from
    # Guarding what pretraining learned: the first `probe_steps` steps train only what is new (new domains'
    # rows, new table rows, new fields: linear probing, then fine-tuning: LP-FT); after them the pretrained
    # parameters train at `pretrained_lr` x the learning rate; `l2sp_weight` adds alpha/2 ||theta - theta_0||^2
    # of the pretrained parameters to the loss (L2-SP, as a gradient term).
    probe_steps: int = 0
    pretrained_lr: float = 1.0
    l2sp_weight: float = 0.0
    # `--strategy auto` chooses among its strategies on the validation data only where they hold at least this
    # many labels; below, it keeps the recommended strategy without training the others (docs/COLD_START.md:
    # with 86 validation labels the choice between the fine-tune and scratch went to scratch in 4 of 5 seeds,
    # 0.03 to 0.09 AUC below the fine-tune on the test split; from 422 labels it chose the better one).
    auto_min_valid: int = 300
    # A default fine-tune whose new data hold at least this many times the pretraining run's training rows (and
    # auto_min_valid validation labels) also trains scratch and keeps the better on validation (train.finetune):
    # from MovieLens's 60,247 rows to Amazon's 170,505 the fine-tune was below scratch in 2 of 5 seeds, which the
    # validation data saw (docs/COLD_START.md). 0: never.
    scratch_above: float = 1.0
    # A fine-tune's result for a new domain with a zero-shot model (new_domain_init source or match) is blended
    # with it: logit = (1 - w) x the fine-tuned logit + w x the zero-shot model's, one model of the same shape
    # (sr_jax/training/zero_shot.py), applied to every validated candidate. 0.75 by evidence: on two catalogues
    # the model never saw it beats the unblended fine-tune at 1%, 10% and 100% of the labels (docs/COLD_START.md).
    zero_shot_weight: float = 0.75


@dataclasses.dataclass
class MeshConfig:
    data: int = -1  # devices on the batch axis; -1: all that the model axis leaves
    model: int = 1  # devices on the embedding-row axis
    slices: int = 1  # multi-slice (DCN): the data axis spans this many slices, the model axis stays in one
    # logical axis -> mesh axes (`LOGICAL_AXES` below; "a+b" both, "none" replicated); rules not given keep these.
    # The batch goes over both axes: with `model` > 1 every device computes its own rows (over `data` alone, each
    # device of a model group would repeat the same dense work)
    rules: tuple[str, ...] = (
        "batch=data+model", "table_rows=model", "text_rows=model", "heads=model", "mlp=model", "vocab=model",
    )  # fmt: skip


MESH_AXES = ("data", "model")
LOGICAL_AXES = ("batch", "table_rows", "text_rows", "heads", "mlp", "vocab")
Rules = tuple[tuple[str, tuple[str, ...] | None], ...]  # (logical axis, its mesh axes or None: replicated)


def parse_rules(rules: tuple[str, ...]) -> Rules:
    """`("batch=data+model", "heads=none", ...)` -> rules; every logical axis not named keeps its default
    (`MeshConfig.rules`). A ConfigError names a rule that does not parse, an unknown axis, a repeated one."""
    table = dict(_parse_rule(r) for r in MeshConfig.rules)
    named = set()
    for rule in rules:
        logical, axes = _parse_rule(rule)
        if logical in named:
            raise ConfigError(f"mesh.rules: {logical!r} is given twice")
        named.add(logical)
        table[logical] = axes
    return tuple(table.items())


def _parse_rule(rule: str) -> tuple[str, tuple[str, ...] | None]:
    logical, sep, axes = (part.strip() for part in rule.partition("="))
    if not sep or logical not in LOGICAL_AXES:
        raise ConfigError(f"mesh.rules: {rule!r} is not LOGICAL=AXES with LOGICAL one of {LOGICAL_AXES}")
    if not axes:
        raise ConfigError(f"mesh.rules: {rule!r} names no axes (write {logical}=none to replicate it)")
    if axes.lower() == "none":
        return logical, None
    names = tuple(a.strip() for a in axes.split("+"))
    if any(a not in MESH_AXES for a in names) or len(set(names)) != len(names):
        raise ConfigError(f"mesh.rules: {rule!r}: the axes must be distinct names of {MESH_AXES} joined by '+'")
    return logical, names


@dataclasses.dataclass
class Config:
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    finetune: FinetuneConfig = dataclasses.field(default_factory=FinetuneConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)


class ConfigError(ValueError):
    pass


# The values a choice field may take: the one list every module and the validation read.
LEVELS = ("l0", "l1", "l2")  # the network's levels (docs/DESIGN.md): encoding, shared adaptation, per-domain heads
HISTORY_POOLINGS = ("mean", "attention")
LOOKUPS = ("gspmd", "all_to_all")
TEXT_JOINS = ("device", "host")
ROW_LAYOUTS = ("strided", "contiguous")  # sr_jax/model/rows.py
UNTRAINED_IDS = ("row", "missing")
GATINGS = ("mean", "cls", "domain")
REGULARIZERS = ("js", "mmd", "none")
STAR_NORMS = ("partitioned", "layer")
DTYPES = ("float32", "bfloat16")
OPTIMIZERS = ("adam", "adamw", "adagrad", "sgd")
SCHEDULES = ("cosine", "constant")
EMBEDDING_UPDATES = ("dense", "rowwise_adagrad", "lazy_adam")
NEW_ROWS_INITS = ("zero", "mean", "text")
NEW_DOMAIN_INITS = ("match", "source", "mean", "fresh")
HISTORY_AUTO = 5  # model.user_history=-1 where the dataset has timestamps and the model reads text
CALIBRATIONS = ("platt", "isotonic", "none")  # train.calibration (sr_jax/calibration.py)
VALIDATION_METRICS = ("mean_domain_auc", "overall_auc")


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


def config_changes(before: Any, after: Any) -> dict[str, list]:
    """`section.field` -> [before, after], for the keys whose values differ between two configs."""

    def flat(d: dict, prefix: str = "") -> dict:
        out = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
        return out

    a, b = flat(to_dict(before)), flat(to_dict(after))
    return {k: [a.get(k), b.get(k)] for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)}


def save_config(config: Config, path: str | Path) -> None:
    Path(path).write_text(json.dumps(to_dict(config), indent=2) + "\n")


# Keys added after configs were saved, whose default differs from what a config without them meant: a saved
# config that lacks one reads it as this value, so an older run resumes, re-evaluates and exports as it trained.
BEFORE_KEY = {
    "model": {
        "id_dropout": 0.0,
        "untrained_ids": "row",
        "user_history": 0,
        "content_match": False,
        "row_layout": "contiguous",
    },
    "train": {"evals_per_epoch": 0.0},
    "finetune": {"new_domain_init": "fresh", "zero_shot_weight": 0.0},
}


def load_config(path: str | Path) -> Config:
    """A saved config; a ConfigError naming the file when it is not one. Keys it lacks take their defaults, but
    those of BEFORE_KEY, which take what the config meant when it was saved."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        for section, keys in BEFORE_KEY.items():
            if isinstance(data.get(section), dict):
                data[section] = {**keys, **data[section]}
        return from_dict(Config, data)
    except (json.JSONDecodeError, UnicodeDecodeError, TypeError, AttributeError) as e:
        raise ConfigError(f"{path}: not a saved config ({type(e).__name__}: {e})") from e
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from e


def _check(problems: list[str], ok: bool, key: str, message: str) -> None:
    if not ok:
        problems.append(f"{key}: {message}")


def _positive(problems: list[str], cfg: Any, section: str, *names: str, allow_zero: bool = False) -> None:
    for name in names:
        value = getattr(cfg, name)
        good = math.isfinite(value) and (value >= 0 if allow_zero else value > 0)
        bound = ">= 0" if allow_zero else "> 0"
        _check(problems, good, f"{section}.{name}", f"{value!r} must be a finite number {bound}")


def _choice(problems: list[str], value: str, key: str, choices: tuple[str, ...]) -> None:
    _check(problems, value in choices, key, f"{value!r} is not one of {choices}")


def _only_for(problems: list[str], cfg: Any, section: str, names: tuple[str, ...], active: bool, what: str) -> None:
    """Keys that mean something only under `what`: set to a non-default value otherwise is an error."""
    default = type(cfg)()
    for name in names:
        if not active and getattr(cfg, name) != getattr(default, name):
            problems.append(f"{section}.{name}={getattr(cfg, name)!r} is set, but it applies only {what}")


def validate_model(cfg: ModelConfig) -> list[str]:
    """The model section's problems (see `validate`)."""
    problems: list[str] = []
    _positive(problems, cfg, "model", "dim", "gate_dim", "num_experts", "ple_levels", "table_row_multiple")
    _positive(problems, cfg, "model", "gate_hidden", "adapter_rank", "adaptdhm_clusters")
    _positive(problems, cfg, "model", "meta_layers", allow_zero=True)
    _positive(problems, cfg, "model", "id_buckets", "domain_experts", "reg_weight", "mmd_bandwidth", allow_zero=True)
    _positive(problems, cfg, "model", "reg_temperature", "embedding_init_std")
    _check(problems, cfg.user_history >= -1, "model.user_history", f"{cfg.user_history}: -1 (auto), 0 or a length")
    _check(
        problems,
        cfg.use_text or cfg.user_history <= 0,
        "model.user_history",
        "reads text features: needs model.use_text",
    )
    _check(problems, 0 <= cfg.id_dropout < 1, "model.id_dropout", f"{cfg.id_dropout} must be in [0, 1)")
    _choice(problems, cfg.history_pooling, "model.history_pooling", HISTORY_POOLINGS)
    _choice(problems, cfg.lookup, "model.lookup", LOOKUPS)
    _choice(problems, cfg.row_layout, "model.row_layout", ROW_LAYOUTS)
    _positive(problems, cfg, "model", "lookup_capacity")  # finite: it sizes a buffer
    _choice(problems, cfg.lookup_wire, "model.lookup_wire", DTYPES)
    _choice(problems, cfg.untrained_ids, "model.untrained_ids", UNTRAINED_IDS)
    _check(
        problems, cfg.id_buckets != 1, "model.id_buckets", "1 leaves no row for ids (row 0 is 'missing'): use 0 or >= 2"
    )
    _check(problems, cfg.mmd_max_examples >= 2, "model.mmd_max_examples", f"{cfg.mmd_max_examples} must be >= 2")
    for key, widths in (("model.expert_hidden", cfg.expert_hidden), ("model.tower_hidden", cfg.tower_hidden)):
        _check(problems, all(w > 0 for w in widths), key, f"{widths} must be positive widths")
    _check(problems, len(cfg.expert_hidden) > 0, "model.expert_hidden", "needs at least one layer")
    _choice(problems, cfg.gating, "model.gating", GATINGS)
    _choice(problems, cfg.regularizer, "model.regularizer", REGULARIZERS)
    _choice(problems, cfg.star_norm, "model.star_norm", STAR_NORMS)
    _choice(problems, cfg.dtype, "model.dtype", DTYPES)
    _check(
        problems,
        cfg.gating != "cls" or cfg.use_text,
        "model.gating",
        "cls gating reads text features: set model.use_text=true",
    )
    _check(
        problems, cfg.backbone not in ("ple", "m3oe", "sarnet") or cfg.domain_experts >= 1, "model.domain_experts",
        "ple, m3oe and sarnet need >= 1",
    )  # fmt: skip
    _only_for(
        problems,
        cfg,
        "model",
        ("domain_experts",),
        cfg.backbone in ("ple", "m3oe", "sarnet"),
        "to model.backbone=ple|m3oe|sarnet",
    )
    _only_for(problems, cfg, "model", ("ple_levels",), cfg.backbone == "ple", "to model.backbone=ple")
    _only_for(problems, cfg, "model", ("star_norm",), cfg.backbone == "star", "to model.backbone=star")
    _only_for(
        problems, cfg, "model", ("num_experts",), cfg.backbone in ("mmoe", "ple", "m3oe", "m2m", "sarnet"),
        "to model.backbone=mmoe|ple|m3oe|m2m|sarnet",
    )  # fmt: skip
    _only_for(problems, cfg, "model", ("meta_layers",), cfg.backbone == "m2m", "to model.backbone=m2m")
    _only_for(problems, cfg, "model", ("adaptdhm_clusters",), cfg.backbone == "adaptdhm", "to model.backbone=adaptdhm")
    _only_for(
        problems, cfg, "model", ("adasparse_sparsity", "adasparse_weight", "adasparse_alpha_step"),
        cfg.backbone == "adasparse", "to model.backbone=adasparse",
    )  # fmt: skip
    _check(problems, 0 <= cfg.adasparse_sparsity < 1, "model.adasparse_sparsity", "must be in [0, 1)")
    _positive(problems, cfg, "model", "adasparse_weight", "adasparse_alpha_step", allow_zero=True)
    _only_for(
        problems, cfg, "model", ("gate_hidden",), cfg.backbone in ("epnet", "ppnet", "hamur"),
        "to model.backbone=epnet|ppnet|hamur",
    )  # fmt: skip
    _only_for(problems, cfg, "model", ("adapter_rank",), cfg.backbone == "hamur", "to model.backbone=hamur")
    _only_for(problems, cfg, "model", ("reg_weight",), cfg.regularizer != "none", "with a regularizer (js or mmd)")
    _only_for(problems, cfg, "model", ("reg_temperature",), cfg.regularizer == "js", "to model.regularizer=js")
    _only_for(
        problems,
        cfg,
        "model",
        ("mmd_bandwidth", "mmd_max_examples"),
        cfg.regularizer == "mmd",
        "to model.regularizer=mmd",
    )
    return problems


def absolute_paths(cfg: Config) -> Config:
    """`cfg` with its folders (the dataset, the pretrained run, a text encoder checkpoint folder) absolute,
    so that a saved config means the same folders from any working directory."""
    encoder, options = cfg.data.text_encoder.partition("?")[::2]  # a folder, then its feature options
    if Path(encoder).is_dir():
        encoder = str(Path(encoder).absolute()) + (f"?{options}" if options else "")
    else:
        encoder = cfg.data.text_encoder
    data = dataclasses.replace(
        cfg.data, path=str(Path(cfg.data.path).absolute()) if cfg.data.path else "", text_encoder=encoder
    )
    tune = cfg.finetune
    pretrained = str(Path(tune.pretrained).absolute()) if tune.pretrained else ""
    return dataclasses.replace(cfg, data=data, finetune=dataclasses.replace(tune, pretrained=pretrained))


MAX_EPOCHS = 10_000  # a bound that keeps the step count a 32-bit integer for any split this library reads
SYNTHETIC_TOPICS = 12  # the embedded dataset's topics, named in its texts (sr_jax.data.synthetic.TOPICS)


def validate_synthetic(cfg: SyntheticConfig) -> list[str]:
    """The embedded dataset's settings: counts that can make a world (two users, items and queries per topic at
    least), examples in every split, a fraction of cold items in [0, 1), a non-negative seed."""
    problems: list[str] = []
    minimum = 2 * SYNTHETIC_TOPICS + 1
    for name in ("num_users", "num_items", "num_queries"):
        value = getattr(cfg, name)
        _check(problems, value >= minimum, f"data.synthetic.{name}", f"{value!r}: at least {minimum} (two per topic)")
    _positive(
        problems, cfg, "data.synthetic", "train_examples", "valid_examples", "test_examples", "heldout_examples",
        "cold_examples",
    )  # fmt: skip
    _positive(problems, cfg, "data.synthetic", "seed", allow_zero=True)
    fraction = cfg.cold_item_fraction
    _check(
        problems, math.isfinite(fraction) and 0 <= fraction < 1, "data.synthetic.cold_item_fraction",
        f"{fraction!r} must be in [0, 1)",
    )  # fmt: skip
    _check(
        problems, cfg.num_topics == SYNTHETIC_TOPICS, "data.synthetic.num_topics",
        f"{cfg.num_topics!r}: the generator has {SYNTHETIC_TOPICS} topics, named in its texts",
    )  # fmt: skip
    return problems


def profile_window(text: str) -> tuple[int, int] | None:
    """ "A:B" -> (A, B) with 0 <= A < B; "" -> (0, 0), no profile; None when malformed."""
    if not text:
        return 0, 0
    try:
        a, b = (int(x) for x in text.split(":"))
    except ValueError:
        return None
    return (a, b) if 0 <= a < b else None


def validate(cfg: Config) -> Config:
    """Every rule a config must meet, checked before anything is written or trained. All problems are
    reported at once, each naming its key; returns the config unchanged."""
    data, train, tune, mesh = cfg.data, cfg.train, cfg.finetune, cfg.mesh
    problems = validate_model(cfg.model)
    _positive(problems, data, "data", "batch_size", "eval_batch_size", "train_fraction")
    _positive(problems, data, "data", "prefetch", allow_zero=True)
    _check(problems, data.train_fraction <= 1, "data.train_fraction", f"{data.train_fraction} must be in (0, 1]")
    _check(problems, data.shuffle_window >= 64, "data.shuffle_window", f"{data.shuffle_window}: at least 64 rows")
    _choice(problems, data.text_join, "data.text_join", TEXT_JOINS)
    _check(
        problems,
        cfg.model.use_text or data.text_join == "device",
        "data.text_join",
        f"{data.text_join!r} joins text vectors, but model.use_text is off: nothing reads them",
    )
    _positive(problems, train, "train", "epochs", "learning_rate", "log_every", "checkpoint_every", "keep_checkpoints")
    _check(problems, not train.epochs > MAX_EPOCHS, "train.epochs", f"{train.epochs!r}: at most {MAX_EPOCHS}")
    _check(problems, bool(data.text_encoder.strip()), "data.text_encoder", "empty: name an encoder or hashed-bow")
    problems += validate_synthetic(data.synthetic)
    _positive(
        problems, train, "train", "seed", "min_steps", "warmup_steps", "weight_decay", "grad_clip", allow_zero=True
    )
    _positive(problems, train, "train", "embedding_learning_rate", allow_zero=True)
    _positive(problems, train, "train", "grad_accum")
    _positive(
        problems, train, "train", "eval_every", "early_stopping_patience", "early_stopping_min_delta", allow_zero=True
    )
    _check(problems, profile_window(train.profile_steps) is not None, "train.profile_steps",
           f"{train.profile_steps!r}: expected A:B with 0 <= A < B, or empty")  # fmt: skip
    _choice(problems, train.early_stopping_metric, "train.early_stopping_metric", VALIDATION_METRICS)
    _choice(problems, train.calibration, "train.calibration", CALIBRATIONS)
    _positive(problems, train, "train", "calibration_min_clicks", allow_zero=True)
    _check(
        problems,
        0 <= train.calibration_rate < 1,
        "train.calibration_rate",
        f"{train.calibration_rate}: 0 (the validation data's click rate) or a click rate in (0, 1)",
    )
    _check(
        problems,
        0 <= data.valid_from_train < 1,
        "data.valid_from_train",
        f"{data.valid_from_train} must be in [0, 1)",
    )
    _positive(problems, train, "train", "evals_per_epoch", allow_zero=True)
    _choice(problems, train.optimizer, "train.optimizer", OPTIMIZERS)
    _choice(problems, train.schedule, "train.schedule", SCHEDULES)
    _choice(problems, train.embedding_update, "train.embedding_update", EMBEDDING_UPDATES)
    _check(
        problems,
        cfg.model.lookup == "gspmd" or train.embedding_update != "lazy_adam",
        "model.lookup",
        "all_to_all reads whole row-split tables; lazy_adam reads gathered rows: use gspmd, or rowwise_adagrad (which "
        "runs over each device's own rows)",
    )
    _check(
        problems,
        train.weight_decay == 0 or train.optimizer == "adamw",
        "train.weight_decay",
        f"{train.weight_decay} needs train.optimizer=adamw (got {train.optimizer!r})",
    )
    unknown = [level for level in tune.freeze if level.lower() not in LEVELS]
    _check(problems, not unknown, "finetune.freeze", f"unknown level(s) {unknown}; expected any of {LEVELS}")
    _check(
        problems, 0 <= tune.replay_fraction < 1, "finetune.replay_fraction", f"{tune.replay_fraction} must be in [0, 1)"
    )
    _choice(problems, tune.new_rows_init, "finetune.new_rows_init", NEW_ROWS_INITS)
    _choice(problems, tune.new_domain_init, "finetune.new_domain_init", NEW_DOMAIN_INITS)
    _check(
        problems, 0 <= tune.zero_shot_weight < 1, "finetune.zero_shot_weight", f"{tune.zero_shot_weight} not in [0, 1)"
    )
    for pair in tune.domain_source:
        new, sep, old = (part.strip() for part in pair.partition("="))
        _check(problems, bool(sep and new and old), "finetune.domain_source", f"{pair!r} is not NEW=OLD")
    _positive(
        problems,
        tune,
        "finetune",
        "probe_steps",
        "pretrained_lr",
        "l2sp_weight",
        "auto_min_valid",
        "scratch_above",
        allow_zero=True,
    )
    _check(problems, train.max_steps >= -1, "train.max_steps", f"{train.max_steps}: -1 (the epochs) or >= 0")
    _check(problems, tune.pretrained_step >= -1, "finetune.pretrained_step", "-1 (the latest) or a step")
    _check(
        problems,
        tune.replay_fraction == 0 or bool(tune.pretrained),
        "finetune.replay_fraction",
        "replays the pretraining data of finetune.pretrained, which is not set",
    )
    _check(problems, mesh.model >= 1, "mesh.model", f"{mesh.model} must be >= 1")
    _check(problems, mesh.data == -1 or mesh.data >= 1, "mesh.data", f"{mesh.data} must be -1 (all) or >= 1")
    _check(problems, mesh.slices >= 1, "mesh.slices", f"{mesh.slices} must be >= 1")
    try:
        parse_rules(mesh.rules)
    except ConfigError as e:
        problems.append(str(e))
    _check(
        problems,
        mesh.model < 1 or cfg.model.table_row_multiple % mesh.model == 0,
        "mesh.model",
        f"{mesh.model} must divide model.table_row_multiple={cfg.model.table_row_multiple} (tables are padded to "
        "that multiple of rows, then split over the model axis): raise model.table_row_multiple",
    )
    if problems:
        raise ConfigError("invalid config:\n  " + "\n  ".join(problems))
    return cfg
