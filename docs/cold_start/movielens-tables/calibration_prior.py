"""The calibration fit before (Platt's slope and bias both pulled with weight 1, toward the identity) against
today's (the slope pulled toward 1, the bias all but free, so the fit matches the validation click rate): each
run's validation logits fitted both ways, its evaluation split measured (log loss, PCOC, ECE per domain). Reads
the runs, writes nothing into them; writes OUT (JSON) and its table beside it (OUT with .md).

    python docs/cold_start/movielens-tables/calibration_prior.py --out FILE.json RUN [RUN ...]
"""

import argparse
import dataclasses
import json
import re
from pathlib import Path
from unittest import mock

import numpy as np
from scipy import stats

from sr_jax import calibration, metrics
from sr_jax.config import load_config
from sr_jax.training import evaluation
from sr_jax.training.restore import result_params
from sr_jax.training.spec import build_spec


def measure(run: Path) -> dict:
    cfg = load_config(run / "config.json")
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, calibration="platt"))
    spec = build_spec(cfg, run)
    params, rows = result_params(spec), evaluation.trained_rows(spec)
    names = [d.name for d in spec.dataset.meta.domains]
    valid = spec.valid_columns
    z_valid = evaluation.predict_scores(spec, params, valid, rows)["logit"]
    test = spec.split(cfg.data.eval_split)
    z_test = evaluation.predict_scores(spec, params, test, rows)["logit"]
    fit = lambda: calibration.fit(z_valid, valid["label"], valid["domain"], names)  # noqa: E731
    with (  # before: the slope and the bias both pulled with weight 1, toward 1 and 0
        mock.patch.object(calibration, "_rate_shift", lambda z, y: 0.0),
        mock.patch.object(calibration, "PULL", (1, 1)),
    ):
        fits = {"before": fit()}
    fits["now"] = fit()
    out = {"run": str(run), "valid_clicks": int(np.sum(valid["label"])), "valid_rows": len(valid["label"])}
    y, d = np.asarray(test["label"]), np.asarray(test["domain"])
    out["raw"] = {n: metrics.probability_metrics(y[d == k], z_test[d == k]) for k, n in enumerate(names)}
    for name, fitted in fits.items():
        c = np.asarray(calibration.apply(calibration.arrays(fitted, names), z_test, d))
        out[name] = {n: metrics.probability_metrics(y[d == k], c[d == k]) for k, n in enumerate(names)}
    return out


FITS = ("raw", "before", "now", "pooled at its own rate (not kept)")  # the last: a trial's, in its JSON


def table(results: list[dict]) -> str:
    """Markdown: per cell (the runs' folders with the seed's part as *) and fit, log loss and ECE (the mean over
    domains of each domain's test figure, then over seeds), its log loss minus the fit before's paired by seed
    with a 95% t-interval, and the range of PCOC over domains and seeds."""
    cells: dict[str, list[dict]] = {}
    for r in results:
        key = "/".join("*" if re.fullmatch(r"s\d+|seed-\d+", part) else part for part in Path(r["run"]).parts[-6:])
        cells.setdefault(key, []).append(r)
    lines = [
        "| cell | seeds | valid clicks | fit | log loss | − before [95% CI] | ECE | PCOC per domain |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for key, rs in cells.items():
        mean = lambda form, metric, rs=rs: np.array([np.mean([m[metric] for m in r[form].values()]) for r in rs])  # noqa: E731
        for form in [f for f in rs[0] if f in FITS]:
            diff = mean(form, "log_loss") - mean("before", "log_loss")
            half = stats.t.ppf(0.975, len(diff) - 1) * diff.std(ddof=1) / np.sqrt(len(diff)) if len(diff) > 1 else 0
            pcoc = [m["pcoc"] for r in rs for m in r[form].values()]
            lines.append(
                f"| {key} | {len(rs)} | {np.mean([r['valid_clicks'] for r in rs]):.0f} | {form} "
                f"| {mean(form, 'log_loss').mean():.4f} | {diff.mean():+.4f} [{diff.mean() - half:+.4f}, "
                f"{diff.mean() + half:+.4f}] | {mean(form, 'ece').mean():.4f} | {min(pcoc):.2f}–{max(pcoc):.2f} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", help="the results JSON to write (with runs to measure)")
    p.add_argument("runs", nargs="*")
    p.add_argument("--table-of", help="a results JSON this script wrote: its table again, nothing measured")
    args = p.parse_args()
    if args.table_of:
        print(table(json.loads(Path(args.table_of).read_text())), end="")
        return
    if not (args.out and args.runs):
        p.error("name the runs to measure and --out, or --table-of a results JSON")
    results = []
    for run in args.runs:
        results.append(measure(Path(run).absolute()))
        r = results[-1]
        for form in ("raw", "before", "now"):
            row = " ".join(
                f"{n}: ll {m['log_loss']:.4f} pcoc {m['pcoc']:.2f} ece {m['ece']:.4f}" for n, m in r[form].items()
            )
            print(f"{run} [{r['valid_clicks']} valid clicks] {form}: {row}", flush=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    Path(args.out).with_suffix(".md").write_text(table(results))
    print(table(results))


if __name__ == "__main__":
    main()
