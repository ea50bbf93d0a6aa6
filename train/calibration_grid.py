"""Calibration measured over a finished grid (`train.cold_start`, `train.experiment`): every cell that validated
is calibrated on its own validation data by each method (`train.calibrate`), its test split scored again, and
raw against calibrated log loss, ECE and PCOC tabulated per setting and fraction, paired by seed.

    python -m train.calibration_grid --grid runs/noreg/amz-nothing --report docs/cold_start/X/calibration.md

Each cell keeps its calibration-METHOD.json (the re-evaluation) and, at the end, calibration.json of the last
method (`--methods`' first, the default, is fitted last so the cell's calibration is the default's).
`--rates-of S` adds the first method shifted to each domain's click rate in split S (`train.calibrate
--rates-of`), as `METHOD@rates-of-S`: probabilities at the evaluated period's click rates, where the
validation period's differ. The method `run` fits nothing: the calibration each run fitted at its end, as its
eval.json reports it (every run made since calibration has one).
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import numpy as np

from sr_jax import calibration
from sr_jax.io import atomic_file
from train import calibrate, cli

QUANTITIES = ("log_loss", "ece", "pcoc")
RUN = "run"  # the run's own end-of-run calibration (its eval.json), nothing fitted again


def cells(grid: Path, settings: list[str] | None = None) -> list[Path]:
    """The grid's run folders that chose their step on validation data (a zero-shot cell has none), of the named
    settings only where `settings` is given (folder names on the way: pretrain, scratch, finetune-all, a
    dataset or a model of an experiment grid, ...)."""
    found = []
    for result in sorted(grid.rglob("eval.json")):
        if "candidates" in result.parts or not (result.parent / "config.json").exists():
            continue
        if settings and not set(settings) & set(result.parent.relative_to(grid).parts):
            continue
        if "validation" in json.loads(result.read_text()):
            found.append(result.parent)
    return found


RATES_OF = "@rates-of-"  # METHOD@rates-of-SPLIT: the method shifted to SPLIT's click rates per domain


def measure(cell: Path, methods: list[str]) -> None:
    """Each method's re-evaluation into the cell; a calibration.json the cell had is put back as it was."""
    own = cell / calibration.FILE
    kept = own.read_bytes() if own.exists() else None
    for method in reversed(methods):  # the first fitted last: the cell's calibration.json is the default's
        out = cell / f"calibration-{method}.json"
        if method != RUN and not out.exists():
            name, _, split = method.partition(RATES_OF)
            rates = ["--rates-of", split] if split else []
            result = calibrate.main(["--workdir", str(cell), "--method", name, *rates])["evaluation"]
            out.write_text(json.dumps(result, indent=2) + "\n")
    if kept is not None:
        with atomic_file(own) as tmp:
            tmp.write_bytes(kept)


def _group(cell: Path, grid: Path) -> tuple[str, str]:
    """(setting, fraction) of a cell from its path below the grid: .../SETTING/fraction-F/seed-S (a cold-start
    grid), else the folders above seed-S (an experiment grid's DATASET/MODEL, a pretraining cell)."""
    parts = cell.relative_to(grid).parts
    fraction = next((p.removeprefix("fraction-") for p in parts if p.startswith("fraction-")), "-")
    setting = parts[-3] if fraction != "-" else "/".join(parts[:-1])
    return setting, fraction


def _result(cell: Path, method: str) -> dict:
    return json.loads((cell / ("eval.json" if method == RUN else f"calibration-{method}.json")).read_text())


