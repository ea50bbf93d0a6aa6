"""Results of many runs -> mean and spread over seeds -> markdown, CSV and PNG.

A result row is a flat dict: the setting's keys (e.g. protocol, setting, fraction), `seed`, and
metrics. `aggregate` groups rows by the keys and gives `METRIC_mean`, `METRIC_std` (sample standard
deviation; 0 for one seed) and `seeds` per group.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from sr_jax.experiments import bootstrap

RANKING = ("log_loss", "ndcg@10", "hr@10", "mrr", "pcoc", "ece")  # eval.json's overall ranking and calibration
BUDGET = ("train_examples", "valid_examples")  # the labels a run trained on and chose its step on
CALIBRATED = ("calibrated_log_loss", "calibrated_pcoc", "calibrated_ece")  # after the run's calibration.json


def eval_figures(result: dict) -> dict:
    """What every grid reads from a run's eval.json: the mean per-domain and overall AUC, the overall ranking and
    calibration metrics (None where the data have no candidate lists), the calibration metrics after the run's
    calibration (None where it has none), and the labelled budget."""
    return {
        "auc": result["mean_domain_auc"],
        "overall_auc": result["overall"]["auc"],
        **{key: result["overall"].get(key) for key in RANKING},
        **{key: result["overall"].get("calibrated", {}).get(key.removeprefix("calibrated_")) for key in CALIBRATED},
        **{key: result.get("budget", {}).get(key) for key in BUDGET},
    }


def header(title: str, command: str) -> list[str]:
    """A report's first lines: its title and the command that made it."""
    return [f"# {title}", "", "Made by:", "", "```bash", command, "```", ""]


def aggregate(rows: Sequence[dict], keys: Sequence[str], metrics: Sequence[str]) -> list[dict]:
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault(tuple(row[k] for k in keys), []).append(row)
    out = []
    for group_key, members in groups.items():
        agg = dict(zip(keys, group_key), seeds=len(members))
        for m in metrics:
            values = np.array([r[m] for r in members if r.get(m) is not None], float)
            agg[f"{m}_mean"] = float(values.mean()) if len(values) else None
            agg[f"{m}_std"] = float(values.std(ddof=1)) if len(values) > 1 else 0.0 if len(values) else None
        out.append(agg)
    return out


def write_csv(path: str | Path, rows: Sequence[dict]) -> None:
    fields = list(dict.fromkeys(k for row in rows for k in row))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def pivot_markdown(
    rows: Sequence[dict], row_keys: Sequence[str], column_key: str, metric: str, column_label=str
) -> str:
    """A markdown table: one line per distinct `row_keys`, one column per value of `column_key`, cells
    "mean ± std" of `metric`; the best mean of each column in bold."""
    columns = sorted({r[column_key] for r in rows})
    lines = list(dict.fromkeys(tuple(r[k] for k in row_keys) for r in rows))
    cell = {(tuple(r[k] for k in row_keys), r[column_key]): r for r in rows}
    best = {
        c: max(
            (r[f"{metric}_mean"] for r in rows if r[column_key] == c and r[f"{metric}_mean"] is not None), default=None
        )
        for c in columns
    }
    out = [
        "| " + " | ".join([*row_keys, *(column_label(c) for c in columns)]) + " |",
        "|" + "---|" * (len(row_keys) + len(columns)),
    ]
    for line in lines:
        cells = []
        for c in columns:
            r = cell.get((line, c))
            if r is None or r[f"{metric}_mean"] is None:
                cells.append("")
                continue
            text = f"{r[f'{metric}_mean']:.4f} ± {r[f'{metric}_std']:.4f}"
            cells.append(f"**{text}**" if r[f"{metric}_mean"] == best[c] else text)
        out.append("| " + " | ".join([*map(str, line), *cells]) + " |")
    return "\n".join(out) + "\n"


