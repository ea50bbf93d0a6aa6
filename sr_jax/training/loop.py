"""What running is: the train loop over a `RunSpec`, with its stop signals, finiteness checks, validation and
early stopping, and the `Run` that holds what running changes (checkpoints, the best validated step, the
validation record, the compiled step)."""

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

import jax
import numpy as np
from tqdm import tqdm

from sr_jax import distributed
from sr_jax.config import profile_window
from sr_jax.data.pipeline import BatchIterator, MixedBatches, prefetch_to_device
from sr_jax.training import evaluation
from sr_jax.training.checkpoint import BestCheckpoint, Checkpointer
from sr_jax.training.handover import trained_so_far
from sr_jax.training.metrics_log import MetricsLog
from sr_jax.training.program import compile_train_step
from sr_jax.training.spec import RunSpec
from sr_jax.training.steps import TrainState
from sr_jax.training.zero_shot import blend, zero_shot_params, zero_shot_rows

log = logging.getLogger("sr_jax")


class TrainingDiverged(FloatingPointError):
    """The loss or the gradient norm became NaN or inf: training stops before anything is saved from it."""


class TrainingInterrupted(RuntimeError):
    """A stop was asked for (SIGTERM, SIGINT): the run finished its step, saved it and stopped."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


@dataclasses.dataclass
class Run:
    """A run in progress: its spec, and what running changes."""

    spec: RunSpec
    checkpointer: Checkpointer
    best: BestCheckpoint | None = None  # the best validated parameters (train.eval_every)
    validation: list = dataclasses.field(default_factory=list)  # [step, score] of every validation so far
    start_scores: dict = dataclasses.field(default_factory=dict)  # a fine-tune's step-0 candidates' scores
    zero_shot: dict | None = None  # the zero-shot model's rows every validated candidate is blended with
    # Called with (step, score) after every validation; True stops the run there (a tuner's pruner).
    on_validation: Callable[[int, float], bool] | None = None
    compile_seconds: float = 0.0  # the train step's ahead-of-time compilation (0 until compiled)
    compiled: Callable | None = None  # the train step compiled for this run's shapes (`compiled_train_step`)

    def compiled_train_step(self) -> Callable:
        """The train step compiled ahead for this run's shapes (once), after its memory per device is logged
        and checked: a run that cannot fit fails here, before anything is allocated."""
        if self.compiled is None:
            spec = self.spec
            what = f"training with a batch of {spec.batch_size} on mesh {dict(spec.mesh.shape)}"
            self.compiled, _, self.compile_seconds = compile_train_step(
                spec.program, spec.batch_shapes(), spec.text, spec.reference, what
            )
        return self.compiled

    def close(self) -> None:
        self.checkpointer.close()
        if self.best is not None:
            self.best.close()


def open_run(spec: RunSpec) -> Run:
    """A run of `spec`, with its checkpoint folders opened (`checkpoints/`, and `best/` when it validates)."""
    cfg = spec.config
    return Run(
        spec=spec,
        checkpointer=Checkpointer(spec.workdir / "checkpoints", cfg.train.keep_checkpoints, cfg.train.checkpoint_every),
        best=BestCheckpoint(spec.workdir / "best") if spec.valid_source else None,
    )


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


class Profile:
    """`train.profile_steps=A:B`: a jax.profiler trace from after step A to after step B, in `folder`."""

    def __init__(self, folder: Path, steps: str, write: bool):
        self.folder, self.window, self.on = folder, profile_window(steps), False
        self.write = write and self.window != (0, 0)

    def before(self, step: int) -> None:
        if self.write and step == self.window[0] and not self.on:
            jax.profiler.start_trace(str(self.folder))
            self.on = True
            log.info("profiling steps %d to %d into %s", step + 1, self.window[1], self.folder)

    def after(self, done: int, state) -> None:
        if self.on and done == self.window[1]:
            jax.block_until_ready(state)  # the traced steps' work, not only their dispatch
            self.close()

    def close(self) -> None:
        if self.on:
            jax.profiler.stop_trace()
            self.on = False


def position(run: Run, step: int) -> dict:
    """Where the data stand after `step`, and the validation scores so far (what early stopping decides on)."""
    epoch, batch = divmod(step, run.spec.steps_per_epoch)
    seed = run.spec.config.train.seed
    starts = {"start_scores": run.start_scores} if run.start_scores else {}  # a fine-tune's step-0 candidates
    if run.zero_shot is not None:
        starts["zero_shot"] = run.zero_shot
    return {"step": step, "epoch": epoch, "batch": batch, "seed": seed, "validation": run.validation, **starts}


def stops_early(history: list, patience: int, min_delta: float) -> bool:
    """Whether the last `patience` validations (of [step, score] pairs) brought no gain of more than `min_delta`
    over the best score before them."""
    if not patience:
        return False
    best, since = -np.inf, 0
    for _, score in history:
        best, since = (score, 0) if score > best + min_delta else (best, since + 1)
    return since >= patience


def validation_metrics(spec: RunSpec, params, step: int) -> dict:
    """`params`' metrics on the validation data, as the model stands after `step` (which rows it has trained)."""
    missing = spec.config.model.untrained_ids == "missing"  # then the rows read so far are known, the others missing
    trained = trained_so_far(spec, step) if missing else spec.trained_rows
    logits = evaluation.predict_scores(spec, params, spec.valid_columns, trained)["logit"]
    return evaluation.compute_metrics(spec.dataset, "validation", logits, spec.valid_columns, warm=None)


