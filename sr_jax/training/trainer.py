"""Training runs (pretraining and fine-tuning alike): everything a run needs, built from a Config,
and the train loop.

A run's folder holds `config.json` (the exact config), `run_info.json` (what its parameters mean, for
fine-tuning from it), `checkpoints/` (orbax), `metrics.jsonl` (one line per log interval), and
`eval.json` / `eval.md`. A run with `finetune.pretrained` set starts from that run's parameters
(`sr_jax.training.finetune`) instead of a fresh init; `finetune.freeze` holds levels fixed.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
import logging
import os
import time
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh
from tqdm import tqdm

from sr_jax import distributed, model as sr_model
from sr_jax.config import Config, DataConfig, save_config
from sr_jax.data import synthetic
from sr_jax.data.pipeline import BatchIterator, prefetch_to_device
from sr_jax.data.schema import DatasetMeta
from sr_jax.data.store import Dataset, open_dataset
from sr_jax.text import text_identity
from sr_jax.training import evaluation, finetune, memory, sharding as shd, sparse_update
from sr_jax.training.checkpoint import Checkpointer
from sr_jax.training.optimizer import build_optimizer, trainable_labels
from sr_jax.training.steps import TrainState, init_state, make_predict_step, make_train_step, state_shardings

log = logging.getLogger("sr_jax")


def load_dataset(cfg: DataConfig) -> Dataset:
    """The configured dataset (the synthetic one when no path is given), with its text cache checked."""
    if not cfg.path and not distributed.is_primary():
        distributed.barrier("synthetic dataset")  # process 0 generates it (once) before the others read it
    dataset = open_dataset(cfg.path) if cfg.path else synthetic.ensure(cfg.synthetic, (cfg.text_encoder,))
    if not cfg.path and distributed.is_primary():
        distributed.barrier("synthetic dataset")
    dataset.text_cache_info(*text_identity(cfg.text_encoder))
    return dataset


class Steps(NamedTuple):
    """The model, optimizer and compiled-to-be steps for a config, on a mesh (no data needed)."""

    graphdef: nnx.GraphDef
    per_domain: Any  # tree of bools like params: leaves whose first axis indexes domains
    embedding_update: str  # the tables' rule: dense, or row-sparse (dense when the tables are frozen)
    tx: optax.GradientTransformation
    abstract_state: TrainState  # shapes, dtypes and shardings of the train state
    train_step: Callable  # (state, batch, text) -> (state, metrics)
    predict: Callable  # (params, batch, text) -> click probabilities


def build_steps(
    cfg: Config, meta: DatasetMeta, text_dim: int, mesh: Mesh, total_steps: int, new_rows: tuple[int, ...] = ()
) -> Steps:
    """`new_rows`: fine-tuning's new domains, trainable inside frozen levels."""
    graphdef, params = sr_model.abstract(cfg.model, meta, text_dim)
    per_domain = sr_model.per_domain(cfg.model, meta, text_dim, params)
    rule = sparse_update.effective_rule(cfg.train.embedding_update, cfg.finetune.freeze)
    labels = trainable_labels(params, cfg.finetune.freeze, per_domain, new_rows, sparse_tables=rule != "dense")
    tx = build_optimizer(cfg.train, total_steps, labels, new_rows)
    shapes = jax.eval_shape(lambda p: init_state(p, tx, rule), params)
    shardings = state_shardings(mesh, shapes)
    sparse = None if rule == "dense" else (rule, sparse_update.learning_rate(cfg.train, total_steps))
    return Steps(
        graphdef=graphdef,
        per_domain=per_domain,
        embedding_update=rule,
        tx=tx,
        abstract_state=jax.tree.map(
            lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings
        ),
        train_step=make_train_step(graphdef, tx, cfg.model.reg_weight, mesh, shardings, sparse),
        predict=make_predict_step(graphdef, mesh, shardings.params),
    )


def compile_step(steps: Steps, batch: Any, text: sr_model.TextTable, what: str):
    """The train step compiled ahead for these batch shapes, after its memory per device is logged and
    checked (`memory.check`: a step that cannot fit fails here, before anything is allocated).
    -> (compiled step, memory estimate, compile seconds)"""
    start = time.perf_counter()
    compiled = steps.train_step.lower(steps.abstract_state, batch, text).compile()
    seconds = time.perf_counter() - start
    estimate = memory.estimate(steps.abstract_state, (batch, text), compiled)
    log.info("train step compiled in %.1f s; memory per device:\n%s", seconds, estimate.table())
    memory.check(estimate, what)
    return compiled, estimate, seconds


def fresh_state(cfg: Config, meta: DatasetMeta, text_dim: int, steps: Steps) -> TrainState:
    """Fresh parameters (train.seed) and optimizer state, made by one compiled function in their shardings."""
    out_shardings = jax.tree.map(lambda a: a.sharding, steps.abstract_state)

    def make():
        params = sr_model.init_params(cfg.model, meta, text_dim, cfg.train.seed)
        return init_state(params, steps.tx, steps.embedding_update)

    return jax.jit(make, out_shardings=out_shardings)()