def plot_lines(
    path: str | Path,
    panels: dict[str, list[dict]],
    x: str,
    metric: str,
    series: Sequence[str],
    style_key: str | None = None,
    xlabel: str = "",
    ylabel: str = "",
    logx: bool = False,
    references: dict[str, tuple[str, float]] | None = None,
) -> None:
    """One subplot per panel; one line (mean, with ± std error bars) per distinct value of `series`
    keys; `style_key`'s values alternate solid and dashed lines; `references[panel]` = (label, y) draws
    a horizontal dotted line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels) + 2, 4.5), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    firsts = dict.fromkeys(r[series[0]] for rows in panels.values() for r in rows)
    color_of = {n: colors[i % len(colors)] for i, n in enumerate(firsts)}  # the same in every panel
    for ax, (title, rows) in zip(axes[0], panels.items()):
        names = list(dict.fromkeys(tuple(r[k] for k in series) for r in rows))
        styles = list(dict.fromkeys(r[style_key] for r in rows)) if style_key else []
        for name in names:
            points = sorted(
                (r for r in rows if tuple(r[k] for k in series) == name and r[f"{metric}_mean"] is not None),
                key=lambda r: r[x],
            )
            style = "-" if not style_key else ["-", "--", ":", "-."][styles.index(points[0][style_key]) % 4]
            ax.errorbar(
                [r[x] for r in points],
                [r[f"{metric}_mean"] for r in points],
                yerr=[r[f"{metric}_std"] for r in points],
                label=" / ".join(map(str, name)),
                color=color_of[name[0]],
                linestyle=style,
                marker="o",
                markersize=3,
                capsize=2,
            )
        if references and title in references:
            label, y = references[title]
            ax.axhline(y, color="gray", linestyle=":", label=label)
        if logx:
            ax.set_xscale("log")
        ax.set(title=title, xlabel=xlabel or x, ylabel=ylabel or metric)
        ax.grid(alpha=0.3)
    handles = {h.get_label(): h for ax in axes[0] for h in ax.get_legend_handles_labels()[0]}
    legend = fig.legend(handles.values(), handles.keys(), loc="center right", fontsize=8)
    fig.canvas.draw()  # the legend's width in inches, so that the panels end where it begins
    legend_inches = legend.get_window_extent().width / fig.dpi + 0.1
    fig.tight_layout(rect=(0, 0, 1 - legend_inches / fig.get_figwidth(), 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def wide_markdown(
    rows: Sequence[dict], key: str, columns: Sequence[tuple[str, str]], digits: int = 4, bold: bool = True
) -> str:
    """One line per row (named by `key`), one column per (label, metric): "mean ± std" (steps, seconds and example
    counts: the mean alone), the best mean of each AUC column in bold (unless not `bold`: rows that are not
    rivals); empty where a row has no value."""
    best = {
        m: max((r[f"{m}_mean"] for r in rows if r.get(f"{m}_mean") is not None), default=None)
        for _, m in columns
        if "auc" in m and bold
    }
    out = ["| " + " | ".join([key, *(label for label, _ in columns)]) + " |", "|" + "---|" * (len(columns) + 1)]
    for r in rows:
        cells = []
        for _, m in columns:
            mean, std = r.get(f"{m}_mean"), r.get(f"{m}_std")
            if mean is None:
                cells.append("")
                continue
            whole = m in ("step", "seconds") or m.endswith(("_s", "_examples"))  # counts and seconds: no decimals
            text = f"{mean:.0f}" if whole else f"{mean:.{digits}f} ± {std:.{digits}f}"
            cells.append(f"**{text}**" if best.get(m) is not None and mean == best[m] else text)
        out.append("| " + " | ".join([str(r[key]), *cells]) + " |")
    return "\n".join(out) + "\n"


def plot_bars(path: str | Path, rows: Sequence[dict], key: str, metric: str, title: str, xlabel: str) -> None:
    """Horizontal bars of `metric` (mean ± std), one per row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r.get(f"{metric}_mean") is not None]
    fig, ax = plt.subplots(figsize=(7, 0.35 * len(rows) + 1.2))
    means = [r[f"{metric}_mean"] for r in rows]
    ax.barh(range(len(rows)), means, xerr=[r[f"{metric}_std"] for r in rows], capsize=2, color="#4c72b0")
    ax.set_yticks(range(len(rows)), [str(r[key]) for r in rows], fontsize=8)
    ax.invert_yaxis()
    low = min(means)
    ax.set_xlim(max(0.0, low - 0.05), min(1.0, max(means) + 0.02))
    ax.set(title=title, xlabel=xlabel)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def t_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): the mean of `values` (e.g. paired differences over seeds) and its two-sided `level`
    Student-t interval; NaN bounds below two values. What the docs' evidence scripts report over seeds."""
    from scipy import stats

    v = np.asarray(values, float)
    if len(v) < 2:
        return float(v.mean()) if len(v) else float("nan"), float("nan"), float("nan")
    half = stats.t.ppf((1 + level) / 2, len(v) - 1) * v.std(ddof=1) / np.sqrt(len(v))
    return float(v.mean()), float(v.mean() - half), float(v.mean() + half)


