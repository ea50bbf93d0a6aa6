"""What a run is, fixed before it trains (`RunSpec`, built by `build_spec`): its config and folder, the data it
reads in the model's table rows, the text table on the mesh, its schedule, its program, and, when it
fine-tunes, its pretrained start. Nothing in it changes while the run trains (`sr_jax.training.loop.Run`
holds what does)."""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from pathlib import Path

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding

from sr_jax import model as sr_model
from sr_jax import sharding as shd
from sr_jax.config import HISTORY_AUTO, Config, ConfigError, validate
from sr_jax.data import history, vocabulary
from sr_jax.data.schema import DatasetMeta
from sr_jax.data.pipeline import join_texts, rows_read
from sr_jax.data.selection import (
    Columns,
    carve_validation,
    clamped_batch_size,
    history_events,
    run_domains,
    select_domains,
    subset_size,
    train_subset,
    valid_subset,
)
from sr_jax.data.store import Dataset
from sr_jax.featurized import load_dataset
from sr_jax.text import text_identity
from sr_jax.training import records
from sr_jax.training.pretrained import PretrainedStart, read_start
from sr_jax.training.program import Program, build_program

log = logging.getLogger("sr_jax")


@dataclasses.dataclass(frozen=True)
class RunSpec:
    config: Config
    workdir: Path
    dataset: Dataset
    mesh: Mesh
    text: sr_model.TextTable  # the dataset's text features on the mesh (data.text_join=host: zero rows only)
    joined_text: dict[str, np.ndarray]  # data.text_join=host: part -> the host table its batches join; else {}
    domains: tuple[str, ...]  # the domains this run trains and evaluates on
    row_map: vocabulary.RowMap  # the model's tables, and the dataset's ids as their rows
    model_meta: DatasetMeta  # the dataset's metadata with the model's table sizes and fields: what shapes follow
    train_columns: Columns  # the train split's rows it trains on (in the model's rows)
    valid_columns: Columns | None  # what train.eval_every scores (in the model's rows)
    valid_source: str  # `validation_source`: "", a split's name, or CARVED
    history_domains: tuple[str, ...]  # model.user_history: the domains its events come from (`history_events`)
    trained_rows: dict[str, np.ndarray]  # table -> [rows] bool: trained before this run (pretraining: none)
    start: PretrainedStart | None  # fine-tuning: what it takes from its pretrained run
    batch_size: int  # the global batch: data.batch_size, or less when the training data are fewer
    replay_size: int  # rows of every batch that replay pretraining examples (after batch_size - replay_size)
    steps_per_epoch: int
    total_steps: int
    program: Program  # model, optimizer, train and predict steps

    @property
    def reference(self) -> sr_model.AlignmentReference | None:
        """What fine-tuning aligns against, on the mesh (None: the run aligns its own domains only)."""
        return None if self.start is None else self.start.reference

    @functools.cached_property
    def rules(self) -> shd.Rules:
        """The logical axis rules its arrays are laid out by (mesh.rules)."""
        return shd.parse_rules(self.config.mesh.rules)

    @functools.cached_property
    def batch_sharding(self) -> NamedSharding:
        """Where every global batch lies (the `batch` rule): read once, not at every step."""
        return shd.batch_sharding(self.mesh, self.rules)

    @property
    def budget(self) -> dict[str, int]:
        """The labels the run used: those it trains on (none without a step), and those that choose its step or
        its new domains' sources (validation)."""
        valid = 0 if self.valid_columns is None else len(self.valid_columns["label"])
        return {"train_examples": len(self.train_columns["label"]) if self.total_steps else 0, "valid_examples": valid}

    @property
    def eval_interval(self) -> int:
        """Steps between validations (0: none): train.eval_every, or an epoch / train.evals_per_epoch if longer."""
        train = self.config.train
        if not self.valid_source:
            return 0
        per_epoch = math.ceil(self.steps_per_epoch / train.evals_per_epoch) if train.evals_per_epoch else 0
        return max(train.eval_every, per_epoch)

    @property
    def validation_data(self) -> str:
        """What the run validates on, in words (the log and the report say it)."""
        if not self.valid_source:
            return ""
        rows = len(self.valid_columns["label"])
        if self.valid_source == CARVED:
            how = "its users' latest" if "timestamp" in self.valid_columns else "a seeded random part of"
            return f"{rows} rows carved from the labelled rows of split {self.config.data.train_split!r} ({how})"
        share = (
            f", data.train_fraction={self.config.data.train_fraction} of it"
            if self.config.data.train_fraction < 1
            else ""
        )
        return f"the dataset's split {self.valid_source!r} ({rows} rows{share})"

    def rows_read(self, steps: int) -> dict[str, np.ndarray]:
        """table -> [rows] bool: the table rows that the run's first `steps` batches read (row 0, missing, never):
        what a run trained up to a step, however few epochs it ran or however early its best step was."""
        cfg = self.config
        read = rows_read(
            len(self.train_columns["label"]), self.batch_size - self.replay_size, cfg.train.seed, steps,
            cfg.data.shuffle_window,
        )  # fmt: skip
        tables = self.row_map.vocab.keys  # only the id and field columns: what `rows_in` reads
        return records.rows_in({t: np.asarray(self.train_columns[t])[read] for t in tables}, self.row_map.vocab)

    def split(self, name: str) -> Columns:
        """A split's rows of the run's domains, in the model's table rows (with the user history aspect's
        column, from the run's training examples and this split's, when the model reads it)."""
        columns = select_domains(self.dataset, name, self.domains)
        if n := self.config.model.user_history:
            events = history_events(self.dataset, name, self.config.data.train_split, self.history_domains)
            columns = history.with_history(columns, events, n)
        return self.row_map.remap(columns)

    def process_slice(self, batch_size: int) -> slice:
        """The rows of every global batch of this size that this process reads."""
        return shd.process_slice(self.batch_sharding, batch_size)

    def global_batch(self, rows: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """This process's rows of a batch -> the global batch on the mesh (with its text vectors joined on the host
        under data.text_join=host)."""
        return shd.to_global(join_texts(rows, self.joined_text) if self.joined_text else rows, self.batch_sharding)

    def global_eval_batch(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """A whole evaluation batch, which every process reads, -> the global batch (each brings its rows)."""
        rows = self.process_slice(self.config.data.eval_batch_size)
        return self.global_batch({name: col[rows] for name, col in batch.items()})

    def batch_shapes(self) -> dict[str, jax.ShapeDtypeStruct]:
        """The shapes, dtypes and sharding of one global train batch: what the train step is compiled for."""
        first = {name: col[:1] for name, col in self.train_columns.items()}
        first = join_texts(first, self.joined_text) if self.joined_text else first
        return {
            name: jax.ShapeDtypeStruct((self.batch_size, *col.shape[1:]), col.dtype, sharding=self.batch_sharding)
            for name, col in first.items()
        }


def _check_splits(cfg: Config, dataset: Dataset, data_axis: int) -> None:
    """Before any training: an unknown split would fail only at its end."""
    if cfg.data.eval_batch_size % data_axis:
        raise ConfigError(
            f"data.eval_batch_size={cfg.data.eval_batch_size} is not divisible by the mesh's data axis ({data_axis})"
        )
    splits = sorted(dataset.meta.splits)
    for key in ("train_split", "eval_split"):
        if (split := getattr(cfg.data, key)) not in splits:
            raise ConfigError(f"data.{key}={split!r}: the dataset {dataset.root} has splits {splits}")


def resolve_history(cfg: Config, dataset: Dataset) -> Config:
    """`model.user_history=-1` (auto) as the run's number: HISTORY_AUTO where the dataset has timestamps and the
    model reads text, else 0 (and the log says why); a set number is kept."""
    if cfg.model.user_history != -1:
        return cfg
    n = HISTORY_AUTO if dataset.meta.has_timestamp and cfg.model.use_text else 0
    if not n:
        why = "has no timestamps" if not dataset.meta.has_timestamp else "is read without text (model.use_text)"
        log.info("no user history aspect: the dataset %s %s", dataset.root, why)
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, user_history=n))


