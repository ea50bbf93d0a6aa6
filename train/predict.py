"""Score a dataset split to Parquet: `python -m train.predict --workdir RUN|--artifact DIR --data DIR --split NAME
--out FILE`.

One row per example (row, domain, user/query/item keys, score, label), streamed in parts with a progress bar; the
same command after a kill resumes from the finished parts. `--data` defaults to the run's own dataset.
"""

from __future__ import annotations

import argparse
import json

from sr_jax import io
from sr_jax.export import scoring, trained
from train import cli


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--workdir", help="a run folder: its result's parameters (best validated step, else latest)")
    source.add_argument("--artifact", help="an exported artifact (python -m train.export)")
    p.add_argument("--data", default=None, help="a prepared dataset folder (default: the run's own dataset)")
    p.add_argument("--split", default="test")
    p.add_argument("--out", required=True, help="the Parquet file to write")
    p.add_argument("--batch-size", type=int, default=None, help="default: the run's data.eval_batch_size, or 4096")
    p.add_argument("--part-rows", type=int, default=262_144, help="examples per resumable part")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an OUT this command did not write, and discard the parts of another job at OUT.parts",
    )
    args = p.parse_args(argv)
    cli.setup()
    io.claim(args.out, scoring.PREDICTIONS, args.overwrite, inputs=tuple(filter(None, [args.workdir, args.artifact])))
    if args.artifact:
        if args.data is None:
            p.error("--artifact needs --data (an artifact does not carry its dataset)")
        scorer, data = scoring.artifact_scorer(args.artifact, args.batch_size or 4096), args.data
    else:
        model = trained.load(args.workdir)
        scorer, data = scoring.run_scorer(model, args.batch_size), args.data or model.dataset().root
    summary = scoring.predict(scorer, data, args.split, args.out, args.part_rows, args.overwrite)
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    cli.interruptible(main)