def validation_score(run: Run, params, step: int) -> float:
    """`params`' score on the validation data (train.early_stopping_metric), as the model stands after `step`."""
    result = validation_metrics(run.spec, params, step)
    per_domain = run.spec.config.train.early_stopping_metric == "mean_domain_auc"
    return result["mean_domain_auc"] if per_domain else result["overall"]["auc"]


def validate_step(run: Run, params, step: int) -> float:
    """Scores `params` on the validation data, blended with the zero-shot model where the run has one
    (`zero_shot.blend`: what it validates is what it keeps), and offers them to the best checkpoint."""
    params = blend(run.spec, params, run.zero_shot)
    return _offer(run, params, step, validation_score(run, params, step))


def _offer(run: Run, params, step: int, score: float) -> float:
    """Offers validated `params` to the best checkpoint and records the score."""
    run.best.save(step, params, score)
    run.validation = [*[v for v in run.validation if v[0] < step], [step, score]]
    return score


ZERO_SHOT_START = "the zero-shot model"  # step 0's other candidate: new domains scored by their source's match
PRETRAINED_START = "the pretrained start"


def validate_start(run: Run, params) -> None:
    """A fine-tune's step 0: its start is a candidate result (with few labels, training may not beat it), and
    so, where it has new domains that start from a source's tower, is the zero-shot model (those towers' output
    layer at zero: each new domain scored by its source's content match, what `--strategy zero-shot` reports).
    The better on the validation data is offered as step 0 (run.start_scores records both); training goes on
    from `params`. The zero-shot model's rows of the blend (`finetune.zero_shot_weight`) are read off here."""
    run.zero_shot = zero_shot_rows(run.spec, params)
    candidates = {PRETRAINED_START: params}
    if (zero := zero_shot_params(run.spec, params)) is not None:
        candidates[ZERO_SHOT_START] = zero
    candidates = {name: blend(run.spec, p, run.zero_shot) for name, p in candidates.items()}
    run.start_scores = {name: validation_score(run, p, 0) for name, p in candidates.items()}
    kept = max(run.start_scores, key=run.start_scores.get)
    _offer(run, candidates[kept], 0, run.start_scores[kept])
    log.info("validation at step 0: %s; %s kept as step 0's candidate", _scores(run.start_scores), kept)


def _scores(scores: dict[str, float]) -> str:
    return ", ".join(f"{name} {score:.4f}" for name, score in scores.items())


def batches(spec: RunSpec, start: int):
    """The run's global batches from step `start` on, this process's rows of each (with the replayed
    pretraining rows after the cold ones when fine-tuning replays)."""
    seed, size, window = spec.config.train.seed, spec.batch_size, spec.config.data.shuffle_window
    replay = spec.start.replay if spec.start else None
    if replay is None:
        return BatchIterator(
            spec.train_columns, size, seed, start_step=start, process_slice=spec.process_slice(size), window=window
        )
    main = BatchIterator(spec.train_columns, size - spec.replay_size, seed, start_step=start, window=window)
    replayed = BatchIterator(replay, spec.replay_size, seed + 1, start_step=start, window=window)
    return MixedBatches(main, replayed, spec.process_slice(size))


