"""An equal tuning budget: the same number of Optuna trials for every model, chosen on validation only.

A study per (dataset, model) lives in WORKDIR/DATASET/MODEL/study.db (SQLite): Optuna's TPE sampler proposes
settings from a declared search space, each trial is one `trainer.fit` run that validates every
`train.eval_every` steps, and a median pruner stops a trial whose validation curve falls below the median of
the earlier trials' at the same step. Trials evaluate on the validation split only (`data.eval_split` is set
to it), so tuning never computes a test figure. A trial's run folder is named by its settings, so a trial
left running by a killed tuner is queued again with the same settings and its run resumes from its last
checkpoint; finished trials are never run again.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import optuna

from sr_jax.config import Config, override, validate
from sr_jax.experiments.cells import run_once
from sr_jax.io import exclusive
from sr_jax.training import trainer

log = logging.getLogger("sr_jax")
FINISHED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)


def suggest(trial: optuna.Trial, space: dict) -> list[str]:
    """The trial's settings as overrides. space: key -> ("log", low, high) | ("choice", values)."""
    out = []
    for key, (kind, *args) in space.items():
        if kind == "log":
            value = trial.suggest_float(key, args[0], args[1], log=True)
            out.append(f"{key}={value:.3g}")
        elif kind == "choice":
            out.append(f"{key}={trial.suggest_categorical(key, list(args[0]))}")
        else:
            raise ValueError(f"search space {key}: unknown kind {kind!r} (expected log or choice)")
    return out


def folder_name(settings: list[str]) -> str:
    return hashlib.sha1("\n".join(settings).encode()).hexdigest()[:10]


def _requeue_interrupted(study: optuna.Study) -> None:
    """Trials a killed tuner left running: marked failed and queued again with the same settings (their run
    folders, named by the settings, resume from their last checkpoints)."""
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        log.info("trial %d was interrupted: queued again with its settings %s", t.number, t.params)
        study.tell(t.number, state=optuna.trial.TrialState.FAIL)
        study.enqueue_trial(t.params)


def tune(
    workdir: str | Path,
    base: list[str],
    space: dict,
    trials: int,
    seed: int = 0,
) -> dict:
    """Runs a study to `trials` finished (complete or pruned) trials and returns its choice: {"settings":
    overrides, "validation": best score, "trial": number, "trials": finished, "pruned": how many}.
    `base`: the overrides every trial shares (dataset, model and the caller's); `space`: what it tunes."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    cfg = validate(override(Config(), base))
    if not cfg.train.eval_every:
        raise ValueError("tuning chooses on validation: set train.eval_every (and a validation split)")
    eval_split = ["data.eval_split=" + (cfg.data.valid_split or cfg.data.train_split)]
    with exclusive(workdir):
        study = optuna.create_study(
            study_name="study",
            storage=f"sqlite:///{workdir / 'study.db'}",
            load_if_exists=True,
            direction="maximize",
            sampler=optuna.samplers.TPESampler(seed=seed, n_startup_trials=max(1, min(5, trials // 2))),
            pruner=optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=2 * cfg.train.eval_every),
        )
        _requeue_interrupted(study)

        def objective(trial: optuna.Trial) -> float:
            settings = suggest(trial, space)
            trial_cfg = validate(override(Config(), [*base, *settings, *eval_split]))
            folder = workdir / "trials" / folder_name(settings)
            trial.set_user_attr("settings", settings)
            trial.set_user_attr("folder", str(folder))
            pruned_at = []

            def report(step: int, score: float) -> bool:
                trial.report(score, step)
                if trial.should_prune():
                    pruned_at.append(step)
                    return True
                return False

            result, _ = run_once(folder, lambda c, w: trainer.fit(c, w, report), trial_cfg)
            score = result["validation"]["score"]
            trial.set_user_attr("score", score)
            if pruned_at:
                raise optuna.TrialPruned(f"validation {score:.4f} below the median at step {pruned_at[0]}")
            return score

        done = len(study.get_trials(deepcopy=False, states=FINISHED))
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        study.optimize(objective, n_trials=max(0, trials - done), catch=())
        return choice(study)


def choice(study: optuna.Study) -> dict:
    """The best finished trial by its best validation score: a pruned trial's best so far counts too (it is
    a validated score of a run that was trained), so a pruned trial can still be chosen."""
    finished = study.get_trials(deepcopy=False, states=FINISHED)
    best = max(finished, key=lambda t: t.user_attrs["score"])
    pruned = sum(t.state == optuna.trial.TrialState.PRUNED for t in finished)
    return {
        "settings": best.user_attrs["settings"],
        "validation": best.user_attrs["score"],
        "trial": best.number,
        "trials": len(finished),
        "pruned": pruned,
        "history": [
            {"trial": t.number, "state": t.state.name, "score": t.user_attrs.get("score"), **t.params} for t in finished
        ],
    }


def write_named_config(path: Path, dataset: str, model: str, overrides: list[str], chosen: dict, command: str):
    """configs/tuned/DATASET/MODEL.json: every override of the chosen run (dataset, model, tuned settings),
    so `--config tuned/DATASET/MODEL` reruns it; plus how it was chosen."""
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"dataset": dataset, "model": model, "overrides": overrides, "command": command, **chosen}
    path.write_text(json.dumps(record, indent=2) + "\n")
