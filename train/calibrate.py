"""Fit a run's calibration again: `python -m train.calibrate --workdir RUN [--split S] [--rates-of S2]
[--data D] [--method platt|isotonic] [--rate R] [--min-clicks N]`.

Without --split: on the run's own validation data, as training fits it at its end (for a run from before
calibration, or to change the method); the run's evaluation split is then scored again, calibrated, into
RUN/reevaluation_SPLIT.json and .md (eval.json, what training measured, is never touched). With --split: on that
split of the dataset D (default: the run's own), read through the run's vocabulary by key, for a model moved to
traffic with another click rate. --rates-of S2: each domain's map shifted to its click rate in split S2 (of D,
default the run's dataset): the rates of the traffic the probabilities will meet, where the period has moved.
S2 is scored by the run (its raw logits) and each domain's map shifted so that its mean probability over S2's
rows is the domain's rate there: only each domain's mean label is read, never a row's label against its score.
Either way
RUN/calibration.json is replaced; the fit it replaces is kept in
its "previous" list. Batch scoring and exports made afterwards carry the new calibration.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import NamedTuple

import numpy as np

from sr_jax import calibration, io, metrics
from sr_jax.config import TrainConfig, load_config
from sr_jax.data.pipeline import map_batches
from sr_jax.data.store import Dataset, open_dataset
from sr_jax.export import scoring, trained
from sr_jax.training import evaluation
from sr_jax.training.records import result_folder
from sr_jax.training.restore import result_params
from sr_jax.training.spec import build_spec
from train import cli


Traffic = tuple[dict[str, float], str, tuple[np.ndarray, np.ndarray]]  # (rates per domain, whose, (logits, domain))


def _own_validation(workdir: Path, train_cfg, traffic: Traffic | None) -> tuple[dict, dict]:
    """(fit, re-evaluation): fitted on the run's validation data, the evaluation split scored with it."""
    cfg = load_config(workdir / "config.json")
    cfg = dataclasses.replace(cfg, train=train_cfg(cfg.train))
    spec = build_spec(cfg, workdir)
    if spec.valid_source == "":
        raise ValueError(f"{workdir}: the run has no validation data (train.eval_every=0); name one with --split")
    params, rows = result_params(spec), evaluation.trained_rows(spec)
    fitted = evaluation.fit_calibration(spec, params, rows, *(traffic or (None, "", None)))
    return fitted, evaluation.evaluate(spec, params, trained=rows, fitted=fitted)


class Scored(NamedTuple):
    """A split read through the run's vocabulary by key and scored as batch scoring scores it."""

    columns: dict
    logits: np.ndarray  # [rows] raw (uncalibrated)
    domains: list[str]  # the model's, which columns["domain"] indexes
    dataset: Dataset
    train: TrainConfig  # the run's train section


def _scored(workdir: Path, split: str, data: str | None) -> Scored:
    """`split` of `data` (default: the run's dataset), scored by the run's raw logits."""
    model = dataclasses.replace(trained.load(workdir), calibration=None)  # the raw logits
    scorer = scoring.run_scorer(model)
    dataset = open_dataset(data) if data else model.dataset()
    columns = scoring.model_columns(scorer, dataset, split)
    logits = map_batches(scorer.bind(scoring.text_table(scorer, dataset)), columns, scorer.batch_size)["logit"]
    return Scored(columns, np.asarray(logits), scorer.domains, dataset, model.config.train)


def _traffic(scored: Scored, split: str) -> Traffic:
    """Each domain's click rate in the `scored` split (its mean label), what they are, and the split's raw logits
    and domains (the rows a domain's mean probability is matched over)."""
    domain = np.asarray(scored.columns["domain"])
    rates = calibration.click_rates(np.asarray(scored.columns["label"]), domain, scored.domains)
    whose = f"the click rates per domain of split {split!r} of {scored.dataset.root}, matched over its rows"
    return rates, whose, (scored.logits, domain)


