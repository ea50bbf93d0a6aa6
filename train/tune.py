"""An equal tuning budget: `python -m train.tune --workdir DIR [--models ..] [--datasets ..] [--trials N]
[--configs-dir configs/tuned] [overrides for every trial]`.

For every dataset and model of configs/experiment.py (default: its TUNED models), `--trials` Optuna trials
(TPE sampler, median pruner on the validation curve) over SEARCH_SPACE (and REG_SPACE for the models with
the JS regularizer), chosen on the validation split only (sr_jax/experiments/tuning.py). Killed, it resumes
where it stopped. The choice of each is written as a named config, CONFIGS_DIR/DATASET/MODEL.json, so that

    python -m train.pretrain --config tuned/movielens/full --workdir RUN

reruns it, and `python -m train.experiment --tuned` runs the grid at the tuned settings; the trials of every
study are listed in WORKDIR/TUNING.md and WORKDIR/tuning.json.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

from configs.experiment import DATASETS, MODELS, TUNED, TUNED_DIR, space_for
from sr_jax.config import Config, override
from sr_jax.experiments import results, tuning
from train import cli
from train.experiment import add_dataset_options, sources


def parser() -> argparse.ArgumentParser:
    """The command line (without parsing it): `cli.parse(parser(), argv)`."""
    p = cli.parser(__doc__, named_configs=False)
    p.add_argument("--models", nargs="+", default=list(TUNED), choices=list(MODELS), metavar="MODEL")
    p.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    p.add_argument("--trials", type=int, default=12, help="finished trials per dataset and model")
    p.add_argument("--seed", type=int, default=0, help="the sampler's seed (trials train with train.seed's)")
    p.add_argument("--configs-dir", type=Path, default=TUNED_DIR, help="where the named configs are written")
    add_dataset_options(p)
    return p


def main(argv: list[str] | None = None) -> dict:
    args = cli.parse(parser(), argv)
    cli.setup()
    command = "python -m train.tune " + shlex.join(sys.argv[1:] if argv is None else argv)
    encoder = override(Config(), args.overrides).data.text_encoder
    summary = {}
    for dataset in args.datasets:
        path = results.dataset_path(dataset, Path(args.data_dir), sources(args), encoder)
        for model in args.models:
            base = [*DATASETS[dataset], *MODELS[model], f"data.path={path}", *args.overrides]
            space = space_for(override(Config(), base))
            started = time.perf_counter()
            chosen = tuning.tune(Path(args.workdir) / dataset / model, base, space, args.trials, args.seed)
            chosen["seconds"] = time.perf_counter() - started  # this invocation's part (a resumed study: less)
            named = [*base, *chosen["settings"]]
            named_config = args.configs_dir / dataset / f"{model}.json"
            tuning.write_named_config(named_config, dataset, model, named, chosen, command)
            summary[f"{dataset}/{model}"] = chosen
    _write_summary(Path(args.workdir), summary, command)
    return summary


def _write_summary(workdir: Path, summary: dict, command: str) -> None:
    (workdir / "tuning.json").write_text(json.dumps(summary, indent=2) + "\n")
    lines = ["# Tuning: the same budget for every model, chosen on validation", "", "```bash", command, "```", ""]
    lines += ["| dataset / model | trials (pruned) | best validation AUC | chosen settings | wall s |"]
    lines += ["|---|---|---|---|---|"]
    for name, c in summary.items():
        settings, trials = " ".join(c["settings"]), f"{c['trials']} ({c['pruned']})"
        lines.append(f"| {name} | {trials} | {c['validation']:.4f} | `{settings}` | {c['seconds']:.0f} |")
    (workdir / "TUNING.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    cli.interruptible(main)