def paired_test(a: dict, b: dict) -> dict | None:
    """a − b over the keys both have, each key an independent pair of runs (a seed, or a (fraction, seed) cell:
    the same seed gives both the same initialisation and data order): the mean difference, its pairs, how many
    favour a, and two-sided p-values of the paired t-test and of Wilcoxon's signed-rank test (scipy; None below 2
    pairs or when every difference is 0). Never pair the domains of one run: they are not independent."""
    from scipy import stats

    keys = sorted(set(a) & set(b))
    if not keys:
        return None
    diffs = np.array([a[k] - b[k] for k in keys], float)
    varied = len(diffs) > 1 and np.any(diffs != diffs[0])
    return {
        "diff": float(diffs.mean()),
        "pairs": len(diffs),
        "wins": int((diffs > 0).sum()),
        "p_t": float(stats.ttest_rel([a[k] for k in keys], [b[k] for k in keys]).pvalue) if varied else None,
        "p_wilcoxon": float(stats.wilcoxon(diffs).pvalue) if varied and np.any(diffs) else None,
    }


def paired_runs(a: dict, b: dict, metric: str = "auc") -> dict | None:
    """`paired_test` of the rows' `metric` (a, b: pair key -> a cell's row), with `ci`, the 95% bootstrap interval
    of the same difference over the test split's users (`bootstrap.interval`, from the paired cells' scores;
    None where a cell wrote none)."""
    result = paired_test({k: r[metric] for k, r in a.items()}, {k: r[metric] for k, r in b.items()})
    if result is not None:
        keys = sorted(set(a) & set(b))
        cells = [[side[k].get("cell") for k in keys] for side in (a, b)]
        result["ci"] = None if None in cells[0] + cells[1] else bootstrap.interval(*cells)
    return result


def paired_markdown(comparisons: Sequence[tuple[str, dict | None]]) -> str:
    """One line per (label, paired_test result): difference, its interval over test users, wins of pairs,
    p-values."""

    def p(value):
        return "" if value is None else f"{value:.3f}" if value >= 0.001 else "<0.001"

    def ci(r):
        return "" if r.get("ci") is None else f"[{r['ci'][0]:+.4f}, {r['ci'][1]:+.4f}]"

    domains = any(r is not None and "domain_wins" in r for _, r in comparisons)
    head = "| comparison | mean difference | 95% CI (users) | pairs won | p (paired t) | p (Wilcoxon) |" + (
        " domains won (description) |" if domains else ""
    )
    out = [head, "|---|---|---|---|---|---|" + ("---|" if domains else "")]
    for label, r in comparisons:
        if r is not None:
            won = f"{r['wins']}/{r['pairs']}"
            extra = f" {r.get('domain_wins', '')} |" if domains else ""
            out.append(
                f"| {label} | {r['diff']:+.4f} | {ci(r)} | {won} | {p(r['p_t'])} | {p(r['p_wilcoxon'])} |{extra}"
            )
    return "\n".join(out) + "\n"


def plot_curves(path: str | Path, curves: dict[str, Sequence[Sequence[float]]], title: str, ylabel: str) -> None:
    """One line per name of its [step, score] points (e.g. a validation curve), a marker at its best."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    palette = plt.get_cmap("tab20").colors  # 20 distinct colours: a grid's models do not share one
    for i, (name, points) in enumerate(curves.items()):
        if not points:
            continue
        steps, scores = np.array(points, float).T
        style = "-" if i < len(palette) else "--"
        (line,) = ax.plot(steps, scores, style, marker="o", markersize=2, label=name, color=palette[i % len(palette)])
        best = int(np.argmax(scores))
        ax.plot(steps[best], scores[best], marker="*", markersize=10, color=line.get_color())
    ax.set(title=title, xlabel="step", ylabel=ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
