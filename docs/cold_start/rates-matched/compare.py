"""Issue 40: a grid's cells calibrated to the test split's click rates two ways, paired by seed: the map shifted
by the prior correction (`calibration-platt@rates-of-test.prior-correction.json`, the cells' re-evaluations made
before the change) against the map matched in the mean over the test split's rows (`calibration-platt@rates-of-
test.json`, `python -m train.calibration_grid --rates-of test` now). Prints a markdown table: overall log loss and
ECE (matched minus prior, mean and 95% t-interval over seeds) and per-domain ECE and PCOC ranges.

    python docs/cold_start/rates-matched/compare.py runs/xc5/a/new-domain runs/xc5/b/pretrain
"""

import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

from sr_jax.experiments.report import t_interval

NEW, OLD = "calibration-platt@rates-of-test.json", "calibration-platt@rates-of-test.prior-correction.json"


def group(cell: Path, grid: Path) -> str:
    parts = cell.relative_to(grid).parts
    return "/".join(p for p in parts[:-1] if not p.startswith("text-")) or grid.name


def interval(d: list[float]) -> str:
    mean, low, high = t_interval(d)
    return f"{mean:+.4f} [{low:+.4f}, {high:+.4f}]"


def main(grids: list[str]) -> None:
    rows = defaultdict(lambda: defaultdict(list))
    for g in map(Path, grids):
        for new in sorted(g.rglob(NEW)):
            old = new.with_name(OLD)
            if not old.exists():
                continue
            a, b = json.loads(new.read_text()), json.loads(old.read_text())
            r = rows[(g.name, group(new.parent, g))]
            r["loss"].append(a["overall"]["calibrated"]["log_loss"] - b["overall"]["calibrated"]["log_loss"])
            r["ece"].append(a["overall"]["calibrated"]["ece"] - b["overall"]["calibrated"]["ece"])
            for name, d in a["domains"].items():
                if "calibrated" in d and "calibrated" in b["domains"].get(name, {}):
                    r[f"ece:{name}"].append((b["domains"][name]["calibrated"]["ece"], d["calibrated"]["ece"]))
                    r[f"pcoc:{name}"].append((b["domains"][name]["calibrated"]["pcoc"], d["calibrated"]["pcoc"]))
    print("| grid | cells | seeds | log loss, matched − prior | ECE, matched − prior "
          "| per domain: ECE prior → matched (mean); PCOC prior → matched (range) |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for (g, cells), r in sorted(rows.items()):
        domains = sorted({k.split(":", 1)[1] for k in r if ":" in k})
        per = "; ".join(
            f"{d}: {np.mean([x for x, _ in r['ece:' + d]]):.3f} → {np.mean([y for _, y in r['ece:' + d]]):.3f}, "
            f"{min(x for x, _ in r['pcoc:' + d]):.2f}–{max(x for x, _ in r['pcoc:' + d]):.2f} → "
            f"{min(y for _, y in r['pcoc:' + d]):.2f}–{max(y for _, y in r['pcoc:' + d]):.2f}"
            for d in domains
        )
        print(f"| {g} | {cells} | {len(r['loss'])} | {interval(r['loss'])} | {interval(r['ece'])} | {per} |")


if __name__ == "__main__":
    main(sys.argv[1:])
