"""Training runs (pretraining and fine-tuning alike): everything a run needs, built from a Config,
and the train loop.

A run's folder holds `config.json` (the exact config), `run_info.json`, `vocab.json`, `trained_rows.npz`,
`item_text_map.npz` and `reference.npz` (what its parameters mean, for fine-tuning from it:
`sr_jax.training.finetune`),
`checkpoints/` (orbax), `metrics.jsonl` (one line per log interval), and `eval.json` / `eval.md`. A run
with `finetune.pretrained` set starts from that run's parameters instead of a fresh init;
`finetune.freeze` holds levels fixed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh
from tqdm import tqdm

from sr_jax import distributed, model as sr_model
from sr_jax.config import Config, DataConfig, absolute_paths, save_config, validate
from sr_jax.data import synthetic
from sr_jax.data.pipeline import BatchIterator, MixedBatches, prefetch_to_device
from sr_jax.data.schema import ID_FIELDS, DatasetMeta
from sr_jax.data import history, vocabulary
from sr_jax.data.store import Dataset, column_chunks, open_dataset
from sr_jax.io import exclusive
from sr_jax.text import build_text_cache, get_featurizer, text_identity
from sr_jax import memory
from sr_jax import sharding as shd
from sr_jax.training import alignment, evaluation, finetune, sparse_update
from sr_jax.training.metrics_log import MetricsLog
from sr_jax.training.checkpoint import BestCheckpoint, CheckpointError, Checkpointer, ParamsReader
from sr_jax.training.optimizer import build_optimizer, check_levels, learning_rate, trainable_labels
from sr_jax.training.steps import TrainState, init_state, make_predict_step, make_train_step, state_shardings

log = logging.getLogger("sr_jax")


class TrainingDiverged(FloatingPointError):
    """The loss or the gradient norm became NaN or inf: training stops before anything is saved from it."""


class TrainingInterrupted(RuntimeError):
    """A stop was asked for (SIGTERM, SIGINT): the run finished its step, saved it and stopped."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