CARVED = "carved"  # `validation_source`: a part of the labelled train rows


def validation_source(cfg: Config, dataset: Dataset) -> str:
    """What the run validates on: "" (it does not), the dataset's own `data.valid_split` when it has it, else
    CARVED (data.valid_from_train's part of the labelled rows); a ConfigError when it has neither."""
    if not cfg.train.eval_every:
        return ""
    if cfg.data.valid_split and cfg.data.valid_split in dataset.meta.splits:
        return cfg.data.valid_split
    if cfg.data.valid_from_train:
        return CARVED
    raise ConfigError(
        f"train.eval_every={cfg.train.eval_every}: the dataset {dataset.root} has no split "
        f"data.valid_split={cfg.data.valid_split!r} (it has {sorted(dataset.meta.splits)}) and "
        "data.valid_from_train=0 carves none; name a split, set a fraction to carve, or train.eval_every=0"
    )


def build_spec(cfg: Config, workdir: str | Path, mesh: Mesh | None = None) -> RunSpec:
    """Everything a run is, from its config, in stages that read top to bottom: the dataset and the devices, the
    text table, the model's tables (its pretrained run's, extended by this dataset's keys), the labelled examples
    in those tables, the schedule, the pretrained start (fine-tuning) and the program."""
    validate(cfg)
    workdir = Path(workdir)
    dataset = load_dataset(cfg.data)
    cfg = resolve_history(cfg, dataset)
    mesh = mesh or shd.make_mesh(cfg.mesh)
    rules = shd.parse_rules(cfg.mesh.rules)
    data_axis = shd.batch_shards(mesh, rules)  # devices a batch is split over
    _check_splits(cfg, dataset, data_axis)
    pooled, text, joined_text = _text_table(cfg, dataset, mesh, rules)
    domains = run_domains(cfg.data, dataset.meta)
    folder = records.pretrained_folder(workdir, cfg.finetune.pretrained) if cfg.finetune.pretrained else None
    run_info = records.read_run_info(folder) if folder else None  # first: it says whether this is a run folder
    row_map = _row_map(cfg, dataset, folder)
    model_meta = row_map.vocab.model_meta(dataset.meta)
    trained = tuple(sorted(set(domains) | set(run_info["trained_domains"] if run_info else ())))
    valid_source = validation_source(cfg, dataset)
    columns, valid = _examples(cfg, dataset, domains, trained, valid_source, row_map)
    batch, replay_size, steps_per_epoch, total_steps = _schedule(cfg, len(columns["label"]), data_axis)
    start = None
    if folder is not None:
        _, abstract_params = sr_model.abstract(cfg.model, model_meta, pooled.shape[1])
        start = read_start(cfg, folder, run_info, dataset, row_map, abstract_params, pooled, replay_size, mesh)
    program = build_program(
        cfg,
        model_meta,
        pooled.shape[1],
        mesh,
        total_steps,
        start.domain_map.new_domains if start else (),
        start.new_rows if start else None,
        start.new_leaves if start else frozenset(),
    )
    return RunSpec(
        config=cfg,
        workdir=workdir,
        dataset=dataset,
        mesh=mesh,
        text=text,
        joined_text=joined_text,
        domains=domains,
        row_map=row_map,
        model_meta=model_meta,
        train_columns=columns,
        valid_columns=valid,
        valid_source=valid_source,
        history_domains=trained,
        trained_rows=start.trained_rows
        if start
        else {t: np.zeros(row_map.vocab.rows(t), bool) for t in row_map.vocab.keys},
        start=start,
        batch_size=batch,
        replay_size=replay_size,
        steps_per_epoch=steps_per_epoch,
        total_steps=total_steps,
        program=program,
    )


