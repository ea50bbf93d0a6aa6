"""The wire comparison's table (issue 42): the README's main job on 8 virtual devices with routed lookups, in
float32 and in bfloat16 on the wire, one run per seed and wire (RUNS/{f32,bf16}-sN, `train.pretrain`); each run's
mean per-domain test AUC and log loss (eval.json) and its dropped lookups (metrics.jsonl, summed), paired by seed
with a 95% t-interval. Writes OUT/wire.json and OUT/wire.md.

    python docs/performance/pod-scale/wire/summarize.py --runs runs/wire42b --out docs/performance/pod-scale/wire
"""

import argparse
import json
from pathlib import Path

import numpy as np

from sr_jax.experiments.report import t_interval

WIRES = {"float32": "f32", "bfloat16": "bf16"}


def read(run: Path, wire: str, seed: int) -> dict:
    result = json.loads((run / "eval.json").read_text())
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {
        "wire": wire,
        "seed": seed,
        "mean_domain_auc": result["mean_domain_auc"],
        "log_loss": result["overall"]["log_loss"],
        "chosen_step": result["validation"]["step"],
        "lookup_dropped": sum(m.get("lookup_dropped", 0.0) for m in logged),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--runs", required=True)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    runs, out = Path(args.runs), Path(args.out)
    seeds = sorted(int(r.name.split("-s")[1]) for r in runs.glob("f32-s*") if (r / "eval.json").exists()
                   and (runs / f"bf16-s{r.name.split('-s')[1]}" / "eval.json").exists())  # fmt: skip
    rows = [read(runs / f"{short}-s{s}", wire, s) for s in seeds for wire, short in WIRES.items()]
    by = {(r["wire"], r["seed"]): r for r in rows}
    lines = [
        "| seed | float32: mean per-domain AUC | bfloat16 | bfloat16 − float32 | log loss float32 | bfloat16 "
        "| lookups dropped (whole run, f32 / bf16) |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in seeds:
        a, b = by[("float32", s)], by[("bfloat16", s)]
        lines.append(
            f"| {s} | {a['mean_domain_auc']:.4f} | {b['mean_domain_auc']:.4f} "
            f"| {b['mean_domain_auc'] - a['mean_domain_auc']:+.4f} | {a['log_loss']:.4f} | {b['log_loss']:.4f} "
            f"| {a['lookup_dropped']:.0f} / {b['lookup_dropped']:.0f} |"
        )
    for metric, what in (("mean_domain_auc", "AUC"), ("log_loss", "log loss")):
        d = np.array([by[("bfloat16", s)][metric] - by[("float32", s)][metric] for s in seeds])
        mean, low, high = t_interval(d)
        lines += ["", f"bfloat16 − float32, {what}, paired over {len(d)} seeds: {mean:+.5f} "
                  f"[{low:+.5f}, {high:+.5f}] (95% t-interval); lower in {int((d < 0).sum())} "
                  f"of {len(d)} seeds."]  # fmt: skip
    (out / "wire.json").write_text(json.dumps(rows, indent=2) + "\n")
    (out / "wire.md").write_text(
        "# Routed lookups in float32 and in bfloat16 on the wire (issue 42)\n\n"
        "Made on the 2-core CPU machine (Python 3.11, jax 0.10.2), 2026-12-07: the README's main job (`train.pretrain` "
        "on the embedded dataset) on 8 virtual devices with the tables split over all of them and routed lookups, "
        "then `summarize.py` (this folder):\n\n```bash\nXLA_FLAGS=--xla_force_host_platform_device_count=8 python -m "
        "train.pretrain --workdir runs/wire42b/W-sS \\\n  mesh.data=1 mesh.model=8 model.lookup=all_to_all "
        "model.lookup_wire=W train.seed=S\n```\n\n" + "\n".join(lines) + "\n"
    )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