@contextlib.contextmanager
def stop_requests() -> Iterator[list[int]]:
    """While training: a SIGTERM or SIGINT is recorded in the yielded list (the loop finishes its step, saves and
    stops: a pre-empted VM loses nothing); a second one exits at once. Installed from the main thread only."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return

    def handler(signum, frame):
        if received:  # asked twice: stop now
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
        received.append(signum)
        log.warning("%s: finishing this step, saving, then stopping (again: stop at once)", signal.Signals(signum).name)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield received
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _stop_agreed(received: list[int], at_sync_point: bool) -> bool:
    """Whether to stop now: at once on one process; several processes agree at logs and checkpoints (a
    collective), so that they all stop after the same step."""
    if jax.process_count() == 1:
        return bool(received)
    return at_sync_point and distributed.any_process(bool(received))


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


class Steps(NamedTuple):
    """The model, optimizer and compiled-to-be steps for a config, on a mesh (no data needed)."""

    graphdef: nnx.GraphDef
    per_domain: Any  # tree of bools like params: leaves whose first axis indexes domains
    labels: Any  # tree like params: what the optimizer does with each leaf (optimizer.trainable_labels)
    embedding_update: str  # the tables' rule: dense, or row-sparse (dense when the tables are frozen)
    trainable_rows: dict | None  # a frozen L0's new rows, the only ones the rule updates (else None: all)
    tx: optax.GradientTransformation
    abstract_state: TrainState  # shapes, dtypes and shardings of the train state
    train_step: Callable  # (state, batch, text, reference) -> (state, metrics)
    predict: Callable  # (params, batch, text) -> click probabilities
    aligned: Callable  # (params, batch, text) -> z [B, 3d], what the regularizer aligns

    @property
    def state_shardings(self) -> TrainState:
        return jax.tree.map(lambda a: a.sharding, self.abstract_state)


def build_steps(
    cfg: Config,
    meta: DatasetMeta,
    text_dim: int,
    mesh: Mesh,
    total_steps: int,
    new_domains: tuple[int, ...] = (),
    new_rows: finetune.NewRows | None = None,
    new_leaves: frozenset[str] = frozenset(),
) -> Steps:
    """Fine-tuning's new domains, new table rows and new leaves (a new field's) stay trainable inside frozen
    levels."""
    validate(cfg)
    graphdef, params = sr_model.abstract(cfg.model, meta, text_dim)
    per_domain = sr_model.per_domain(cfg.model, meta, text_dim, params)
    rows_only = new_rows is not None and new_rows.any and "l0" in check_levels(cfg.finetune.freeze)
    trainable_rows = new_rows.new if rows_only else None
    rule = sparse_update.effective_rule(cfg.train.embedding_update, cfg.finetune.freeze, rows_only)
    labels = trainable_labels(
        params,
        cfg.finetune.freeze,
        per_domain,
        new_domains,
        sparse_tables=rule != "dense",
        stats=sr_model.stats_mask(graphdef, params),
        new_rows=rows_only,
        new_leaves=new_leaves,
    )
    tx = build_optimizer(cfg.train, total_steps, labels, new_domains)
    shapes = jax.eval_shape(lambda p: init_state(p, labels, tx, rule, trainable_rows), params)
    shardings = state_shardings(mesh, shapes)
    train = cfg.train
    sparse = None
    if rule != "dense":
        sparse = (rule, learning_rate(train, total_steps, peak=train.embedding_learning_rate or train.learning_rate))
    step = make_train_step(
        graphdef, tx, labels, cfg.model.reg_weight, mesh, shardings, train.seed, train.grad_clip, new_domains, sparse
    )
    return Steps(
        graphdef=graphdef,
        per_domain=per_domain,
        labels=labels,
        embedding_update=rule,
        trainable_rows=trainable_rows,
        tx=tx,
        abstract_state=jax.tree.map(
            lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings
        ),
        train_step=step,
        predict=make_predict_step(graphdef, mesh, shardings.params),
        aligned=make_predict_step(graphdef, mesh, shardings.params, output=lambda logits, aux: aux["aligned"]),
    )


def compile_step(steps: Steps, batch: Any, text: sr_model.TextTable, reference, what: str):
    """The train step compiled ahead for these batch shapes, after its memory per device is logged and
    checked (`memory.check`: a step that cannot fit fails here, before anything is allocated).
    -> (compiled step, memory estimate, compile seconds)"""
    start = time.perf_counter()
    compiled = steps.train_step.lower(steps.abstract_state, batch, text, reference).compile()
    seconds = time.perf_counter() - start
    estimate = memory.estimate(steps.abstract_state, (batch, text, reference), compiled)
    log.info("train step compiled in %.1f s; memory per device:\n%s", seconds, estimate.table())
    memory.check(estimate, what)
    return compiled, estimate, seconds


def fresh_state(cfg: Config, meta: DatasetMeta, text_dim: int, steps: Steps) -> TrainState:
    """Fresh parameters (train.seed) and optimizer state, made by one compiled function in their shardings."""

    def make():
        params = sr_model.init_params(cfg.model, meta, text_dim, cfg.train.seed)
        return init_state(params, steps.labels, steps.tx, steps.embedding_update)

    return jax.jit(make, out_shardings=steps.state_shardings)()


@dataclasses.dataclass
class Run:
    """The pieces of one training run (everything but the changing train state)."""

    config: Config
    workdir: Path
    dataset: Dataset
    mesh: Mesh
    text: sr_model.TextTable
    domains: tuple[str, ...]  # the domains this run trains and evaluates on
    alignment: vocabulary.Alignment  # the model's tables, and the dataset's ids as their rows
    model_meta: DatasetMeta  # the dataset's metadata with the model's table sizes and fields: what shapes follow
    train_columns: dict[str, np.ndarray]  # the train split's rows of those domains (in the model's rows)
    batch_size: int  # the global batch: data.batch_size, or less when the training data are fewer
    replay_columns: dict[str, np.ndarray] | None  # fine-tuning's replay of the pretraining examples
    replay_size: int  # rows of every batch that replay them (after batch_size - replay_size train rows)
    pretrained: dict | None  # the pretrained run's run_info.json (fine-tuning), else None
    domain_map: finetune.DomainMap | None  # fine-tune domain -> pretrained row (None: new domain)
    trained_rows: dict[str, np.ndarray]  # table -> [rows] bool: trained before this run (pretraining: by it)
    new_rows: finetune.NewRows | None  # fine-tuning: the rows its pretrained run never trained
    new_leaves: frozenset[str]  # fine-tuning: the leaves its pretrained run lacks (a new field's)
    reference: sr_model.AlignmentReference | None  # what fine-tuning aligns against, on device
    steps: Steps  # model, optimizer, train and predict steps
    total_steps: int
    steps_per_epoch: int
    checkpointer: Checkpointer
    valid_columns: dict[str, np.ndarray] | None = None  # what train.eval_every scores (in the model's rows)
    compile_seconds: float = 0.0  # the train step's ahead-of-time compilation (0 until compiled)
    best: BestCheckpoint | None = None  # the best validated parameters (train.eval_every)
    validation: list = dataclasses.field(default_factory=list)  # [step, score] of every validation so far
    # Called with (step, score) after every validation; True stops the run there (a tuner's pruner).
    on_validation: Callable[[int, float], bool] | None = None
    _compiled: Callable | None = dataclasses.field(default=None, init=False, repr=False)

    @property
    def warm_items(self) -> np.ndarray:
        """[item rows] bool: the items whose id rows were trained before this run (the others are cold)."""
        return self.trained_rows["item_id"]

    def split(self, name: str) -> dict[str, np.ndarray]:
        """A split's rows of the run's domains, in the model's table rows (with the user history aspect's
        column, from the run's training examples and this split's, when the model reads it)."""
        columns = self.alignment.remap(select_domains(self.dataset, name, self.domains))
        n = self.config.model.user_history
        return history.with_history(columns, [self.train_columns, columns], n) if n else columns

    def put(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """This process's rows of a batch -> the global batch on the mesh."""
        return shd.to_global(batch, shd.batch_sharding(self.mesh))

    def process_slice(self, batch_size: int) -> slice:
        """The rows of every global batch of this size that this process reads."""
        return shd.process_slice(shd.batch_sharding(self.mesh), batch_size)

    def put_eval(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """A whole evaluation batch, which every process reads, -> the global batch (each brings its rows)."""
        rows = self.process_slice(self.config.data.eval_batch_size)
        return self.put({name: col[rows] for name, col in batch.items()})

    def compiled_train_step(self) -> Callable:
        """The train step compiled ahead for this run's shapes (once), after its memory per device is logged
        and checked: a run that cannot fit fails here, before anything is allocated."""
        if self._compiled is not None:
            return self._compiled
        batch = {
            name: jax.ShapeDtypeStruct(
                (self.batch_size, *col.shape[1:]), col.dtype, sharding=shd.batch_sharding(self.mesh)
            )
            for name, col in self.train_columns.items()
        }
        what = f"training with a batch of {self.batch_size} on mesh {dict(self.mesh.shape)}"
        compiled, _, self.compile_seconds = compile_step(self.steps, batch, self.text, self.reference, what)
        self._compiled = compiled
        return compiled


def run_domains(cfg: DataConfig, meta: DatasetMeta) -> tuple[str, ...]:
    """The domains a run trains and evaluates on: `data.domains` (all when empty), without those meta.json
    holds out of pretraining (`pretrain: false`) when `data.pretrain_domains_only`."""
    known = [d.name for d in meta.domains]
    if unknown := [n for n in cfg.domains if n not in known]:
        raise ValueError(f"data.domains: unknown domain(s) {unknown}; the dataset has {known}")
    chosen = list(cfg.domains) or known
    if not cfg.pretrain_domains_only:
        return tuple(chosen)
    held_out = {d.name for d in meta.domains if not d.pretrain}
    if cfg.domains and (asked := [n for n in cfg.domains if n in held_out]):
        raise ValueError(
            f"data.domains: {asked} are held out of pretraining in meta.json (pretrain: false); "
            "train on them by fine-tuning, or set data.pretrain_domains_only=false"
        )
    return tuple(n for n in chosen if n not in held_out)


def select_domains(dataset: Dataset, split: str, names: tuple[str, ...]) -> dict[str, np.ndarray]:
    """The split's rows of the named domains (all rows when they are all the dataset's)."""
    columns = dataset.split(split)
    known = [d.name for d in dataset.meta.domains]
    if set(names) == set(known):
        return columns
    keep = np.isin(columns["domain"], [known.index(n) for n in names])
    if not keep.any():
        raise ValueError(f"domains {list(names)}: no examples in split {split!r}")
    return {name: np.asarray(col[keep]) for name, col in columns.items()}


def carve_validation(
    columns: dict[str, np.ndarray], fraction: float
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray] | None]:
    """(the rest, a fixed seeded `fraction` of the rows) of a split, each in the original order; the same
    rows whatever train.seed, so every cell of a grid validates on the same data (fraction 0: no carving)."""
    if not fraction:
        return columns, None
    size = len(columns["label"])
    held = np.zeros(size, bool)
    held[np.random.default_rng(0x7A11D).permutation(size)[: max(1, round(fraction * size))]] = True
    return ({k: np.asarray(v)[~held] for k, v in columns.items()}, {k: np.asarray(v)[held] for k, v in columns.items()})