def table(grid: Path, methods: list[str], settings: list[str] | None = None) -> str:
    rows: dict[tuple[str, str], list[dict]] = {}
    for cell in cells(grid, settings):
        results = {m: _result(cell, m) for m in methods}
        rows.setdefault(_group(cell, grid), []).append(results)
    lines = [
        "| setting | fraction | seeds | log loss raw | " + " | ".join(f"{m} − raw" for m in methods)
        + " | ECE raw | " + " | ".join(f"ECE {m}" for m in methods)
        + " | PCOC raw (domains) | " + " | ".join(f"PCOC {m} (domains)" for m in methods) + " |",
        "|---" * (5 + 3 * len(methods)) + "|---|",
    ]  # fmt: skip
    for (setting, fraction), results in sorted(rows.items(), key=lambda kv: (kv[0][0], _num(kv[0][1]))):
        first = methods[0]
        raw_loss = _overall(results, first, "log_loss", True)
        diffs = [_overall(results, m, "log_loss", False) - raw_loss for m in methods]
        lines.append(
            f"| {setting} | {fraction} | {len(results)} | {_ms(raw_loss)} | "
            + " | ".join(_paired(d) for d in diffs)
            + f" | {_ms(_overall(results, first, 'ece', True))} | "
            + " | ".join(_ms(_overall(results, m, "ece", False)) for m in methods)
            + f" | {_domain_range(results, first, True)} | "
            + " | ".join(_domain_range(results, m, False) for m in methods)
            + " |"
        )
    return "\n".join(lines) + "\n"


def _overall(results: list[dict], m: str, q: str, raw: bool) -> np.ndarray:
    return np.array([r[m]["overall"][q] if raw else r[m]["overall"]["calibrated"][q] for r in results])


def _domain_range(results: list[dict], m: str, raw: bool) -> str:
    """The overall PCOC's mean over seeds (the range over domains and seeds)."""
    values = [
        d["pcoc"] if raw else d["calibrated"]["pcoc"]
        for r in results
        for d in r[m]["domains"].values()
        if d["pcoc"] == d["pcoc"]
    ]
    return f"{_overall(results, m, 'pcoc', raw).mean():.2f} ({min(values):.2f}–{max(values):.2f})"


def _num(fraction: str) -> float:
    return float(fraction) if re.fullmatch(r"[0-9.]+", fraction) else -1.0


def _ms(values: np.ndarray) -> str:
    return f"{values.mean():.4f} ± {values.std(ddof=1):.4f}" if len(values) > 1 else f"{values.mean():.4f}"


def _paired(diff: np.ndarray) -> str:
    """mean ± std of a paired difference, and whether it is worse than raw beyond noise (mean > 2 standard
    errors above 0)."""
    se = diff.std(ddof=1) / np.sqrt(len(diff)) if len(diff) > 1 else float("inf")
    worse = " **worse**" if diff.mean() > 2 * se else ""
    return f"{diff.mean():+.4f} ± {diff.std(ddof=1) if len(diff) > 1 else 0:.4f}{worse}"


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--grid", required=True, help="a grid's run folder (train.cold_start --workdir)")
    p.add_argument("--report", required=True, help="the markdown file to write")
    p.add_argument("--methods", nargs="+", default=["platt", "isotonic"], help=f"platt, isotonic, {RUN}")
    p.add_argument("--settings", nargs="+", default=None, help="only these settings (default: every one)")
    p.add_argument("--rates-of", default=None, help="also the first method at this split's click rates")
    args = p.parse_args(argv)
    cli.setup()
    grid = Path(args.grid)
    methods = args.methods + ([f"{args.methods[0]}{RATES_OF}{args.rates_of}"] if args.rates_of else [])
    found = cells(grid, args.settings)
    for i, cell in enumerate(found):
        print(f"[{i + 1}/{len(found)}] {cell}", flush=True)
        measure(cell, methods)
    only = f" --methods {' '.join(args.methods)}" if args.methods != p.get_default("methods") else ""
    only += f" --settings {' '.join(args.settings)}" if args.settings else ""
    only += f" --rates-of {args.rates_of}" if args.rates_of else ""
    text = (
        f"# Calibration over `{grid}`\n\nMade by `python -m train.calibration_grid --grid {grid} --report "
        f"{args.report}{only}`: each cell calibrated on its own validation data (per domain, pooled below "
        "`train.calibration_min_clicks`), its test split scored again (`run`: as the run calibrated itself at its "
        "end, from its eval.json, nothing fitted again). Overall figures, mean ± sample std over "
        "seeds; a method's log loss minus raw is paired by seed (**worse**: more than 2 standard errors above "
        "0); PCOC: overall mean (range over domains and seeds).\n\n" + table(grid, methods, args.settings)
    )
    Path(args.report).parent.mkdir(parents=True, exist_ok=True)
    Path(args.report).write_text(text)
    print(text)
    return text


if __name__ == "__main__":
    cli.interruptible(main)
