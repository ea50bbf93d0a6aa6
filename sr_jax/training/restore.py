"""Where a run's train state comes from: fresh parameters, its pretrained run's, or its own newest checkpoint
that restores; and the parameters evaluation reads (a checkpoint's, or the run's result)."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from sr_jax import distributed
from sr_jax import model as sr_model
from sr_jax.io import atomic_file
from sr_jax.config import Config
from sr_jax.data.schema import DatasetMeta
from sr_jax.model import rows
from sr_jax.training import records, sparse_update
from sr_jax.training.checkpoint import BestCheckpoint, CheckpointError, ParamsReader
from sr_jax.training.loop import Run, validation_metrics
from sr_jax.training.program import Program
from sr_jax.training.spec import RunSpec
from sr_jax.training.steps import TrainState, init_state
from sr_jax.training.transfer import DomainMap, init_new_rows, merge_pretrained, restore_pretrained

log = logging.getLogger("sr_jax")


def fresh_state(cfg: Config, meta: DatasetMeta, text_dim: int, program: Program) -> TrainState:
    """Fresh parameters (train.seed) and optimizer state, made by one compiled function in their shardings."""

    def make():
        params = sr_model.init_params(cfg.model, meta, text_dim, cfg.train.seed)
        return init_state(params, program.roles, program.tx, program.embedding_update)

    return jax.jit(make, out_shardings=program.state_shardings)()


def initial_state(spec: RunSpec) -> TrainState:
    """Step 0: fresh parameters, or the pretrained run's (with fresh rows for new domains), and a fresh
    optimizer state, made by one compiled function straight into their shardings."""
    cfg, meta, program, start = spec.config, spec.model_meta, spec.program, spec.start
    text_dim = spec.text.pooled.shape[1]
    if start is None:
        return fresh_state(cfg, meta, text_dim, program)
    pretrained = restore_pretrained(
        cfg.finetune.pretrained,
        cfg.finetune.pretrained_step,
        program.abstract_state.params,
        program.per_domain,
        len(start.run_info["domains"]),
        start.new_leaves,
    )
    counts = {t: int(m.sum()) for t, m in start.new_rows.mask.items() if m.any()}
    log.info(
        "restored %s; new domains: %s; new keys per table: %s; rows never trained (start from %s, "
        "trainable whatever is frozen): %s; new fields: %s",
        cfg.finetune.pretrained,
        [spec.dataset.meta.domains[k].name for k in start.domain_map.new_domains] or "none",
        {t: n for t, n in spec.row_map.new_keys().items() if n} or "none",
        cfg.finetune.new_rows_init,
        {"/".join(k): n for k, n in counts.items()} or "none",
        list(spec.row_map.new_fields) or "none",
    )

    before, after = records.row_layout(start.run_info), rows.layout(cfg.model)

    def make(pre, mapping: DomainMap) -> TrainState:
        fresh = sr_model.init_params(cfg.model, meta, text_dim, cfg.train.seed)
        # tables merge and take their new rows in row order (the pretrained rows first), then are stored
        pre = sparse_update.map_tables(pre, lambda t: rows.row_order(t, *before))
        params = merge_pretrained(pre, fresh, program.per_domain, mapping)
        params = init_new_rows(params, start.new_rows, cfg.finetune.new_rows_init)
        params = sparse_update.map_tables(params, lambda t: rows.stored(t, *after))
        return init_state(params, program.roles, program.tx, program.embedding_update, program.trainable_rows)

    def state(mapping: DomainMap) -> TrainState:
        return jax.jit(lambda pre: make(pre, mapping), out_shardings=program.state_shardings)(pretrained)

    mapping, record = choose_sources(spec, lambda m: state(m).params)
    if record:
        log.info("new domains start from: %s", json.dumps(record))
        if distributed.is_primary():
            with atomic_file(spec.workdir / NEW_DOMAINS) as tmp:
                tmp.write_text(json.dumps(record, indent=2) + "\n")
    return state(mapping)


NEW_DOMAINS = "new_domains.json"  # a fine-tune's record of where each new domain's rows started


def choose_sources(spec: RunSpec, params_of: Callable[[DomainMap], Any]) -> tuple[DomainMap, dict]:
    """The start of every new domain (`pretrained.domain_map`), with the source of each that has several
    candidates (its task's pretrained domains, none named) chosen by the AUC of its validation rows when its
    rows start from each (one evaluation of the validation data per candidate); -> (the map, per new domain
    name: {"init", "from": [pretrained names], "chosen_by", "scores"})."""
    start, cfg = spec.start, spec.config
    names, pretrained = [d.name for d in spec.dataset.meta.domains], start.run_info["domains"]
    mapping, how = start.domain_map, {}
    choosing = {k: c for k, c in start.candidates.items() if spec.valid_columns is not None}
    scores = {k: {} for k in choosing}
    for r in range(max((len(c) for c in choosing.values()), default=0)):
        trial = mapping
        for k, candidates in choosing.items():
            trial = trial.starting(k, (candidates[r % len(candidates)],))
        result = validation_metrics(spec, params_of(trial), 0)
        for k, candidates in choosing.items():
            auc = result["domains"].get(names[k], {}).get("auc")
            scores[k][candidates[r % len(candidates)]] = auc if auc is not None and np.isfinite(auc) else -np.inf
    for k, by in scores.items():
        if max(by.values()) > -np.inf:
            mapping = mapping.starting(k, (max(by, key=by.get),))
    named = {pair.split("=", 1)[0].strip() for pair in cfg.finetune.domain_source}
    for k in mapping.new_domains:
        rows = mapping.start[k] if mapping.start else ()
        init = cfg.finetune.new_domain_init if rows else "fresh"
        if k in scores and max(scores[k].values()) > -np.inf:
            chosen_by = "validation AUC of the new domain's rows"
        elif init in ("source", "match"):
            chosen_by = (
                "named (finetune.domain_source)" if names[k] in named
                else "the most pretraining examples of its task" if k in start.candidates
                else "the only pretrained domain of its task"
            )  # fmt: skip
        else:
            chosen_by = {"mean": "the mean of its task's pretrained domains", "fresh": "a fresh init"}[init]
        how[names[k]] = {
            "init": init,
            "from": [pretrained[r] for r in rows],
            "chosen_by": chosen_by,
            # a source whose validation rows have no AUC (one label only): null
            **(
                {"scores": {pretrained[r]: s if s > -np.inf else None for r, s in scores[k].items()}}
                if k in scores
                else {}
            ),
        }
    return mapping, how


def restore_or_init(run: Run) -> TrainState:
    """The newest checkpoint that restores (a broken newer one is skipped, and said so), or step 0 when the
    run has none. A restored run takes back its validation record."""
    if run.checkpointer.latest_step() is None:
        return initial_state(run.spec)
    state, position, skipped = run.checkpointer.restore_newest(run.spec.program.abstract_state)
    for problem in skipped:
        log.warning("skipped a checkpoint that does not restore: %s", problem)
    if position["step"] != int(state.step):
        raise CheckpointError(
            f"{run.checkpointer.directory / str(int(state.step))}: the saved data position is step "
            f"{position['step']}, the train state's is {int(state.step)}"
        )
    if (position["epoch"], position["batch"]) != divmod(position["step"], run.spec.steps_per_epoch):
        log.warning(  # --allow-changes with another batch size or data: the position follows the step
            "the saved data position (epoch %d, batch %d) was made with other batches; resuming at step %d of this "
            "run's (%d steps per epoch)",
            position["epoch"],
            position["batch"],
            position["step"],
            run.spec.steps_per_epoch,
        )
    log.info("resumed from step %d (epoch %d, batch %d)", int(state.step), position["epoch"], position["batch"])
    run.validation = [list(v) for v in position.get("validation", [])]
    run.start_scores = dict(position.get("start_scores", {}))
    run.zero_shot = position.get("zero_shot")
    return state


def checkpoint_params(spec: RunSpec, step: int = -1) -> Any:
    """The parameters of one of the run's own checkpoints (the latest by default), without its optimizer
    state: what evaluation needs. A run with no checkpoint is an error, never a fresh model."""
    with ParamsReader(spec.workdir / "checkpoints") as reader:
        return reader.restore(reader.step(step), spec.program.abstract_state.params)


def result_params(spec: RunSpec) -> Any:
    """The run's result: its best validated parameters when it validated (what its eval.json reports), else its
    latest checkpoint's."""
    if spec.valid_source:
        with BestCheckpoint(spec.workdir / "best") as best:
            if best.best() is not None:
                return best.restore(spec.program.abstract_state.params)
    return checkpoint_params(spec)