def subset_size(size: int, fraction: float) -> int:
    if not 0 < fraction <= 1:
        raise ValueError(f"data.train_fraction={fraction}: expected a fraction in (0, 1]")
    return max(1, round(fraction * size))


def train_subset(columns: dict[str, np.ndarray], fraction: float, seed: int) -> dict[str, np.ndarray]:
    """A seeded random `fraction` of a split's rows (in their original order); the whole split at 1."""
    size = len(columns["label"])
    keep = subset_size(size, fraction)
    if keep == size:
        return columns
    rows = np.sort(np.random.default_rng([seed, 0x5EED]).permutation(size)[:keep])
    return {name: np.asarray(col[rows]) for name, col in columns.items()}


def clamped_batch_size(configured: int, examples: int, data_axis: int, what: str) -> int:
    """The configured batch, or, when the data are fewer, the largest multiple of the data axis that fits
    (tiny cold-start fractions): the one place a batch is clamped."""
    if examples >= configured:
        return configured
    clamped = examples // data_axis * data_axis
    if clamped == 0:
        raise ValueError(f"{what}: {examples} examples cannot fill a batch over {data_axis} devices of the data axis")
    log.warning(
        "data.batch_size=%d is larger than the %d examples of %s: using %d", configured, examples, what, clamped
    )
    return clamped


