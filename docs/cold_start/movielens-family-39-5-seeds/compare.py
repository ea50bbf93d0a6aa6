"""Issue 39's "the existing cases must not regress", on MovieLens family with 5 seeds: the same grid under the
current defaults and under issue 29's (`--history 0 model.content_match=false finetune.zero_shot_weight=0`), run
by the same code, the fine-tunes' test AUC paired by seed (the seed draws the labelled subset and the pretraining
run), and each one's gain over its own scratch; 95% t-intervals. Prints markdown.

    python docs/cold_start/movielens-family-39-5-seeds/compare.py runs/noreg/ml-family runs/noreg/ml-family-29
"""

import json
import sys
from pathlib import Path

import numpy as np

from sr_jax.experiments.report import t_interval


def aucs(grid: Path, setting: str, fraction: str) -> np.ndarray:
    cells = sorted((grid / "new-domain").glob(f"*/{setting}/fraction-{fraction}/seed-*/eval.json"))
    return np.array([json.loads(c.read_text())["mean_domain_auc"] for c in cells])


def interval(d: np.ndarray) -> str:
    mean, low, high = t_interval(d)
    return f"{mean:+.3f} [{low:+.3f}, {high:+.3f}]"


def main(now: str, before: str) -> None:
    now, before = Path(now), Path(before)
    print("| fraction | fine-tune now (per seed) | before (per seed) | now − before | gain over scratch now | before |")
    print("|---|---|---|---|---|---|")
    for fraction in ("0.01", "0.1", "1"):
        a, b = aucs(now, "finetune-all", fraction), aucs(before, "finetune-all", fraction)
        ga, gb = a - aucs(now, "scratch", fraction), b - aucs(before, "scratch", fraction)
        seeds = lambda v: ", ".join(f"{x:.3f}" for x in v)  # noqa: E731
        print(f"| {float(fraction):.0%} | {a.mean():.3f} ({seeds(a)}) | {b.mean():.3f} ({seeds(b)}) "
              f"| {interval(a - b)} | {interval(ga)} | {interval(gb)} |")  # fmt: skip


if __name__ == "__main__":
    main(*sys.argv[1:3])
