"""Re-evaluate a run's result, parameters only: `python -m train.evaluate --workdir DIR [--split NAME]`, written
to DIR/reevaluation_SPLIT.json and .md (the run's own eval.json is never touched).

The result is the best validated step when the run validated (the parameters its eval.json reports), else the
latest checkpoint; its probabilities are measured as calibrated by the run's calibration.json, where it has one."""

from __future__ import annotations

import argparse

from sr_jax import calibration
from sr_jax.config import load_config
from sr_jax.training import evaluation
from sr_jax.training.restore import result_params
from sr_jax.training.records import result_folder
from sr_jax.training.spec import build_spec
from train import cli


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--workdir", required=True, help="the run folder (config.json, checkpoints/) to evaluate")
    p.add_argument("--split", default=None, help="split to evaluate (default: the config's data.eval_split)")
    args = p.parse_args(argv)
    cli.setup()
    workdir = result_folder(args.workdir)  # a strategy selection's: the run it kept
    spec = build_spec(load_config(workdir / "config.json"), workdir)
    result = evaluation.evaluate(spec, result_params(spec), args.split, fitted=calibration.read(spec.workdir))
    # A reader never writes the run's own report (eval.json: what training chose and measured, which a run still
    # training would also replace): a re-evaluation goes beside it, named by its split.
    evaluation.write_report(workdir, result, name=f"reevaluation_{result['split']}")
    print(evaluation.markdown_table(result))
    return result


if __name__ == "__main__":
    cli.interruptible(main)