def _replay(
    cfg: Config, dataset: Dataset, pretrained: dict, size: int, aligned: vocabulary.Alignment
) -> dict[str, np.ndarray] | None:
    """The pretraining examples a fine-tune batch replays (its train split, trained domains)."""
    if not size:
        return None
    if pretrained["dataset"] != dataset.meta.name:
        raise ValueError(
            f"finetune.replay_fraction={cfg.finetune.replay_fraction}: the pretrained run trained on dataset "
            f"{pretrained['dataset']!r}, this run's is {dataset.meta.name!r}; replay needs the pretraining data"
        )
    return aligned.remap(select_domains(dataset, pretrained["train_split"], tuple(pretrained["trained_domains"])))


def item_texts(dataset: Dataset, aligned: vocabulary.Alignment) -> np.ndarray:
    """[model item rows] int32: each item's row of the text table (-1: none), from every split."""
    out = np.full(aligned.vocab.rows("item_id"), -1, np.int32)
    rows = aligned.rows.get("item_id")
    for split in dataset.meta.splits:
        columns = dataset.split(split)
        ids = np.asarray(columns["item_id"])
        out[ids if rows is None else rows[ids]] = columns["item_text"]
    return out


def _text_estimates(
    fresh: finetune.NewRows,
    source: Path,
    dataset: Dataset,
    aligned: vocabulary.Alignment,
    pooled: np.ndarray,
    dim: int,
) -> finetune.NewRows:
    """`fresh` with the text map's estimate of every new item row that has a text."""
    kernel, bias = finetune.read_text_map(source)
    if kernel.shape != (pooled.shape[1], dim):
        raise CheckpointError(
            f"{source / finetune.TEXT_MAP}: maps {kernel.shape[0]}-wide text features to {kernel.shape[1]}-wide rows; "
            f"this run has {pooled.shape[1]}-wide features and {dim}-wide rows"
        )
    texts = item_texts(dataset, aligned)
    new = fresh.new[("id_tables", "item")][: len(texts)]
    index = np.flatnonzero(new & (texts >= 0)).astype(np.int32)
    estimate = np.asarray(pooled[texts[index]], np.float32) @ kernel + bias
    return dataclasses.replace(fresh, text=(index, estimate))


class Start(NamedTuple):
    """What a run takes from its pretrained run (all None for a fresh run, but `trained_rows`)."""

    mapping: finetune.DomainMap | None
    trained_rows: dict[str, np.ndarray]  # pretraining: the rows this run trains
    new_rows: finetune.NewRows | None
    reference: sr_model.AlignmentReference | None  # on the host
    replay: dict[str, np.ndarray] | None
    new_leaves: frozenset[str]


def _from_pretrained(
    cfg: Config,
    source: Path,
    pretrained: dict,
    dataset: Dataset,
    aligned: vocabulary.Alignment,
    abstract_params: Any,
    pooled: np.ndarray,
    replay_size: int,
) -> Start:
    """The domain map, trained and new rows, new leaves, alignment reference and replay of a fine-tune."""
    if cfg.model.use_text:
        finetune.check_text_encoder(pretrained, text_identity(cfg.data.text_encoder), cfg.finetune.pretrained)
    trained = finetune.read_trained_rows(source, aligned.vocab)
    table_rows = {key: t.shape[0] for key, t in sparse_update.tables(abstract_params).items()}
    hashed = set(ID_FIELDS) if cfg.model.id_buckets else set()
    fresh = finetune.new_rows(trained, table_rows, hashed)
    if cfg.finetune.new_rows_init == "text" and cfg.model.use_text:
        fresh = _text_estimates(fresh, source, dataset, aligned, pooled, cfg.model.dim)
    aligns = cfg.finetune.align_reference and cfg.model.regularizer != "none"
    return Start(
        mapping=finetune.domain_map(dataset, pretrained),
        trained_rows=trained,
        new_rows=fresh,
        reference=alignment.read_reference(source, cfg.model) if aligns else None,
        replay=_replay(cfg, dataset, pretrained, replay_size, aligned),
        new_leaves=finetune.new_leaf_paths(abstract_params, aligned.new_fields),
    )