def _named_split(scored: Scored, split: str, train_cfg, traffic: Traffic | None) -> dict:
    """Fitted on the `scored` split, and measured on it."""
    columns, logits, domains, dataset = scored.columns, scored.logits, scored.domains, scored.dataset
    t = train_cfg(scored.train)
    labels = np.asarray(columns["label"])
    fitted = calibration.fit(
        logits,
        labels,
        np.asarray(columns["domain"]),
        domains,
        method=t.calibration,
        min_clicks=t.calibration_min_clicks,
        rate=t.calibration_rate if traffic is None else traffic[0],
        fitted_on=f"split {split!r} of {dataset.root} ({len(logits)} rows)",
        sampled=dataset.meta.negatives_per_click,
        target="" if traffic is None else traffic[1],
        traffic=None if traffic is None else traffic[2],
    )
    table = calibration.arrays(fitted, domains)
    calibrated = np.asarray(calibration.apply(table, logits, np.asarray(columns["domain"])))
    fitted["fit_split"] = {  # in-sample: what the fit changed on the rows it was fitted to
        "raw": metrics.probability_metrics(labels, logits),
        "calibrated": metrics.probability_metrics(labels, calibrated),
    }
    return fitted


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True, help="the run folder to calibrate")
    p.add_argument("--split", default=None, help="fit on this split (default: the run's own validation data)")
    p.add_argument("--rates-of", default=None, help="target each domain's click rate in this split (of --data)")
    p.add_argument("--data", default=None, help="the dataset of --split and --rates-of (default: the run's own)")
    p.add_argument("--method", default=None, choices=("platt", "isotonic"), help="default: the run's")
    p.add_argument("--rate", type=float, default=None, help="a click rate to calibrate to (default: the run's)")
    p.add_argument("--min-clicks", type=int, default=None, help="a domain's own map from this many clicks")
    args = p.parse_args(argv)
    if args.data and not (args.split or args.rates_of):
        p.error("--data needs --split or --rates-of (the split of that dataset to fit on or to take rates from)")
    if args.rates_of and args.rate:
        p.error("--rate and --rates-of both name the click rate to target: give one")
    cli.setup()
    workdir = result_folder(args.workdir)  # a strategy selection's: the run it kept

    def train_cfg(t):
        method = args.method or (t.calibration if t.calibration != "none" else "platt")
        rate = t.calibration_rate if args.rate is None else args.rate
        clicks = t.calibration_min_clicks if args.min_clicks is None else args.min_clicks
        return dataclasses.replace(t, calibration=method, calibration_rate=rate, calibration_min_clicks=clicks)

    if not (workdir / "config.json").exists():
        raise ValueError(f"{workdir}: not a run folder (no config.json)")
    with io.exclusive(workdir):  # not while the run trains (it writes calibration.json at its end)
        return _calibrate(workdir, args, train_cfg)


def _calibrate(workdir: Path, args: argparse.Namespace, train_cfg) -> dict:
    previous = calibration.read(workdir)
    scored: dict[str, Scored] = {}  # by split: --split S --rates-of S scores S once

    def score(split: str) -> Scored:
        if split not in scored:
            scored[split] = _scored(workdir, split, args.data)
        return scored[split]

    traffic = _traffic(score(args.rates_of), args.rates_of) if args.rates_of else None
    if args.split:
        fitted, result = _named_split(score(args.split), args.split, train_cfg, traffic), None
    else:
        fitted, result = _own_validation(workdir, train_cfg, traffic)
        if fitted is None:
            raise ValueError(f"{workdir}: nothing to fit on (the run's validation data)")
    if previous is not None:
        fitted["previous"] = [*previous.pop("previous", []), previous]
    calibration.write(workdir, fitted)
    print(f"{workdir / calibration.FILE}: {calibration.summary(fitted)}")
    if result is not None:
        evaluation.write_report(workdir, result, name=f"reevaluation_{result['split']}")
        print(evaluation.markdown_table(result))
    return {"calibration": fitted, "evaluation": result}


if __name__ == "__main__":
    cli.interruptible(main)
