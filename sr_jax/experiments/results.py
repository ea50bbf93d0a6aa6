"""The results table: every model of a grid (configs/experiment.py's) on every dataset, over seeds.

A cell is one `trainer.fit` run in WORKDIR/DATASET/MODEL/seed-S (the single-domain baseline: one run
per domain in .../seed-S/DOMAIN). Finished cells are read back, not rerun, so the grid resumes. The
real datasets are converted on first use from their source folders into DATA_DIR.
"""

from __future__ import annotations

import dataclasses
import logging
import shlex
from pathlib import Path

import numpy as np

from sr_jax.config import Config, override
from sr_jax.data import amazon, movielens
from sr_jax.data.store import open_dataset
from sr_jax.experiments import report
from sr_jax.experiments.cells import run_once
from sr_jax.text import build_text_cache, get_featurizer, text_identity
from sr_jax.data.selection import run_domains
from sr_jax.featurized import load_dataset
from sr_jax.training import trainer

log = logging.getLogger("sr_jax")
CONVERTERS = {"movielens": movielens.convert, "amazon": amazon.convert}


@dataclasses.dataclass(frozen=True)
class Grid:
    """models and datasets: name -> its overrides on the default config; `single_domain`: the models trained
    as one model per domain."""

    models: dict[str, list[str]]
    datasets: dict[str, list[str]]
    seeds: tuple[int, ...] = (0, 1, 2)
    single_domain: tuple[str, ...] = ()
    # (dataset, model) -> the tuned settings of that cell (configs/tuned), applied before the model's overrides
    tuned: dict[tuple[str, str], list[str]] = dataclasses.field(default_factory=dict)


def dataset_path(name: str, data_dir: Path, sources: dict[str, Path], encoder: str) -> str:
    """The store folder of a dataset ("" for the embedded one), converted and featurized on first use."""
    if name == "synthetic":
        return ""
    out = data_dir / name
    if not (out / "meta.json").exists():
        CONVERTERS[name](sources[name], out)
    dataset = open_dataset(out, check=False)
    if text_identity(encoder)[0] not in dataset.meta.text_caches:
        build_text_cache(out, get_featurizer(encoder))
    return str(out)


TIMES = ("compile_s", "train_s", "evaluate_s")  # eval.json's timing: compilation, training, test evaluation


def _row(result: dict, seconds: float) -> dict:
    """A cell's figures; `curve` ([step, validation score] pairs) is plotted, not tabulated."""
    chosen = result.get("validation", {})
    return {
        **report.eval_figures(result),
        "cold_auc": result.get("cold_items", {}).get("auc"),
        "valid_auc": chosen.get("score"),
        "step": chosen.get("step"),
        "seconds": seconds,
        **{key: result.get("timing", {}).get(key) for key in TIMES},
        **{f"auc:{name}": m["auc"] for name, m in result["domains"].items()},
        "curve": chosen.get("history", []),
    }


def run_grid(grid: Grid, workdir: str | Path, data_dir: str | Path, sources: dict[str, Path], overrides: list[str]):
    workdir, data_dir = Path(workdir), Path(data_dir)
    rows = []
    for dataset, dataset_overrides in grid.datasets.items():
        encoder = override(Config(), overrides).data.text_encoder
        path = dataset_path(dataset, data_dir, sources, encoder)
        for model, model_overrides in grid.models.items():
            for seed in grid.seeds:
                tuned = grid.tuned.get((dataset, model), [])
                cell_overrides = [*dataset_overrides, *tuned, *model_overrides, f"data.path={path}"]
                cfg = override(Config(), [*cell_overrides, f"train.seed={seed}", *overrides])
                cell = workdir / dataset / model / f"seed-{seed}"
                if model in grid.single_domain:
                    row = _single_domain(cfg, cell)
                else:
                    row = {**_row(*run_once(cell, trainer.fit, cfg)), "cell": str(cell)}
                log.info("%s / %s / seed %d: mean per-domain AUC %.4f", dataset, model, seed, row["auc"])
                command = [*cell_overrides, *overrides]  # the row's command, every override but the seed
                rows.append(dict(dataset=dataset, model=model, seed=seed, **row, overrides=command))
    return rows


def _single_domain(cfg: Config, cell: Path) -> dict:
    """One model per domain (each trained and evaluated on its domain alone); their per-domain AUCs. There
    is no overall or cold-item AUC: the per-domain models' scores are not on one scale."""
    dataset = load_dataset(cfg.data)
    row = {"auc": None, "overall_auc": None, "cold_auc": None, "seconds": 0.0, "curve": []}
    for name in run_domains(cfg.data, dataset.meta):
        one = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, domains=(name,)))
        result, seconds = run_once(cell / name, trainer.fit, one)
        row[f"auc:{name}"] = result["domains"][name]["auc"]
        row["seconds"] += seconds
        for key in TIMES:  # the per-domain models' times add up
            row[key] = (row.get(key) or 0.0) + (result.get("timing", {}).get(key) or 0.0)
    row["auc"] = float(np.mean([v for k, v in row.items() if k.startswith("auc:")]))
    return row


def paired(rows: list[dict], dataset: str, a: str, b: str) -> dict | None:
    """Model a − model b on a dataset, paired by seed over each run's mean per-domain test AUC (the runs are the
    independent units: the domains of one run share its initialisation and data order, so they are not), with
    the bootstrap interval over test users (`report.paired_runs`). The per-domain wins over (seed, domain) pairs
    come along as description (`domain_wins`), never as a test."""

    def by_seed(model):
        return {r["seed"]: r for r in rows if r["dataset"] == dataset and r["model"] == model}

    def per_domain(model):
        return {
            (s, k): v for s, r in by_seed(model).items() for k, v in r.items() if k.startswith("auc:") and v is not None
        }

    result = report.paired_runs(by_seed(a), by_seed(b))
    if result is not None:
        domains_a, domains_b = per_domain(a), per_domain(b)
        shared = set(domains_a) & set(domains_b)
        result["domain_wins"] = f"{sum(domains_a[k] > domains_b[k] for k in shared)}/{len(shared)}"
    return result


