"""The results table: `python -m train.experiment --workdir DIR --report-dir docs [--models ..] [--datasets ..]
[--seeds ..] [--tuned] [overrides for every run]`.

Runs every model of configs/experiment.py on every dataset and seed (resumable: finished cells are not
run again), converting the real datasets from ../shared/data on first use, and writes
REPORT_DIR/RESULTS.md (with configs/experiment.py's paired comparisons), REPORT_DIR/results/results.csv, a
bar chart and a chart of validation curves per dataset. `--tuned`: every model at the settings
`train.tune` chose for it (or for the model it ablates), read from configs/tuned/.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from configs.experiment import COMPARISONS, DATASETS, MODELS, SINGLE_DOMAIN, tuned
from sr_jax.experiments import results
from train import cli

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def add_dataset_options(p: argparse.ArgumentParser) -> None:
    """Where the grid's real datasets come from and are converted to (shared by train.tune)."""
    p.add_argument("--data-dir", default="data", help="where the real datasets are converted to")
    p.add_argument("--movielens-src", type=Path, default=SHARED / "movielens-latest-small")
    p.add_argument("--amazon-src", type=Path, default=SHARED / "amazon-scientific")


def sources(args: argparse.Namespace) -> dict[str, Path]:
    return {"movielens": args.movielens_src, "amazon": args.amazon_src}


def parser() -> argparse.ArgumentParser:
    """The command line (without parsing it): `cli.parse(parser(), argv)`."""
    p = cli.parser(__doc__, named_configs=False)
    p.add_argument("--report-dir", required=True)
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS), metavar="MODEL")
    p.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--tuned", action="store_true", help="run every model at its tuned settings (configs/tuned/)")
    add_dataset_options(p)
    return p


def main(argv: list[str] | None = None) -> list[dict]:
    args = cli.parse(parser(), argv)
    cli.setup()
    grid = results.Grid(
        models={m: MODELS[m] for m in args.models},
        datasets={d: DATASETS[d] for d in args.datasets},
        seeds=tuple(args.seeds),
        single_domain=SINGLE_DOMAIN,
        tuned={(d, m): tuned(d, m) for d in args.datasets for m in args.models} if args.tuned else {},
    )
    rows = results.run_grid(grid, args.workdir, args.data_dir, sources(args), args.overrides)
    command = "python -m train.experiment " + shlex.join(sys.argv[1:] if argv is None else argv)
    return results.write_report(rows, args.report_dir, command, COMPARISONS, grid.tuned, SINGLE_DOMAIN)


if __name__ == "__main__":
    cli.interruptible(main)
