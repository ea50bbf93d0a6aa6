"""The cold-start comparison: `python -m train.cold_start --workdir DIR --report-dir OUT [grid options]
[pretraining overrides]`.

Pretrains one model per text setting and seed, then trains every (protocol, setting, variant, fraction,
seed) cell: scratch, finetune-all, freeze-l0, freeze-l0-l1, each fine-tuned setting in every chosen variant
(default: aligned against the pretrained domains; no-align; replay), see sr_jax.experiments.cold_start.
Resumable: a finished cell is not run again. Writes OUT/cold_start.{md,csv,png}.
"""

from __future__ import annotations

import shlex
import sys

from sr_jax.config import override
from sr_jax.experiments import cold_start
from sr_jax.training.finetune import PROTOCOLS
from train import cli


def main(argv: list[str] | None = None) -> list[dict]:
    p = cli.parser(__doc__)
    p.add_argument("--report-dir", required=True, help="where cold_start.md, .csv and .png go")
    p.add_argument("--seeds", type=int, nargs="+", default=list(cold_start.Grid.seeds))
    p.add_argument("--fractions", type=float, nargs="+", default=list(cold_start.Grid.fractions))
    p.add_argument("--protocols", nargs="+", default=list(PROTOCOLS), choices=list(PROTOCOLS))
    p.add_argument("--settings", nargs="+", default=list(cold_start.SETTINGS), choices=list(cold_start.SETTINGS))
    p.add_argument("--variants", nargs="+", default=["default"], choices=list(cold_start.VARIANTS))
    p.add_argument("--text", nargs="+", choices=("on", "off"), default=["on", "off"])
    p.add_argument("--finetune", nargs="*", default=[], metavar="KEY=VALUE", help="overrides of the fine-tune runs")
    args = p.parse_args(argv)
    cli.setup()
    base = override(cli.config_from_name(args.config or "default"), args.overrides)
    grid = cold_start.Grid(
        seeds=tuple(args.seeds),
        fractions=tuple(args.fractions),
        protocols=tuple(args.protocols),
        settings=tuple(args.settings),
        text=tuple(t == "on" for t in args.text),
        variants=tuple(args.variants),
    )
    rows = cold_start.run_grid(base, grid, args.workdir, args.finetune)
    command = "python -m train.cold_start " + shlex.join(sys.argv[1:] if argv is None else argv)
    table = cold_start.write_report(rows, args.report_dir, command)
    print((args.report_dir + "/cold_start.md") if table else "no cells")
    return table


if __name__ == "__main__":
    main()
