"""The held-out try's table from its run folders (RUNS/sN/{zero,ft-F,scratch-F}/eval.json, `run.sh`): mean
per-domain test AUC per strategy and fraction, and each fine-tune minus scratch paired by seed with a 95%
t-interval over seeds; writes OUT/results.json and OUT/results.md. Where the new tables hold more training rows
than the pretraining run (`sr_jax.training.spec.versus_scratch`), the default command also trains scratch and
keeps the better on validation: the "default" is then the better-validated of ft-F and scratch-F (its two
candidates, the same configs), and the fine-tune alone is shown beside it.

    python docs/cold_start/movielens-tables/summarize.py --runs runs/ho --out docs/cold_start/movielens-tables
"""

import argparse
import json
from pathlib import Path

import numpy as np

from sr_jax.config import load_config
from sr_jax.experiments.report import t_interval
from sr_jax.training.spec import versus_scratch

FRACTIONS = ("0.01", "0.1", "1")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--runs", required=True)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    runs, out = Path(args.runs), Path(args.out)
    seeds = sorted(int(s.name[1:]) for s in runs.glob("s[0-9]*") if (s / "zero" / "eval.json").exists())

    def read(seed: int, cell: str) -> dict | None:
        path = runs / f"s{seed}" / cell / "eval.json"
        return json.loads(path.read_text()) if path.exists() else None

    table = {"seeds": seeds, "zero-shot": [read(s, "zero")["mean_domain_auc"] for s in seeds], "fractions": {}}
    lines = [
        "| labels | scratch | default fine-tune | fine-tune − scratch, per seed | mean [95% CI] |",
        "|---|---|---|---|---|",
    ]
    z = np.array(table["zero-shot"])
    lines.append(f"| 0 (`--strategy zero-shot`) | | {z.mean():.4f} ± {z.std(ddof=1):.4f} | | |")
    for f in FRACTIONS:
        paired = [(s, read(s, f"ft-{f}"), read(s, f"scratch-{f}")) for s in seeds]
        paired = [(s, a, b) for s, a, b in paired if a and b]
        pairs = [(a, b) for _, a, b in paired]
        if len(pairs) < 2:
            continue
        alone = np.array([a["mean_domain_auc"] for a, _ in pairs])
        sc = np.array([b["mean_domain_auc"] for _, b in pairs])
        versus = [versus_scratch(load_config(runs / f"s{s}" / f"ft-{f}" / "config.json")) for s, _, _ in paired]
        kept = [v and b["validation"]["score"] > a["validation"]["score"] for v, (a, b) in zip(versus, pairs)]
        ft = np.where(kept, sc, alone)  # the default command's result
        gain = ft - sc
        mean, low, high = t_interval(gain)
        budget = pairs[0][0]["budget"]
        table["fractions"][f] = {"fine-tune": ft.tolist(), "fine-tune alone": alone.tolist(), "scratch kept": kept,
                                 "scratch": sc.tolist(), "budget": budget}  # fmt: skip
        besides = f" (scratch kept in {sum(kept)}; the fine-tune alone {alone.mean():.4f})" if any(versus) else ""
        lines.append(
            f"| {float(f):.0%} ({budget['train_examples']:,} to train, {budget['valid_examples']:,} to validate) "
            f"| {sc.mean():.4f} ± {sc.std(ddof=1):.4f} | {ft.mean():.4f} ± {ft.std(ddof=1):.4f}{besides} "
            f"| {', '.join(f'{g:+.3f}' for g in gain)} | {mean:+.4f} [{low:+.4f}, {high:+.4f}] |"
        )
    (out / "results.json").write_text(json.dumps(table, indent=2) + "\n")
    (out / "results.md").write_text(
        f"# Held-out try: Amazon Scientific → MovieLens as a team's own tables ({len(seeds)} seeds)\n\n"
        "Mean per-domain test AUC (one domain, `movies`), mean ± sample std over seeds; seeds pair each fine-tune "
        "with its scratch run (the seed draws the labelled subset and the initialisation, and names the "
        "pretrained run: runs/xc5/a/pretrain/.../seed-N). Made by `run.sh` and this folder's `summarize.py`.\n\n"
        + "\n".join(lines)
        + "\n"
    )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