def build_run(cfg: Config, workdir: str | Path, mesh: Mesh | None = None) -> Run:
    validate(cfg)
    workdir = Path(workdir)
    dataset = load_dataset(cfg.data)
    mesh = mesh or shd.make_mesh(cfg.mesh)
    data_axis = mesh.shape["data"]
    if cfg.data.eval_batch_size % data_axis:
        raise ValueError(
            f"data.eval_batch_size={cfg.data.eval_batch_size} is not divisible by the mesh's data axis ({data_axis})"
        )
    splits = sorted(dataset.meta.splits)
    named = ("train_split", "eval_split", *(("valid_split",) if cfg.train.eval_every and cfg.data.valid_split else ()))
    for key in named:  # before any training: an unknown split would fail only at its end
        if (split := getattr(cfg.data, key)) not in splits:
            raise ValueError(f"data.{key}={split!r}: the dataset {dataset.root} has splits {splits}")
    pooled, first = dataset.text_cache(text_identity(cfg.data.text_encoder)[0])
    text = sr_model.TextTable(*shd.text_table(mesh, pooled, first, keep_first=cfg.model.gating == "cls"))
    domains = run_domains(cfg.data, dataset.meta)
    source = finetune.pretrained_folder(workdir, cfg.finetune.pretrained) if cfg.finetune.pretrained else None
    pretrained = finetune.read_run_info(source) if source else None
    own = vocabulary.of_dataset(dataset)
    aligned = vocabulary.align(vocabulary.read(source), own) if source else vocabulary.identity(own)
    model_meta = aligned.vocab.model_meta(dataset.meta)
    kept, carved = carve_validation(select_domains(dataset, cfg.data.train_split, domains), cfg.data.valid_from_train)
    columns = aligned.remap(train_subset(kept, cfg.data.train_fraction, cfg.train.seed))
    valid = None
    if cfg.train.eval_every:
        valid = aligned.remap(carved if carved is not None else select_domains(dataset, cfg.data.valid_split, domains))
    if cfg.model.user_history:
        if not dataset.meta.has_timestamp:
            raise ValueError(
                f"model.user_history={cfg.model.user_history}: the dataset {dataset.root} has no timestamps"
            )
        if cfg.finetune.replay_fraction:
            raise ValueError("model.user_history with finetune.replay_fraction: the replayed data has no history")
        columns = history.with_history(columns, [columns], cfg.model.user_history)
        if valid is not None:
            valid = history.with_history(valid, [columns, valid], cfg.model.user_history)
    what = f"split {cfg.data.train_split!r} (fraction {cfg.data.train_fraction})"
    batch = clamped_batch_size(cfg.data.batch_size, len(columns["label"]), data_axis, what)
    replay_size = round(cfg.finetune.replay_fraction * batch / data_axis) * data_axis
    if replay_size >= batch:
        raise ValueError(f"finetune.replay_fraction={cfg.finetune.replay_fraction} leaves no room for the cold data")
    if batch % data_axis:
        raise ValueError(f"data.batch_size={batch} is not divisible by the mesh's data axis ({data_axis} devices)")
    steps_per_epoch = len(columns["label"]) // (batch - replay_size)
    total_steps = max(1, cfg.train.min_steps, int(cfg.train.epochs * steps_per_epoch))
    _, abstract_params = sr_model.abstract(cfg.model, model_meta, pooled.shape[1])
    if source is None:
        start = Start(None, finetune.rows_in(columns, aligned.vocab), None, None, None, frozenset())
    else:
        start = _from_pretrained(cfg, source, pretrained, dataset, aligned, abstract_params, pooled, replay_size)
    reference = None if start.reference is None else jax.device_put(start.reference, shd.replicated(mesh))
    steps = build_steps(
        cfg,
        model_meta,
        pooled.shape[1],
        mesh,
        total_steps,
        start.mapping.new_domains if start.mapping else (),
        start.new_rows,
        start.new_leaves,
    )
    return Run(
        config=cfg,
        workdir=workdir,
        dataset=dataset,
        mesh=mesh,
        text=text,
        domains=domains,
        alignment=aligned,
        model_meta=model_meta,
        train_columns=columns,
        batch_size=batch,
        replay_columns=start.replay,
        replay_size=replay_size,
        pretrained=pretrained,
        domain_map=start.mapping,
        trained_rows=start.trained_rows,
        new_rows=start.new_rows,
        new_leaves=start.new_leaves,
        reference=reference,
        steps=steps,
        total_steps=total_steps,
        steps_per_epoch=steps_per_epoch,
        checkpointer=Checkpointer(workdir / "checkpoints", cfg.train.keep_checkpoints, cfg.train.checkpoint_every),
        valid_columns=valid,
        best=BestCheckpoint(workdir / "best") if cfg.train.eval_every else None,
    )


