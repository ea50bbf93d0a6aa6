"""The cold-start comparison: `python -m train.cold_start --workdir DIR --report-dir OUT [grid options]
[pretraining overrides]`.

Pretrains one model per text setting and seed, then trains every (protocol, setting, variant, fraction,
seed) cell: scratch, finetune-all, freeze-l0, freeze-l0-l1, each fine-tuned setting in every chosen variant
(default: aligned against the pretrained domains; no-align; replay), see sr_jax.experiments.cold_start.
`--finetune-data` takes the cold data from a dataset prepared apart (read through the pretrained tables by
raw key); `--history` sets the user history aspect (rows per setting; default -1, the model's auto). The
pretrained model's zero-shot score is the 0 fraction. Overrides go anywhere.
Resumable: a finished cell is not run again. Writes OUT/cold_start.{md,csv,png}.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from sr_jax.config import override
from sr_jax.experiments import cold_start
from sr_jax.protocols import PROTOCOLS
from train import cli


def parser() -> argparse.ArgumentParser:
    """The command line (without parsing it): `cli.parse(parser(), argv)`."""
    p = cli.parser(__doc__)
    p.add_argument("--report-dir", required=True, help="where cold_start.md, .csv and .png go")
    p.add_argument("--seeds", type=int, nargs="+", default=list(cold_start.Grid.seeds))
    p.add_argument("--fractions", type=float, nargs="+", default=list(cold_start.Grid.fractions))
    p.add_argument("--protocols", nargs="+", default=list(PROTOCOLS), choices=list(PROTOCOLS))
    p.add_argument("--settings", nargs="+", default=list(cold_start.SETTINGS), choices=list(cold_start.SETTINGS))
    p.add_argument("--variants", nargs="+", default=["default"], choices=list(cold_start.VARIANTS))
    p.add_argument("--text", nargs="+", choices=("on", "off"), default=["on", "off"])
    p.add_argument(
        "--history", type=int, nargs="+", default=[-1], help="model.user_history settings (0: none; -1: auto)"
    )
    p.add_argument("--finetune-data", default="", help="the cold data as a dataset prepared apart")
    p.add_argument("--train-split", help="its cold training split (default: the protocol's, else train)")
    p.add_argument("--eval-split", help="its evaluation split (default: the protocol's, else test)")
    p.add_argument(
        "--finetune", action="append", default=[], metavar="KEY=VALUE", help="an override of the fine-tune runs"
    )
    return p


def main(argv: list[str] | None = None) -> list[dict]:
    args = cli.parse(parser(), argv)
    if bool(args.train_split) != bool(args.eval_split):
        raise SystemExit("error: --train-split and --eval-split go together")
    cli.setup()
    base = override(cli.config_from_name(args.config or "default"), args.overrides)
    grid = cold_start.Grid(
        seeds=tuple(args.seeds),
        fractions=tuple(args.fractions),
        protocols=tuple(args.protocols),
        settings=tuple(args.settings),
        text=tuple(t == "on" for t in args.text),
        variants=tuple(args.variants),
        history=tuple(args.history),
        finetune_data=str(Path(args.finetune_data).absolute()) if args.finetune_data else "",
        splits=(args.train_split, args.eval_split) if args.train_split else None,
    )
    rows = cold_start.run_grid(base, grid, args.workdir, args.finetune)
    command = "python -m train.cold_start " + shlex.join(sys.argv[1:] if argv is None else argv)
    splits = {p: cold_start.grid_splits(grid, base, p) for p in grid.protocols}
    table = cold_start.write_report(rows, args.report_dir, command, splits)
    print((args.report_dir + "/cold_start.md") if table else "no cells")
    return table


if __name__ == "__main__":
    cli.interruptible(main)