@dataclasses.dataclass
class Run:
    """The pieces of one training run (everything but the changing train state)."""

    config: Config
    workdir: Path
    dataset: Dataset
    mesh: Mesh
    text: sr_model.TextTable
    train_columns: dict[str, np.ndarray]  # the train split, or the configured fraction of it
    pretrained: dict | None  # the pretrained run's run_info.json (fine-tuning), else None
    domain_map: finetune.DomainMap | None  # fine-tune domain -> pretrained row (None: new domain)
    steps: Steps  # model, optimizer, train and predict steps
    total_steps: int
    steps_per_epoch: int
    checkpointer: Checkpointer
    _compiled: Callable | None = dataclasses.field(default=None, init=False, repr=False)

    def put(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """This process's rows of a batch -> the global batch on the mesh."""
        return shd.to_global(batch, shd.batch_sharding(self.mesh))

    def rows(self, batch_size: int) -> slice:
        """The rows of every global batch of this size that this process reads."""
        return shd.process_rows(shd.batch_sharding(self.mesh), batch_size)

    def compiled_train_step(self) -> Callable:
        """The train step compiled ahead for this run's shapes (once), after its memory per device is logged
        and checked: a run that cannot fit fails here, before anything is allocated."""
        if self._compiled is not None:
            return self._compiled
        cfg = self.config
        batch = {
            name: jax.ShapeDtypeStruct(
                (cfg.data.batch_size, *col.shape[1:]), col.dtype, sharding=shd.batch_sharding(self.mesh)
            )
            for name, col in self.train_columns.items()
        }
        what = f"training with data.batch_size={cfg.data.batch_size} on mesh {dict(self.mesh.shape)}"
        compiled, _, _ = compile_step(self.steps, batch, self.text, what)
        self._compiled = compiled
        return compiled


def select_domains(dataset: Dataset, split: str, names: tuple[str, ...]) -> dict[str, np.ndarray]:
    """The split's rows of the named domains (all rows when `names` is empty)."""
    columns = dataset.split(split)
    if not names:
        return columns
    known = [d.name for d in dataset.meta.domains]
    if unknown := [n for n in names if n not in known]:
        raise ValueError(f"data.domains: unknown domain(s) {unknown}; the dataset has {known}")
    keep = np.isin(columns["domain"], [known.index(n) for n in names])
    if not keep.any():
        raise ValueError(f"data.domains={list(names)}: no examples in split {split!r}")
    return {name: np.asarray(col[keep]) for name, col in columns.items()}


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


def build_run(cfg: Config, workdir: str | Path, mesh: Mesh | None = None) -> Run:
    workdir = Path(workdir)
    dataset = load_dataset(cfg.data)
    mesh = mesh or shd.make_mesh(cfg.mesh)
    data_axis = mesh.shape["data"]
    for name, size in (("data.batch_size", cfg.data.batch_size), ("data.eval_batch_size", cfg.data.eval_batch_size)):
        if size % data_axis:
            raise ValueError(f"{name}={size} is not divisible by the mesh's data axis ({data_axis} devices)")
    text_id = text_identity(cfg.data.text_encoder)
    pooled, first = dataset.text_cache(text_id[0])
    text = jax.device_put(sr_model.TextTable(jnp.asarray(pooled), jnp.asarray(first)), shd.replicated(mesh))
    columns = train_subset(
        select_domains(dataset, cfg.data.train_split, cfg.data.domains), cfg.data.train_fraction, cfg.train.seed
    )
    if len(columns["label"]) < cfg.data.batch_size:
        raise ValueError(
            f"data.batch_size={cfg.data.batch_size} is larger than the {len(columns['label'])} training examples "
            f"(split {cfg.data.train_split!r}, fraction {cfg.data.train_fraction}): lower the batch size"
        )
    steps_per_epoch = len(columns["label"]) // cfg.data.batch_size
    total_steps = max(1, cfg.train.min_steps, int(cfg.train.epochs * steps_per_epoch))
    pretrained = mapping = None
    if cfg.finetune.pretrained:
        pretrained = finetune.pretrained_info(workdir, cfg.finetune.pretrained)
        if cfg.model.use_text:
            finetune.check_text_encoder(pretrained, text_id, cfg.finetune.pretrained)
        mapping = finetune.domain_map(dataset, pretrained)
    steps = build_steps(cfg, dataset.meta, pooled.shape[1], mesh, total_steps, mapping.new_rows if mapping else ())
    return Run(
        config=cfg,
        workdir=workdir,
        dataset=dataset,
        mesh=mesh,
        text=text,
        train_columns=columns,
        pretrained=pretrained,
        domain_map=mapping,
        steps=steps,
        total_steps=total_steps,
        steps_per_epoch=steps_per_epoch,
        checkpointer=Checkpointer(workdir / "checkpoints", cfg.train.keep_checkpoints, cfg.train.checkpoint_every),
    )


def initial_state(run: Run) -> TrainState:
    """Step 0: fresh parameters, or the pretrained run's (with fresh rows for new domains), and a fresh
    optimizer state, made by one compiled function straight into their shardings."""
    cfg, meta, text_dim = run.config, run.dataset.meta, run.text.pooled.shape[1]
    if run.domain_map is None:
        return fresh_state(cfg, meta, text_dim, run.steps)
    pretrained = finetune.restore_pretrained(
        cfg.finetune.pretrained,
        cfg.finetune.pretrained_step,
        run.steps.abstract_state.params,
        run.steps.per_domain,
        len(run.pretrained["domains"]),
    )
    log.info(
        "restored %s; new domains (fresh rows): %s",
        cfg.finetune.pretrained,
        [run.dataset.meta.domains[k].name for k in run.domain_map.new_rows] or "none",
    )

    def make(pre) -> TrainState:
        fresh = sr_model.init_params(cfg.model, meta, text_dim, cfg.train.seed)
        params = finetune.merge_pretrained(pre, fresh, run.steps.per_domain, run.domain_map)
        return init_state(params, run.steps.tx, run.steps.embedding_update)

    out_shardings = jax.tree.map(lambda a: a.sharding, run.steps.abstract_state)
    return jax.jit(make, out_shardings=out_shardings)(pretrained)


def restore_or_init(run: Run) -> TrainState:
    if run.checkpointer.latest_step() is None:
        return initial_state(run)
    state, position = run.checkpointer.restore(run.steps.abstract_state)
    log.info("resumed from step %d (epoch %d, batch %d)", int(state.step), position["epoch"], position["batch"])
    return state


def position(run: Run, step: int) -> dict:
    epoch, batch = divmod(step, run.steps_per_epoch)
    return {"step": step, "epoch": epoch, "batch": batch, "seed": run.config.train.seed}


def train(run: Run, state: TrainState, until: int | None = None) -> TrainState:
    """Trains from the state's step to `until` (default: the end), checkpointing and logging on the way."""
    cfg = run.config
    start, stop = int(state.step), min(until or run.total_steps, run.total_steps)
    batches = prefetch_to_device(
        BatchIterator(
            run.train_columns, cfg.data.batch_size, cfg.train.seed, start_step=start, rows=run.rows(cfg.data.batch_size)
        ),
        run.put,
        cfg.data.prefetch,
    )
    desc, primary = "finetune" if cfg.finetune.pretrained else "train", distributed.is_primary()
    step_fn = run.compiled_train_step()
    window_start, window_steps = time.perf_counter(), 0
    with (
        open(run.workdir / "metrics.jsonl" if primary else os.devnull, "a") as metrics_file,
        tqdm(total=stop, initial=start, desc=desc, unit="step", dynamic_ncols=True, disable=not primary) as bar,
    ):
        for step, batch in zip(range(start, stop), batches):
            state, metrics = step_fn(state, batch, run.text)
            window_steps += 1
            done = step + 1
            if done % cfg.train.log_every == 0 or done == stop:
                metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
                elapsed = time.perf_counter() - window_start
                metrics.update(
                    step=done,
                    epoch=done / run.steps_per_epoch,
                    examples_per_s=window_steps * cfg.data.batch_size / elapsed,
                )
                metrics_file.write(json.dumps(metrics) + "\n")
                metrics_file.flush()
                bar.set_postfix(loss=f"{metrics['loss']:.4f}", ex_s=f"{metrics['examples_per_s']:,.0f}")
                window_start, window_steps = time.perf_counter(), 0
            run.checkpointer.save(done, state, position(run, done), force=done == run.total_steps)
            bar.update(1)
    run.checkpointer.wait()
    return state


def evaluate(run: Run, params, split: str | None = None) -> dict:
    cfg = run.config
    split = split or cfg.data.eval_split
    columns = select_domains(run.dataset, split, cfg.data.domains)
    rows = run.rows(cfg.data.eval_batch_size)

    def put(batch):  # every process reads the whole eval batch and brings its rows
        return run.put({name: col[rows] for name, col in batch.items()})

    probs = evaluation.predict_split(run.steps.predict, params, columns, cfg.data.eval_batch_size, put, run.text)
    return evaluation.compute_metrics(run.dataset, split, cfg.data.train_split, probs, columns)


def fit(cfg: Config, workdir: str | Path) -> dict:
    """A whole run, pretraining or fine-tuning: resume or start, train, evaluate, write the reports."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    if distributed.is_primary():
        save_config(cfg, workdir / "config.json")
    run = build_run(cfg, workdir)
    if distributed.is_primary():
        text_id = text_identity(cfg.data.text_encoder)
        finetune.write_run_info(workdir, run.dataset, run.train_columns["domain"], text_id, run.pretrained)
    log.info(
        "dataset %s: training on %d examples of split %r; %d steps (%d per epoch) on mesh %s; frozen levels: %s",
        run.dataset.meta.name,
        len(run.train_columns["label"]),
        cfg.data.train_split,
        run.total_steps,
        run.steps_per_epoch,
        dict(run.mesh.shape),
        list(cfg.finetune.freeze) or "none",
    )
    run.compiled_train_step()  # the memory check, before the state is allocated
    state = train(run, restore_or_init(run))
    result = evaluate(run, state.params)
    if distributed.is_primary():
        evaluation.write_report(workdir, result)
    run.checkpointer.close()
    return result