def initial_state(run: Run) -> TrainState:
    """Step 0: fresh parameters, or the pretrained run's (with fresh rows for new domains), and a fresh
    optimizer state, made by one compiled function straight into their shardings."""
    cfg, meta, text_dim = run.config, run.model_meta, run.text.pooled.shape[1]
    if run.domain_map is None:
        return fresh_state(cfg, meta, text_dim, run.steps)
    pretrained = finetune.restore_pretrained(
        cfg.finetune.pretrained,
        cfg.finetune.pretrained_step,
        run.steps.abstract_state.params,
        run.steps.per_domain,
        len(run.pretrained["domains"]),
        run.new_leaves,
    )
    counts = {t: int(m.sum()) for t, m in run.new_rows.new.items() if m.any()}
    log.info(
        "restored %s; new domains (fresh rows): %s; new keys per table: %s; rows never trained (start from %s, "
        "trainable whatever is frozen): %s; new fields: %s",
        cfg.finetune.pretrained,
        [run.dataset.meta.domains[k].name for k in run.domain_map.new_domains] or "none",
        {t: n for t, n in run.alignment.new_keys().items() if n} or "none",
        cfg.finetune.new_rows_init,
        {"/".join(k): n for k, n in counts.items()} or "none",
        list(run.alignment.new_fields) or "none",
    )

    def make(pre) -> TrainState:
        fresh = sr_model.init_params(cfg.model, meta, text_dim, cfg.train.seed)
        params = finetune.merge_pretrained(pre, fresh, run.steps.per_domain, run.domain_map)
        params = finetune.init_new_rows(params, run.new_rows, cfg.finetune.new_rows_init)
        return init_state(params, run.steps.labels, run.steps.tx, run.steps.embedding_update, run.steps.trainable_rows)

    return jax.jit(make, out_shardings=run.steps.state_shardings)(pretrained)


def restore_or_init(run: Run) -> TrainState:
    """The newest checkpoint that restores (a broken newer one is skipped, and said so), or step 0 when the
    run has none."""
    if run.checkpointer.latest_step() is None:
        return initial_state(run)
    state, position, skipped = run.checkpointer.restore_newest(run.steps.abstract_state)
    for problem in skipped:
        log.warning("skipped a checkpoint that does not restore: %s", problem)
    if position["step"] != int(state.step):
        raise CheckpointError(
            f"{run.checkpointer.directory / str(int(state.step))}: the saved data position is step "
            f"{position['step']}, the train state's is {int(state.step)}"
        )
    if (position["epoch"], position["batch"]) != divmod(position["step"], run.steps_per_epoch):
        log.warning(  # --allow-changes with another batch size or data: the position follows the step
            "the saved data position (epoch %d, batch %d) was made with other batches; resuming at step %d of this "
            "run's (%d steps per epoch)",
            position["epoch"],
            position["batch"],
            position["step"],
            run.steps_per_epoch,
        )
    log.info("resumed from step %d (epoch %d, batch %d)", int(state.step), position["epoch"], position["batch"])
    run.validation = [list(v) for v in position.get("validation", [])]
    return state


def restore_params(run: Run, step: int = -1) -> Any:
    """The parameters of one of the run's own checkpoints (the latest by default), without its optimizer
    state: what evaluation needs. A run with no checkpoint is an error, never a fresh model."""
    reader = ParamsReader(run.workdir / "checkpoints")
    try:
        return reader.restore(reader.step(step), run.steps.abstract_state.params)
    finally:
        reader.close()


def result_params(run: Run) -> Any:
    """The run's result: its best validated parameters when it validated (what its eval.json reports), else its
    latest checkpoint's."""
    if run.best is not None and run.best.best() is not None:
        return run.best.restore(run.steps.abstract_state.params)
    return restore_params(run)


def position(run: Run, step: int) -> dict:
    """Where the data stand after `step`, and the validation scores so far (what early stopping decides on)."""
    epoch, batch = divmod(step, run.steps_per_epoch)
    return {"step": step, "epoch": epoch, "batch": batch, "seed": run.config.train.seed, "validation": run.validation}


def stops_early(history: list, patience: int, min_delta: float) -> bool:
    """Whether the last `patience` validations (of [step, score] pairs) brought no gain of more than `min_delta`
    over the best score before them."""
    if not patience:
        return False
    best, since = -np.inf, 0
    for _, score in history:
        best, since = (score, 0) if score > best + min_delta else (best, since + 1)
    return since >= patience


def validate_step(run: Run, params, step: int) -> float:
    """Scores `params` on the validation data, offers them to the best checkpoint, records the score."""
    cfg = run.config
    result = evaluate_columns(run, params, run.valid_columns, "validation")
    score = (
        result["mean_domain_auc"] if cfg.train.early_stopping_metric == "mean_domain_auc" else result["overall"]["auc"]
    )
    run.best.save(step, params, score)
    run.validation = [*[v for v in run.validation if v[0] < step], [step, score]]
    return score


def batches(run: Run, start: int):
    """The run's global batches from step `start` on, this process's rows of each (with the replayed
    pretraining rows after the cold ones when fine-tuning replays)."""
    seed, size, window = run.config.train.seed, run.batch_size, run.config.data.shuffle_window
    if run.replay_columns is None:
        return BatchIterator(
            run.train_columns, size, seed, start_step=start, process_slice=run.process_slice(size), window=window
        )
    main = BatchIterator(run.train_columns, size - run.replay_size, seed, start_step=start, window=window)
    replay = BatchIterator(run.replay_columns, run.replay_size, seed + 1, start_step=start, window=window)
    return MixedBatches(main, replay, run.process_slice(size))