def _commands(rows: list[dict], single_domain: tuple[str, ...]) -> list[str]:
    """The command of every row of a dataset's table (one cell: add train.seed=S), in a folded block."""
    lines = ["<details><summary>The command of each row (add <code>train.seed=S</code> for seed S)</summary>", ""]
    lines += ["```bash"]
    for model, overrides in dict.fromkeys((r["model"], tuple(r["overrides"])) for r in rows):
        per_domain = " data.domains=DOMAIN  # once per domain" if model in single_domain else ""
        lines.append(f"# {model}\npython -m train.pretrain --workdir runs/{model} {shlex.join(overrides)}{per_domain}")
    return [*lines, "```", "", "</details>", ""]


def write_report(
    rows: list[dict],
    out: str | Path,
    command: str,
    comparisons: tuple[tuple[str, str, str], ...] = (),
    tuned: dict[tuple[str, str], list[str]] | None = None,
    single_domain: tuple[str, ...] = (),
) -> list[dict]:
    """out/RESULTS.md, out/results/results.csv (every model x dataset, mean and spread), one bar chart and one
    chart of seed 0's validation curves per dataset in out/results/. `comparisons`: (label, model a, model b)
    tested per dataset, paired by seed and domain; `tuned`: (dataset, model) -> the tuned settings, listed.
    A hand-written out/results/analysis.md, where present, is kept in RESULTS.md (after the command), so
    regenerating the tables never loses the reading of them."""
    out = Path(out)
    (out / "results").mkdir(parents=True, exist_ok=True)
    skip = ("dataset", "model", "seed", "curve", "overrides", "cell")
    metrics = list(dict.fromkeys(k for r in rows for k in r if k not in skip))
    table = report.aggregate(rows, ("dataset", "model"), metrics)
    report.write_csv(out / "results" / "results.csv", table)
    lines = [
        *report.header("Results: the full model, its ablations and the baselines", command),
        f"Test-split AUC, mean ± sample std over {max(r['seeds'] for r in table)} seeds (`train.seed`; the data "
        "are the same), of each run's best validated step; the best mean of each column in bold. `single-domain` "
        "trains one Shared-Bottom DNN per domain, so it has per-domain AUCs only. `valid` is the chosen step's "
        "validation AUC, `step` the chosen step. Times (CPU here): the train step's compilation, training (with its "
        "validations), the test evaluation, and the whole cell's wall time (data loading included). "
        "Per-cell numbers: `results/results.csv`.",
    ]
    analysis = out / "results" / "analysis.md"
    if analysis.exists():
        lines += ["", analysis.read_text().strip()]
    for dataset in dict.fromkeys(r["dataset"] for r in table):
        part = [r for r in table if r["dataset"] == dataset]
        domains = [m[len("auc:") :] for m in metrics if m.startswith("auc:") and any(r.get(f"{m}_mean") for r in part)]
        columns = [("mean per-domain AUC", "auc"), ("overall AUC", "overall_auc"), ("cold-item AUC", "cold_auc")]
        columns += [(d, f"auc:{d}") for d in domains]
        columns += [("log loss", "log_loss"), ("NDCG@10", "ndcg@10"), ("MRR", "mrr"), ("PCOC", "pcoc"), ("ECE", "ece")]
        calibrated = [("calibrated log loss", "calibrated_log_loss"), ("calibrated ECE", "calibrated_ece")]
        columns += [(label, m) for label, m in calibrated if any(r.get(f"{m}_mean") is not None for r in part)]
        columns += [("valid", "valid_auc"), ("step", "step")]
        columns += [("compile s", "compile_s"), ("train s", "train_s"), ("eval s", "evaluate_s"), ("cell s", "seconds")]
        lines += ["", f"## {dataset}", "", f"![mean per-domain AUC](results/{dataset}.png)", ""]
        lines += _commands([r for r in rows if r["dataset"] == dataset], single_domain)
        lines.append(report.wide_markdown(part, "model", columns))
        tests = [(label, paired(rows, dataset, a, b)) for label, a, b in comparisons]
        if any(t for _, t in tests):
            lines += [
                "Paired by seed (each run's mean per-domain test AUC of a − b; the per-domain wins describe, they "
                "do not test):",
                "",
                report.paired_markdown(tests),
            ]
        settings = {m: s for (d, m), s in (tuned or {}).items() if d == dataset and s}
        if settings:
            lines += ["Tuned settings (configs/tuned/):", "", "| model | settings |", "|---|---|"]
            lines += [f"| {m} | `{' '.join(s)}` |" for m, s in settings.items()] + [""]
        first_seed = min(r["seed"] for r in rows if r["dataset"] == dataset)
        first = [r for r in rows if (r["dataset"], r["seed"]) == (dataset, first_seed)]
        curves = {r["model"]: r["curve"] for r in first if r["curve"]}
        if curves:
            report.plot_curves(out / "results" / f"{dataset}-validation.png", curves, dataset, "validation AUC")
            lines += [f"![validation curves, first seed](results/{dataset}-validation.png)", ""]
        report.plot_bars(out / "results" / f"{dataset}.png", part, "model", "auc", dataset, "mean per-domain AUC")
    (out / "RESULTS.md").write_text("\n".join(lines))
    return table