def _text_table(
    cfg: Config, dataset: Dataset, mesh: Mesh, rules: shd.Rules
) -> tuple[np.ndarray, sr_model.TextTable, dict[str, np.ndarray]]:
    """The dataset's cached text features for the run's encoder -> (pooled [texts, t] on the host, `text_inputs`)."""
    pooled, summary = dataset.text_cache(text_identity(cfg.data.text_encoder)[0])
    return pooled, *text_inputs(cfg, mesh, pooled, summary, rules)


def text_inputs(
    cfg: Config, mesh: Mesh, pooled: np.ndarray, summary: np.ndarray, rules: shd.Rules = shd.DEFAULT_RULES
) -> tuple[sr_model.TextTable, dict[str, np.ndarray]]:
    """Where a train step reads the text features (`pooled`, `summary`: the host cache) from -> (the text table on
    the mesh, the host tables each batch joins: part -> table). data.text_join=device: the table, nothing joined;
    host: a table of zero rows only (the model reads the batch's joined vectors), and the batches join pooled (and
    the summary where cls gating reads it). The training run and the benchmarks decide it here."""
    keep_summary = cfg.model.gating == "cls"
    if cfg.data.text_join == "device":
        return sr_model.TextTable(*shd.text_table(mesh, pooled, summary, keep_summary, rules)), {}
    joined = {"pooled": pooled, **({"summary": summary} if keep_summary else {})}
    return sr_model.TextTable(*shd.text_table(mesh, pooled[:0], summary[:0], keep_summary, rules)), joined