def train(run: Run, state: TrainState, until: int | None = None) -> TrainState:
    """Trains from the state's step to `until` (default: the end), checkpointing and logging on the way. The
    loss and gradient norm are checked at every log and every checkpoint: a NaN or inf stops the run with
    `TrainingDiverged` before that state is saved (the update that made NaN parameters had a NaN gradient).
    A SIGTERM or SIGINT finishes the step, saves it and raises `TrainingInterrupted`."""
    spec = run.spec
    cfg = spec.config
    start, stop = int(state.step), min(spec.total_steps if until is None else until, spec.total_steps)
    patience, min_delta = cfg.train.early_stopping_patience, cfg.train.early_stopping_min_delta
    if spec.total_steps == 0:  # train.max_steps=0: the start is the result, saved as step 0
        if run.checkpointer.latest_step() is None:
            run.checkpointer.save(0, state, position(run, 0), force=True)
        run.checkpointer.wait()
        return state
    if start >= cfg.train.min_steps and stops_early(run.validation, patience, min_delta):
        return state  # a resumed run that had stopped early: done
    if start == 0 and run.best is not None and cfg.finetune.pretrained and not run.validation:
        validate_start(run, state.params)
    feed = prefetch_to_device(batches(spec, start), spec.global_batch, cfg.data.prefetch)
    desc, primary = "finetune" if cfg.finetune.pretrained else "train", distributed.is_primary()
    step_fn = run.compiled_train_step()
    window_start, window_steps = time.perf_counter(), 0
    with (
        contextlib.closing(feed),
        stop_requests() as received,
        contextlib.closing(MetricsLog(spec.workdir, start, write=primary)) as metrics_log,
        tqdm(total=stop, initial=start, desc=desc, unit="step", dynamic_ncols=True, disable=not primary) as bar,
        contextlib.closing(Profile(spec.workdir / "profile", cfg.train.profile_steps, primary)) as profile,
    ):
        dropped = None  # the routed lookups' drops since the last log, summed on the device (no sync per step)
        for step, batch in zip(range(start, stop), feed):
            profile.before(step)
            state, metrics = step_fn(state, batch, spec.text, spec.reference)
            if "lookup_dropped" in metrics:
                dropped = metrics["lookup_dropped"] if dropped is None else dropped + metrics["lookup_dropped"]
            profile.after(step + 1, state)
            window_steps += 1
            done = step + 1
            logged = done % cfg.train.log_every == 0 or done == stop
            validating = run.best is not None and (done % spec.eval_interval == 0 or done == stop)
            stopping = _stop_agreed(received, logged or run.checkpointer.due(done))
            if logged or stopping or validating or run.checkpointer.due(done):
                # a state is validated or saved only after its loss and gradient norm are checked
                metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
                check_finite(run, metrics, done)
            if logged:
                if dropped is not None:  # every step's drops, not the logged step's alone
                    metrics["lookup_dropped"], dropped = float(dropped), None
                elapsed = time.perf_counter() - window_start
                rate = window_steps * spec.batch_size / elapsed
                metrics.update(epoch=done / spec.steps_per_epoch, examples_per_s=rate)
                metrics_log.write(done, metrics)
                bar.set_postfix(loss=f"{metrics['loss']:.4f}", ex_s=f"{metrics['examples_per_s']:,.0f}")
                window_start, window_steps = time.perf_counter(), 0
            early = pruned = False
            if validating:
                score = validate_step(run, state.params, done)
                metrics_log.write(done, {f"valid_{cfg.train.early_stopping_metric}": score})
                early = done >= cfg.train.min_steps and stops_early(run.validation, patience, min_delta)
                pruned = run.on_validation is not None and bool(run.on_validation(done, score))
            final = done == spec.total_steps or early or pruned
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
                _interrupted(run, received, done)
        run.checkpointer.wait()
        if _stop_agreed(received, at_sync_point=True):  # asked for during the last step or its save: stop here
            _interrupted(run, received, int(state.step))
    return state


def _interrupted(run: Run, received: list[int], step: int) -> None:
    run.checkpointer.wait()
    signum = received[0] if received else signal.SIGTERM
    raise TrainingInterrupted(
        f"{run.spec.workdir}: stopped by {signal.Signals(signum).name} after step {step}, which is saved; "
        "run the same command to resume",
        signum,
    )


def check_finite(run: Run, metrics: dict, step: int) -> None:
    """Stops a run whose loss or gradient norm is NaN or inf, before that state is saved or evaluated."""
    bad = {k: metrics[k] for k in ("loss", "grad_norm") if not np.isfinite(metrics[k])}
    if bad:
        run.checkpointer.wait()
        kept = run.checkpointer.latest_step()
        raise TrainingDiverged(
            f"{run.spec.workdir}: {', '.join(f'{k}={v}' for k, v in bad.items())} at step {step}; nothing from "
            f"this state was saved, the last checkpoint is step {kept}. Lower train.learning_rate, or check the "
            "data and the restored parameters."
        )
