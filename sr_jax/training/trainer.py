"""The orchestrator of a training run, pretraining and fine-tuning alike (`fit`): resume or start, train,
hand over, evaluate, report. The pieces it joins, one concern each:

    spec.py        what a run is (data, vocabulary, schedule, program; `pretrained.py`: its pretrained start)
    loop.py        what running is (the loop, stop signals, finiteness, validation, early stopping)
    restore.py     where the train state comes from (fresh, pretrained, a checkpoint)
    handover.py    what a finished run leaves for the runs started from it (`records.py`: the formats)
    evaluation.py  the metrics and the report

A run's folder holds `config.json` (the exact config), `run_info.json`, `vocab.json`, `trained_rows.npz`,
`item_text_map.npz` and `reference.npz` (what its parameters mean, for fine-tuning from it),
`checkpoints/` (orbax), `best/` (its best validated step), `metrics.jsonl` (one line per log interval),
`calibration.json` (the per-domain map of its logits, fitted on its validation data), `eval.json` / `eval.md`,
and `changes.jsonl` where it was resumed with a changed config (`--allow-changes`). A
folder holds one run: `build_run` refuses a folder that holds anything else. A run with `finetune.pretrained`
set starts from that run's parameters instead of a fresh init; `finetune.freeze` holds levels fixed.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from pathlib import Path

from jax.sharding import Mesh

from sr_jax import calibration, distributed
from sr_jax import sharding as shd
from sr_jax import io
from sr_jax.config import Config, absolute_paths, validate
from sr_jax.data import vocabulary
from sr_jax.model.rows import layout as row_layout
from sr_jax.text import text_identity
from sr_jax.training import evaluation, records
from sr_jax.training.handover import trained_so_far, write_handover
from sr_jax.training.loop import Run, open_run, train
from sr_jax.training.restore import restore_or_init
from sr_jax.training.spec import build_spec

log = logging.getLogger("sr_jax")


def build_run(cfg: Config, workdir: str | Path, mesh: Mesh | None = None) -> Run:
    """A run of `cfg` in `workdir`, ready to train: its spec built and its checkpoint folders opened. A folder
    holds one run: `workdir` must be missing, empty or a run's (`io.claim`), and is marked as a run."""
    primary = distributed.is_primary()
    if primary:
        io.claim(workdir, io.RUN, remedy="choose another --workdir (a folder holds one run)")
    spec = build_spec(cfg, workdir, mesh)
    if primary:
        io.mark(Path(workdir), io.RUN)
    return open_run(spec)


def fit(cfg: Config, workdir: str | Path, on_validation: Callable[[int, float], bool] | None = None) -> dict:
    """A whole run, pretraining or fine-tuning: resume or start, train, evaluate, write the reports. One writer
    per run folder: a second `fit` on the same folder fails at once (`io.FolderLocked`, naming the holder).
    The saved config names its folders by absolute path. `on_validation(step, score)`, called after every
    validation (train.eval_every), stops the run where it returns True (a tuner's pruner); the run then ends
    as an early-stopped one does, with its best validated step."""
    cfg = absolute_paths(validate(cfg))
    workdir = Path(workdir)
    lock = io.exclusive(workdir) if distributed.is_primary() else contextlib.nullcontext()
    with lock, io.writing(workdir):
        return _fit(cfg, workdir, on_validation)


def _describe(run: Run) -> None:
    spec, cfg = run.spec, run.spec.config
    log.info(
        "dataset %s: training on %d examples of split %r (domains %s); %d steps (%d per epoch) of batch %d%s "
        "on mesh %s; frozen levels: %s",
        spec.dataset.meta.name,
        len(spec.train_columns["label"]),
        cfg.data.train_split,
        list(spec.domains),
        spec.total_steps,
        spec.steps_per_epoch,
        spec.batch_size,
        f" ({spec.replay_size} replayed)" if spec.replay_size else "",
        dict(spec.mesh.shape),
        list(cfg.finetune.freeze) or "none",
    )
    if spec.valid_source:
        patience = cfg.train.early_stopping_patience
        log.info(
            "validating every %d steps on %s; %s",
            spec.eval_interval,
            spec.validation_data,
            f"stopping after {patience} validations without a gain (not before step {cfg.train.min_steps})"
            if patience
            else "never stopping early",
        )
    else:
        log.info("not validating (train.eval_every=0): the result is the last step")
    log.info("embedding tables:\n%s", shd.table_layout(spec.mesh, spec.program.abstract_state.params, spec.rules))