def train(run: Run, state: TrainState, until: int | None = None) -> TrainState:
    """Trains from the state's step to `until` (default: the end), checkpointing and logging on the way. The
    loss and gradient norm are checked at every log and every checkpoint: a NaN or inf stops the run with
    `TrainingDiverged` before that state is saved (the update that made NaN parameters had a NaN gradient).
    A SIGTERM or SIGINT finishes the step, saves it and raises `TrainingInterrupted`."""
    cfg = run.config
    start, stop = int(state.step), min(until or run.total_steps, run.total_steps)
    if stops_early(run.validation, cfg.train.early_stopping_patience, cfg.train.early_stopping_min_delta):
        return state  # a resumed run that had stopped early: done
    feed = prefetch_to_device(batches(run, start), run.put, cfg.data.prefetch)
    desc, primary = "finetune" if cfg.finetune.pretrained else "train", distributed.is_primary()
    step_fn = run.compiled_train_step()
    window_start, window_steps = time.perf_counter(), 0
    with (
        contextlib.closing(feed),
        stop_requests() as received,
        contextlib.closing(MetricsLog(run.workdir, start, write=primary)) as metrics_log,
        tqdm(total=stop, initial=start, desc=desc, unit="step", dynamic_ncols=True, disable=not primary) as bar,
    ):
        for step, batch in zip(range(start, stop), feed):
            state, metrics = step_fn(state, batch, run.text, run.reference)
            window_steps += 1
            done = step + 1
            logged = done % cfg.train.log_every == 0 or done == stop
            stopping = _stop_agreed(received, logged or run.checkpointer.due(done))
            if logged or stopping or run.checkpointer.due(done):  # a state is saved only after its loss is checked
                metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
                check_finite(run, metrics, done)
            if logged:
                elapsed = time.perf_counter() - window_start
                metrics.update(epoch=done / run.steps_per_epoch, examples_per_s=window_steps * run.batch_size / elapsed)
                metrics_log.write(done, metrics)
                bar.set_postfix(loss=f"{metrics['loss']:.4f}", ex_s=f"{metrics['examples_per_s']:,.0f}")
                window_start, window_steps = time.perf_counter(), 0
            early = pruned = False
            if run.best is not None and (done % cfg.train.eval_every == 0 or done == stop):
                score = validate_step(run, state.params, done)
                metrics_log.write(done, {f"valid_{cfg.train.early_stopping_metric}": score})
                early = stops_early(
                    run.validation, cfg.train.early_stopping_patience, cfg.train.early_stopping_min_delta
                )
                pruned = run.on_validation is not None and bool(run.on_validation(done, score))
            final = done == run.total_steps or early or pruned
            run.checkpointer.save(done, state, position(run, done), force=final or stopping)
            bar.update(1)
            if early or pruned:
                log.info(
                    "stopping after step %d: %s",
                    done,
                    f"{cfg.train.early_stopping_patience} validations without a gain" if early else "pruned",
                )
                break
            if stopping:
                run.checkpointer.wait()
                signum = received[0] if received else signal.SIGTERM
                raise TrainingInterrupted(
                    f"{run.workdir}: stopped by {signal.Signals(signum).name} after step {done}, which is saved; "
                    "run the same command to resume",
                    signum,
                )
    run.checkpointer.wait()
    return state


def check_finite(run: Run, metrics: dict, step: int) -> None:
    """Stops a run whose loss or gradient norm is NaN or inf, before that state is saved or evaluated."""
    bad = {k: metrics[k] for k in ("loss", "grad_norm") if not np.isfinite(metrics[k])}
    if bad:
        run.checkpointer.wait()
        kept = run.checkpointer.latest_step()
        raise TrainingDiverged(
            f"{run.workdir}: {', '.join(f'{k}={v}' for k, v in bad.items())} at step {step}; nothing from this "
            f"state was saved, the last checkpoint is step {kept}. Lower train.learning_rate, or check the data "
            "and the restored parameters."
        )


def trained_so_far(run: Run) -> dict[str, np.ndarray]:
    """table -> [rows] bool: the rows trained by this run or before it (its pretrained run's)."""
    now = finetune.rows_in(run.train_columns, run.alignment.vocab)
    return {table: run.trained_rows[table] | rows for table, rows in now.items()}


def evaluate(run: Run, params, split: str | None = None) -> dict:
    """Metrics of `params` on a split (default: data.eval_split)."""
    split = split or run.config.data.eval_split
    return evaluate_columns(run, params, run.split(split), split)


def evaluate_columns(run: Run, params, columns: dict[str, np.ndarray], name: str) -> dict:
    """Metrics of `params` on `columns` (rows in the model's tables), reported under `name`."""
    probs = evaluation.predict_split(
        run.steps.predict, params, columns, run.config.data.eval_batch_size, run.put_eval, run.text
    )
    return evaluation.compute_metrics(run.dataset, name, probs, columns, run.warm_items)