def _row_map(cfg: Config, dataset: Dataset, folder: Path | None) -> vocabulary.RowMap:
    """The model's table rows: the pretrained run's vocabulary extended by this dataset's new keys (fine-tuning),
    else this dataset's; a ConfigError where hashing would make known keys read other keys' rows."""
    own = vocabulary.of_dataset(dataset)
    row_map = vocabulary.extend(vocabulary.read(folder), own) if folder else vocabulary.identity(own)
    if switches := row_map.hashing_switches(cfg.model.id_buckets):
        table, before, after = switches[0]
        raise ConfigError(
            f"model.id_buckets={cfg.model.id_buckets}: table {table} had {before} rows in the pretrained run (a row "
            f"per id) and has {after} with this dataset's new keys, which would be hashed: every known key would "
            f"read another key's row. Pretrain with model.id_buckets below {before}, or fine-tune on fewer new keys"
        )
    return row_map


def _examples(
    cfg: Config,
    dataset: Dataset,
    domains: tuple[str, ...],
    trained: tuple[str, ...],
    valid_source: str,
    row_map: vocabulary.RowMap,
) -> tuple[Columns, Columns | None]:
    """(train columns, validation columns or None) in the model's table rows: the labelled budget is
    data.train_fraction of the train split, a carved validation set comes out of it, the dataset's own validation
    split gives as much of itself; each example carries its user's history where model.user_history asks."""
    kept, valid = _labelled(cfg, dataset, domains, valid_source)
    if n := cfg.model.user_history:
        if not dataset.meta.has_timestamp:
            log.warning("model.user_history=%d: the dataset %s has no timestamps; the history aspect reads as "
                        "missing", n, dataset.root)  # fmt: skip
        if cfg.finetune.replay_fraction:
            raise ConfigError("model.user_history with finetune.replay_fraction: the replayed data has no history")
        events = history_events(dataset, cfg.data.train_split, cfg.data.train_split, trained)
        kept = history.with_history(kept, events, n)
        if valid is not None:
            own = cfg.data.train_split if valid_source == CARVED else cfg.data.valid_split
            valid = history.with_history(valid, history_events(dataset, own, cfg.data.train_split, trained), n)
    return row_map.remap(kept), None if valid is None else row_map.remap(valid)