def _fit(cfg: Config, workdir: Path, on_validation: Callable[[int, float], bool] | None) -> dict:
    # The run is built, and so checked against its dataset, its pretrained run and the devices, before its
    # config is written: a config that cannot run never replaces the saved one (which resuming reads).
    run = build_run(cfg, workdir)
    run.on_validation = on_validation
    spec = run.spec
    cfg = spec.config  # as the run resolved it from its dataset (model.user_history)
    if distributed.is_primary():
        records.write_config(workdir, cfg)
        if cfg.finetune.pretrained:
            records.snapshot_pretrained(workdir, cfg.finetune.pretrained)
    distributed.barrier("run folder")
    if distributed.is_primary():
        vocabulary.write(workdir, spec.row_map.vocab)
        text_id = text_identity(cfg.data.text_encoder)
        pretrained_info = spec.start.run_info if spec.start else None
        records.write_run_info(
            workdir,
            spec.dataset,
            cfg.data.train_split,
            spec.train_columns["domain"],
            text_id,
            pretrained_info,
            row_layout(cfg.model),
        )
    _describe(run)
    run.compiled_train_step()  # the memory check, before the state is allocated
    started = time.perf_counter()
    state = train(run, restore_or_init(run))
    train_seconds = time.perf_counter() - started
    params, chosen, result_step = state.params, None, int(state.step)
    if run.best is not None and run.best.best() is not None:  # the validation-chosen step is the run's result
        params, (step, score) = run.best.restore(spec.program.abstract_state.params, own=True), run.best.best()
        chosen = {
            "step": step,
            "metric": cfg.train.early_stopping_metric,
            "score": score,
            "data": spec.validation_data,
            "every": spec.eval_interval,
            "history": run.validation,
        }
        if run.start_scores:  # a fine-tune's step-0 candidates (the pretrained start, the zero-shot model)
            chosen["start"] = run.start_scores
        if run.zero_shot is not None:  # every candidate blended with the zero-shot model
            names = [spec.dataset.meta.domains[k].name for k in run.zero_shot["domains"]]
            chosen["zero_shot_blend"] = {"weight": cfg.finetune.zero_shot_weight, "domains": names}
        result_step = step
    trained = trained_so_far(spec, result_step)  # what the result's parameters were trained on
    write_handover(spec, params, trained)
    started = time.perf_counter()
    fitted = evaluation.fit_calibration(spec, params, trained)
    if distributed.is_primary():
        if fitted is not None:
            calibration.write(workdir, fitted)
        else:  # an earlier attempt of this run's, calibrated before its config turned calibration off
            (workdir / calibration.FILE).unlink(missing_ok=True)
        log.info("calibration: %s", calibration.summary(fitted))
    scores_to = workdir if distributed.is_primary() else None
    result = evaluation.evaluate(spec, params, trained=trained, scores_to=scores_to, fitted=fitted)
    # where a run's time goes (this process; a resumed run counts its own part only)
    result["timing"] = {
        "compile_s": run.compile_seconds,
        "train_s": train_seconds,  # with its validations
        "evaluate_s": time.perf_counter() - started,
    }
    result["budget"] = spec.budget
    if chosen is not None:
        result["validation"] = chosen
        result["trained_steps"] = int(state.step)
    if distributed.is_primary():
        evaluation.write_report(workdir, result)
    run.close()
    return result