def write_records(run: Run, params) -> None:
    """What a run leaves for the runs started from it: the items its id rows were trained on (with its
    pretrained run's) and each trained domain's sample of z (`alignment`)."""
    trained = trained_so_far(run)
    cfg = run.config

    def aligned(batch):
        return run.steps.aligned(params, batch, run.text)

    if distributed.is_primary():
        finetune.write_trained_rows(run.workdir, trained)
        if cfg.model.use_text:
            _write_text_map(run, params)
    alignment.write_reference(
        run.workdir,
        aligned,
        run.train_columns,
        run.dataset.meta.num_domains,
        cfg.train.seed,
        cfg.data.eval_batch_size,
        run.put_eval,
        write=distributed.is_primary(),
    )


def _write_text_map(run: Run, params) -> None:
    """Fits and saves the map from an item's text features to its id row, on the items this run trained that
    have a text (read from its training columns, already in memory; hashed id tables have no row of their own
    per item: no map)."""
    if run.config.model.id_buckets:
        return
    table = np.asarray(jax.device_get(params["l0"]["id_tables"]["item"]))
    seen, text_of = np.zeros(len(table), bool), np.full(len(table), -1, np.int64)  # each item's first text row
    columns = run.train_columns
    for (_, ids), (_, rows) in zip(column_chunks(columns["item_id"]), column_chunks(columns["item_text"])):
        items, first = np.unique(ids, return_index=True)
        new = ~seen[items]
        seen[items[new]], text_of[items[new]] = True, rows[first[new]]
    items = np.flatnonzero(seen)
    texts = text_of[items]
    keep = (items > 0) & (texts >= 0)
    if keep.sum() < 2:
        return
    pooled = run.dataset.text_cache(text_identity(run.config.data.text_encoder)[0])[0]  # memory-mapped
    kernel, bias = finetune.fit_text_map(pooled[texts[keep]], table[items[keep]], run.config.train.seed)
    finetune.write_text_map(run.workdir, kernel, bias)


def fit(cfg: Config, workdir: str | Path, on_validation: Callable[[int, float], bool] | None = None) -> dict:
    """A whole run, pretraining or fine-tuning: resume or start, train, evaluate, write the reports. One writer
    per run folder: a second `fit` on the same folder fails at once (`io.FolderLocked`, naming the holder).
    The saved config names its folders by absolute path. `on_validation(step, score)`, called after every
    validation (train.eval_every), stops the run where it returns True (a tuner's pruner); the run then ends
    as an early-stopped one does, with its best validated step."""
    cfg = absolute_paths(validate(cfg))
    workdir = Path(workdir)
    with exclusive(workdir) if distributed.is_primary() else contextlib.nullcontext():
        return _fit(cfg, workdir, on_validation)


def _fit(cfg: Config, workdir: Path, on_validation: Callable[[int, float], bool] | None) -> dict:
    if distributed.is_primary():
        save_config(cfg, workdir / "config.json")
        if cfg.finetune.pretrained:
            finetune.snapshot_pretrained(workdir, cfg.finetune.pretrained)
    distributed.barrier("run folder")
    run = build_run(cfg, workdir)
    run.on_validation = on_validation
    if distributed.is_primary():
        vocabulary.write(workdir, run.alignment.vocab)
        text_id = text_identity(cfg.data.text_encoder)
        finetune.write_run_info(
            workdir, run.dataset, cfg.data.train_split, run.train_columns["domain"], text_id, run.pretrained
        )
    log.info(
        "dataset %s: training on %d examples of split %r (domains %s); %d steps (%d per epoch) of batch %d%s "
        "on mesh %s; frozen levels: %s",
        run.dataset.meta.name,
        len(run.train_columns["label"]),
        cfg.data.train_split,
        list(run.domains),
        run.total_steps,
        run.steps_per_epoch,
        run.batch_size,
        f" ({run.replay_size} replayed)" if run.replay_size else "",
        dict(run.mesh.shape),
        list(cfg.finetune.freeze) or "none",
    )
    log.info("embedding tables:\n%s", shd.table_layout(run.mesh, run.steps.abstract_state.params))
    run.compiled_train_step()  # the memory check, before the state is allocated
    started = time.perf_counter()
    state = train(run, restore_or_init(run))
    train_seconds = time.perf_counter() - started
    params, chosen = state.params, None
    if run.best is not None:  # the validation-chosen step is the run's result
        params, (step, score) = run.best.restore(run.steps.abstract_state.params), run.best.best()
        chosen = {"step": step, "metric": cfg.train.early_stopping_metric, "score": score, "history": run.validation}
    write_records(run, params)
    started = time.perf_counter()
    result = evaluate(run, params)
    # where a run's time goes (this process; a resumed run counts its own part only)
    result["timing"] = {
        "compile_s": run.compile_seconds,
        "train_s": train_seconds,  # with its validations
        "evaluate_s": time.perf_counter() - started,
    }
    if chosen is not None:
        result["validation"] = chosen
        result["trained_steps"] = int(state.step)
    if distributed.is_primary():
        evaluation.write_report(workdir, result)
    run.checkpointer.close()
    if run.best is not None:
        run.best.close()
    return result