def _labelled(
    cfg: Config, dataset: Dataset, domains: tuple[str, ...], valid_source: str
) -> tuple[Columns, Columns | None]:
    """(train rows, validation rows or None) of the labelled budget, in the dataset's keys."""
    split = select_domains(dataset, cfg.data.train_split, domains)
    labelled = train_subset(split, cfg.data.train_fraction, cfg.train.seed)
    kept, carved = carve_validation(labelled, cfg.data.valid_from_train if valid_source == CARVED else 0)
    if not valid_source or carved is not None:
        return kept, carved
    own = select_domains(dataset, cfg.data.valid_split, domains)  # the dataset's own, as much as of train
    return kept, valid_subset(own, cfg.data.train_fraction, cfg.train.seed)


def labelled_budget(cfg: Config) -> tuple[int, int]:
    """(training rows, validation rows) a run of `cfg` holds, counted before anything is built (what a choice
    of strategy reads before training)."""
    dataset = load_dataset(cfg.data)
    domains = run_domains(cfg.data, dataset.meta)
    kept, valid = _labelled(cfg, dataset, domains, validation_source(cfg, dataset))
    return len(kept["label"]), 0 if valid is None else len(valid["label"])


def versus_scratch(cfg: Config) -> str | None:
    """Why a default fine-tune (`train.finetune`) also trains scratch and keeps the better on validation, or None:
    its new data hold at least finetune.scratch_above times the pretraining run's training rows
    (docs/COLD_START.md: from MovieLens's 60,247 to Amazon's 170,505 the fine-tune was below scratch in 2 of 5
    seeds, and the validation data said so in both) and enough validation labels to choose
    (finetune.auto_min_valid)."""
    ratio = cfg.finetune.scratch_above
    if not (ratio and cfg.finetune.pretrained and cfg.train.eval_every):
        return None
    pretrained = sum(records.read_run_info(cfg.finetune.pretrained)["domain_examples"])
    if cfg.data.path:  # at most the fraction of the whole split: most fine-tunes stop here, before any data is read
        whole = DatasetMeta.read(cfg.data.path).splits.get(cfg.data.train_split, 0)
        if subset_size(whole, cfg.data.train_fraction) < ratio * pretrained:
            return None
    rows, valid = labelled_budget(cfg)
    if rows < ratio * pretrained or valid < cfg.finetune.auto_min_valid:
        return None
    return (
        f"{rows:,} training rows, {rows / max(pretrained, 1):.1f}x the pretraining run's {pretrained:,} "
        f"(finetune.scratch_above={ratio:g}), and {valid:,} validation labels"
    )


def _schedule(cfg: Config, examples: int, data_axis: int) -> tuple[int, int, int, int]:
    """(global batch, its replayed rows, steps per epoch, total steps) for `examples` training rows; a ConfigError
    where the batch does not split over the data axis or into train.grad_accum micro-batches."""
    what = f"split {cfg.data.train_split!r} (fraction {cfg.data.train_fraction})"
    batch = clamped_batch_size(cfg.data.batch_size, examples, data_axis, what)
    replay_size = round(cfg.finetune.replay_fraction * batch / data_axis) * data_axis
    if replay_size >= batch:
        raise ConfigError(f"finetune.replay_fraction={cfg.finetune.replay_fraction} leaves no room for the cold data")
    if batch % data_axis:
        raise ConfigError(f"data.batch_size={batch} is not divisible by the mesh's data axis ({data_axis} devices)")
    if (batch - replay_size) % cfg.train.grad_accum or batch % (cfg.train.grad_accum * data_axis):
        raise ConfigError(
            f"train.grad_accum={cfg.train.grad_accum}: the batch of {batch} rows does not split into that many "
            f"micro-batches over the mesh's data axis ({data_axis} devices)"
        )
    steps_per_epoch = examples // (batch - replay_size)
    total_steps = max(1, cfg.train.min_steps, int(cfg.train.epochs * steps_per_epoch))
    if cfg.train.max_steps >= 0:
        total_steps = min(total_steps, cfg.train.max_steps)
    return batch, replay_size, steps_per_epoch, total_steps
