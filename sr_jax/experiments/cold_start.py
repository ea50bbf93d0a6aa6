"""The cold-start comparison of docs/DESIGN.md: does pretraining, then fine-tuning with frozen levels, beat
training on the cold data alone?

For every text setting (language-model text aspect on / off) and seed, one model is pretrained on the
known domains. Then, for each protocol (a domain held out of pretraining; new items in the known
domains) and each fraction of the protocol's training split, four settings are trained and evaluated
on the protocol's test split:

    scratch        a fresh model trained on the cold data alone
    finetune-all   the pretrained model, every level trained
    freeze-l0      the pretrained model, L0 (embeddings, text projection) frozen
    freeze-l0-l1   the pretrained model, L0 and L1 frozen (the paper's best)

and the pretrained model evaluated as it is (`zero-shot`: no step, no label; a new domain through the
pretrained domain it starts from), reported as the 0 fraction. Each fine-tuned setting runs in every chosen
variant (VARIANTS: the defaults; no alignment against the pretrained domains' reference; a replay of
pretraining examples in every batch; a new domain started fresh or from the mean of its task's domains; LP-FT;
a lower learning rate for the pretrained parameters; L2-SP; a fixed schedule; the result blended less with, or
not with, the zero-shot model). Every run is a folder under the work folder; a
finished run is not run again, so the grid resumes.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np

from sr_jax.config import Config, override
from sr_jax.experiments import report
from sr_jax.experiments.cells import run_once
from sr_jax.training import trainer
from sr_jax.training.spec import versus_scratch
from sr_jax.data import synthetic
from sr_jax.data.schema import DatasetMeta
from sr_jax.protocols import PROTOCOLS, ZERO_SHOT, finetune_config, protocol_splits, zero_shot

log = logging.getLogger("sr_jax")

SETTINGS = {"scratch": (), "finetune-all": (), "freeze-l0": ("l0",), "freeze-l0-l1": ("l0", "l1")}
VARIANTS = {  # what a fine-tune (and zero-shot, where it reads it) changes; scratch has nothing to change
    "default": [],  # the defaults: aligned against the pretrained domains' reference distributions, ...
    "no-align": ["finetune.align_reference=false"],
    "replay": ["finetune.replay_fraction=0.25"],
    "fresh-domain": ["finetune.new_domain_init=fresh"],
    "match-domain": ["finetune.new_domain_init=match"],
    "mean-domain": ["finetune.new_domain_init=mean"],
    "lp-ft": ["finetune.probe_steps=50"],
    "low-lr": ["finetune.pretrained_lr=0.1"],
    "l2sp": ["finetune.l2sp_weight=0.01"],
    "fixed-schedule": ["train.eval_every=0"],  # no validation: the schedule's last step (a selection rule)
    "no-blend": ["finetune.zero_shot_weight=0"],  # a new domain's result not blended with its zero-shot model
    "half-blend": ["finetune.zero_shot_weight=0.5"],
}
# Derived, not run: what `train.finetune` (the default) keeps where it differs from finetune-all (`versus_scratch`:
# the new data outnumber pretraining's, so it also trains scratch and keeps the better on validation). Its two
# candidates are the grid's finetune-all and scratch cells of the same fraction and seed (the same configs).
DEFAULT_PATH = "finetune"
KEYS = ("protocol", "text", "setting", "variant", "fraction")
METRICS = ("auc", "overall_auc", "oracle_auc", *report.RANKING, *report.CALIBRATED, *report.BUDGET, "seconds")


@dataclasses.dataclass(frozen=True)
class Grid:
    seeds: tuple[int, ...] = (0, 1, 2)
    fractions: tuple[float, ...] = (0.01, 0.05, 0.2, 1.0)
    protocols: tuple[str, ...] = tuple(PROTOCOLS)
    settings: tuple[str, ...] = tuple(SETTINGS)
    text: tuple[bool, ...] = (True, False)
    variants: tuple[str, ...] = ("default",)
    history: tuple[int, ...] = (-1,)  # model.user_history settings (0: none; -1: the default, auto)
    finetune_data: str = ""  # the cold data as a dataset prepared apart (default: the pretraining dataset's splits)
    splits: tuple[str, str] | None = None  # its (train, eval) splits (default: protocols.protocol_splits)

    def __post_init__(self):
        unknown = (
            [s for s in self.settings if s not in SETTINGS]
            + [p for p in self.protocols if p not in PROTOCOLS]
            + [v for v in self.variants if v not in VARIANTS]
        )
        if unknown:
            raise ValueError(
                f"unknown settings, protocols or variants {unknown}: expected {list(SETTINGS)}, {list(PROTOCOLS)} "
                f"and {list(VARIANTS)}"
            )


def _on(text: bool) -> str:
    return "on" if text else "off"


def pretrain_config(base: Config, text: bool, seed: int, history: int = 0) -> Config:
    return dataclasses.replace(
        base,
        model=dataclasses.replace(base.model, use_text=text, user_history=history),
        train=dataclasses.replace(base.train, seed=seed),
    )


def grid_splits(grid: Grid, pretrained: Config, protocol: str) -> tuple[str, str]:
    path = grid.finetune_data or pretrained.data.path
    names = DatasetMeta.read(path).splits if path else synthetic.SPLITS
    return grid.splits or protocol_splits(names, protocol)


def cell_config(
    pretrained: Config,
    pretrained_dir: Path,
    protocol: str,
    setting: str,
    variant: str,
    fraction: float,
    overrides: list[str],
    splits: tuple[str, str] | None = None,
    data_path: str | None = None,
) -> Config:
    """A fine-tune (or scratch, or zero-shot) run: the fine-tune config on top of the pretrained config (on
    `data_path`'s `splits` when given), the setting's frozen levels, the variant, the fraction, then
    `overrides`."""
    cfg = finetune_config(pretrained, protocol, splits, data_path)
    cfg = dataclasses.replace(
        cfg,
        data=dataclasses.replace(cfg.data, train_fraction=fraction),
        finetune=dataclasses.replace(
            cfg.finetune,
            pretrained="" if setting == "scratch" else str(pretrained_dir.absolute()),
            freeze=SETTINGS.get(setting, ()),
        ),
    )
    cfg = zero_shot(cfg) if setting == ZERO_SHOT else cfg
    return override(cfg, [*([] if setting == "scratch" else VARIANTS[variant]), *overrides])


def _cached(workdir: Path, run, cfg: Config) -> dict:
    result, seconds = run_once(workdir, run, cfg)
    return {
        **report.eval_figures(result),
        "oracle_auc": result.get("mean_domain_oracle_auc"),
        "seconds": seconds,
        "curve": result.get("validation", {}).get("history", []),  # [step, validation score]: plotted
        "valid_auc": result.get("validation", {}).get("score"),  # the chosen step's, and the step
        "step": result.get("validation", {}).get("step"),
        "cell": str(workdir),  # its scores: bootstrap intervals
    }


def aspects(grid: Grid) -> list[tuple[bool, int, str]]:
    """(text, history, folder name) of every content setting the grid pretrains: a history needs text, so with
    text off only no history (0) and the default (-1, which resolves to none without text) run."""
    return [
        (t, h, f"text-{_on(t)}" + ({0: "", -1: "-history-auto"}.get(h, f"-history-{h}")))
        for t in grid.text
        for h in grid.history
        if t or h <= 0
    ]


def run_grid(base: Config, grid: Grid, workdir: str | Path, finetune_overrides: list[str] = ()) -> list[dict]:
    """Runs (or reuses) every cell; returns one row per cell and seed, and a DEFAULT_PATH row where the default
    command keeps other than finetune-all (`default_path`)."""
    workdir = Path(workdir)
    rows, versus = [], []
    tuned = [s for s in grid.settings if s != "scratch"]
    zero = len(grid.variants) if tuned else 0  # zero-shot: one cell per variant, whatever the fraction
    per_protocol = (len(tuned) * len(grid.variants) + (len(grid.settings) - len(tuned))) * len(grid.fractions) + zero
    cells = len(aspects(grid)) * len(grid.seeds) * (1 + len(grid.protocols) * per_protocol)
    done = 0

    def run_cell(folder: Path, cfg: Config, **keys) -> None:
        nonlocal done
        row = _cached(folder, trainer.fit, cfg)
        done += 1
        log.info("[%d/%d] %s: mean per-domain AUC %.4f (%.0f s)", done, cells, folder, row["auc"], row["seconds"])
        if keys:
            rows.append({**keys, **row})

    for text, history, aspect in aspects(grid):
        for seed in grid.seeds:
            pre_cfg = pretrain_config(base, text, seed, history)
            pre_dir = workdir / "pretrain" / aspect / f"seed-{seed}"
            run_cell(pre_dir, pre_cfg)
            for protocol in grid.protocols:
                splits = grid_splits(grid, pre_cfg, protocol)
                data = grid.finetune_data or None
                common = dict(protocol=protocol, text=aspect[len("text-") :], seed=seed)
                for variant in grid.variants if tuned else ():
                    name = ZERO_SHOT if variant == "default" else f"{ZERO_SHOT}+{variant}"
                    overrides = list(finetune_overrides)
                    cfg = cell_config(pre_cfg, pre_dir, protocol, ZERO_SHOT, variant, 1.0, overrides, splits, data)
                    folder = workdir / protocol / aspect / name / f"seed-{seed}"
                    run_cell(folder, cfg, **common, setting=ZERO_SHOT, variant=variant, fraction=0.0)
                for setting in grid.settings:
                    for variant in grid.variants if setting != "scratch" else ("-",):
                        for fraction in grid.fractions:
                            overrides = list(finetune_overrides)
                            cfg = cell_config(pre_cfg, pre_dir, protocol, setting, variant, fraction, overrides, splits,
                                              data)  # fmt: skip
                            name = setting if variant in ("-", "default") else f"{setting}+{variant}"
                            folder = workdir / protocol / aspect / name / f"fraction-{fraction:g}" / f"seed-{seed}"
                            run_cell(folder, cfg, **common, setting=setting, variant=variant, fraction=fraction)
                            if (setting, variant) == ("finetune-all", "default") and versus_scratch(cfg):
                                versus.append({**common, "fraction": fraction})
    return rows + default_path(rows, versus)


def default_path(rows: list[dict], versus: list[dict]) -> list[dict]:
    """DEFAULT_PATH rows: at each of `versus` (protocol, text, seed, fraction: where `train.finetune` also trains
    scratch), the grid's finetune-all or scratch cell, whichever validated better, with `kept` saying which; none
    where the grid has no scratch cell there."""

    def cell(setting: str, variant: str, at: dict) -> dict | None:
        return next((r for r in rows if (r["setting"], r["variant"]) == (setting, variant)
                     and all(r[k] == v for k, v in at.items())), None)  # fmt: skip

    out = []
    for at in versus:
        tuned, scratch = cell("finetune-all", "default", at), cell("scratch", "-", at)
        if tuned is not None and scratch is not None:
            kept = scratch if scratch["valid_auc"] > tuned["valid_auc"] else tuned
            out.append({**kept, "setting": DEFAULT_PATH, "variant": "default", "kept": kept["setting"]})
    return out


def paired_gains(rows: list[dict]) -> list[dict]:
    """Each fine-tuned cell's AUC minus scratch's on the same protocol, text setting, fraction and seed (the
    seed draws both the fraction's subset and the init): rows with "gain" in place of the metrics."""
    scratch = {
        (r["protocol"], r["text"], r["fraction"], r["seed"]): r["auc"] for r in rows if r["setting"] == "scratch"
    }
    return [
        {**{k: r[k] for k in (*KEYS, "seed")}, "gain": r["auc"] - scratch[key]}
        for r in rows
        if r["setting"] not in ("scratch", ZERO_SHOT)
        and (key := (r["protocol"], r["text"], r["fraction"], r["seed"])) in scratch
    ]


def paired_settings(rows: list[dict], protocol: str) -> list[tuple[str, dict | None]]:
    """The claims a cold-start table tests, paired by (fraction, seed) over a protocol's mean per-domain AUCs:
    every fine-tune setting and zero-shot − scratch (does pretraining help?), every fine-tune setting −
    zero-shot (does fine-tuning help?), and freeze-l0-l1 (the paper's best) − every other fine-tune setting,
    within each text setting and variant (zero-shot, which reads no label, pairs with every fraction)."""

    fractions = sorted({r["fraction"] for r in rows if r["protocol"] == protocol and r["setting"] != ZERO_SHOT})

    def auc(setting, variant, text):  # (fraction, seed) -> row; zero-shot's, at every fraction (it reads none)
        mine = [
            r for r in rows
            if r["protocol"] == protocol and (r["setting"], r["variant"], r["text"]) == (setting, variant, text)
        ]  # fmt: skip
        if setting == ZERO_SHOT:
            return {(f, r["seed"]): r for r in mine for f in fractions}
        return {(r["fraction"], r["seed"]): r for r in mine}

    cells = list(dict.fromkeys((r["setting"], r["variant"], r["text"]) for r in rows if r["protocol"] == protocol))
    out = []
    for setting, variant, text in cells:
        if setting != "scratch":
            label = f"{setting} ({variant}, text {text}) − scratch"
            out.append((label, report.paired_runs(auc(setting, variant, text), auc("scratch", "-", text))))
    for setting, variant, text in cells:
        if setting not in ("scratch", ZERO_SHOT) and (zero := auc(ZERO_SHOT, variant, text)):
            test = report.paired_runs(auc(setting, variant, text), zero)
            out.append((f"{setting} ({variant}, text {text}) − zero-shot", test))
    for setting, variant, text in cells:
        if setting not in ("scratch", ZERO_SHOT, "freeze-l0-l1"):
            test = report.paired_runs(auc("freeze-l0-l1", variant, text), auc(setting, variant, text))
            out.append((f"freeze-l0-l1 − {setting} ({variant}, text {text})", test))
    return out


def _curves(rows: list[dict], protocol: str) -> dict[str, list]:
    """setting -> the validation curve of its cell with the first seed and the largest fraction."""
    mine = [r for r in rows if r["protocol"] == protocol and r.get("curve")]
    if not mine:
        return {}
    seed, fraction = min(r["seed"] for r in mine), max(r["fraction"] for r in mine)

    def name(r):
        return " / ".join(x for x in (r["setting"], r["variant"], f"text {r['text']}") if x not in ("-", "default"))

    return {name(r): r["curve"] for r in mine if r["seed"] == seed and r["fraction"] == fraction}


def write_report(
    rows: list[dict], out: str | Path, command: str, splits: dict[str, tuple[str, str]] | None = None
) -> list[dict]:
    """cold_start.csv (every cell's mean and spread), cold_start.md (tables), cold_start.png (AUC against
    the fraction of cold data, one panel per protocol)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    table = report.aggregate(rows, KEYS, METRICS)
    report.write_csv(out / "cold_start.csv", table)
    gain_table = report.aggregate(paired_gains(rows), KEYS, ("gain",))
    lines = [
        *report.header("Cold start: pretrain, then fine-tune with frozen levels", command),
        "Mean per-domain AUC on each protocol's test split, mean ± sample std over "
        f"{max(r['seeds'] for r in table)} seeds; columns are the fraction of the protocol's training split "
        "used; the best mean of each column is bold. Per-cell numbers, overall AUC and wall time: "
        "`cold_start.csv`.",
    ]
    protocols = list(dict.fromkeys(r["protocol"] for r in table))
    oracle = {p: _oracle([r for r in table if r["protocol"] == p]) for p in protocols}
    for protocol in protocols:
        train_split, eval_split = (splits or PROTOCOLS)[protocol]
        lines += [
            "",
            f"## {protocol} (train `{train_split}`, evaluate `{eval_split}`)",
            "",
            *([f"Oracle (the true click probabilities): {oracle[protocol]:.4f}.", ""] if oracle[protocol] else []),
            report.pivot_markdown(
                [r for r in table if r["protocol"] == protocol],
                ("setting", "variant", "text"),
                "fraction",
                "auc",
                column_label=lambda f: f"{f:g}",
            ),
        ]
        if kept := [r for r in rows if r["protocol"] == protocol and r["setting"] == DEFAULT_PATH]:
            scratch = sum(r["kept"] == "scratch" for r in kept)
            lines += [
                "",
                f"`{DEFAULT_PATH}`: what the default `train.finetune` keeps where it differs from finetune-all "
                "(the new data hold more training rows than pretraining had, `finetune.scratch_above`: it also "
                "trains scratch and keeps the better on validation), from the finetune-all and scratch cells of the "
                f"same fraction and seed: scratch kept in {scratch} of {len(kept)} cells.",
            ]
        if gains := [g for g in gain_table if g["protocol"] == protocol]:
            lines += [
                "",
                "Gain over scratch, paired by seed (the fine-tuned cell's AUC minus scratch's with the same seed, "
                "mean ± sample std):",
                "",
                report.pivot_markdown(
                    gains, ("setting", "variant", "text"), "fraction", "gain", column_label=lambda f: f"{f:g}"
                ),
            ]
        lines += ["", *_ranking_table([r for r in table if r["protocol"] == protocol])]
        run = [r for r in rows if r["setting"] != DEFAULT_PATH]  # the cells run (a DEFAULT_PATH row repeats one)
        lines += ["", *_selection_table([r for r in run if r["protocol"] == protocol])]
        if curves := _curves(run, protocol):
            report.plot_curves(out / f"{protocol}-validation.png", curves, protocol, "validation AUC")
            title = "Validation curves of the first seed with the largest fraction (a star at the chosen step):"
            lines += ["", title, "", f"![validation curves]({protocol}-validation.png)"]
        if tests := [t for t in paired_settings(rows, protocol) if t[1] is not None]:
            title = "Paired by fraction and seed (mean per-domain AUC of a − b):"
            lines += ["", title, "", report.paired_markdown(tests)]
    (out / "cold_start.md").write_text("\n".join(lines))
    panels = {p: [r for r in table if r["protocol"] == p] for p in protocols}
    report.plot_lines(
        out / "cold_start.png",
        panels,
        x="fraction",
        metric="auc",
        series=("setting", "variant", "text"),
        style_key="variant" if len({r["variant"] for r in table} - {"-"}) > 1 else "text",
        xlabel="fraction of the cold training split",
        ylabel="mean per-domain AUC",
        logx=True,
        references={p: ("oracle", v) for p, v in oracle.items() if v},
    )
    return table


CALIBRATED_COLUMNS = (("calibrated log loss", "calibrated_log_loss"), ("calibrated PCOC", "calibrated_pcoc"),
                      ("calibrated ECE", "calibrated_ece"))  # fmt: skip


def _ranking_table(table: list[dict]) -> list[str]:
    """Every cell's log loss, ranking over candidate lists and calibration (overall, mean ± std over seeds), with
    the labels it trained on and chose its step on (its budget; the zero-shot model's are pretraining's)."""
    columns = [("AUC", "auc"), ("log loss", "log_loss")]
    columns += [(label, m) for label, m in (("NDCG@10", "ndcg@10"), ("MRR", "mrr")) if _any(table, m)]
    columns += [
        ("PCOC", "pcoc"),
        ("ECE", "ece"),
        *[(label, m) for label, m in CALIBRATED_COLUMNS if _any(table, m)],
        ("train labels", "train_examples"),
        ("valid labels", "valid_examples"),
    ]
    key = "setting / variant / text / fraction"
    named = [
        {key: " / ".join(str(r[k]) for k in ("setting", "variant", "text")) + f" / {r['fraction']:g}", **r}
        for r in sorted(table, key=lambda r: (r["fraction"], r["text"], r["setting"], r["variant"]))
    ]
    return [
        "Ranking over the candidate lists (NDCG@10, MRR: one positive among sampled negatives, where the data have "
        "them), calibration (PCOC: predicted over observed click rate; ECE: expected calibration error; calibrated: "
        "after the cell's calibration.json, fitted on its validation data) and the labels each cell trained and "
        "chose its step on, overall on the test split:",
        "",
        report.wide_markdown(named, key, columns, bold=False),
    ]


def _selection_table(rows: list[dict]) -> list[str]:
    """How well a cell's validation predicts its test AUC, per fraction (the labels choose the step, and a new
    domain's source): over the fine-tuned and scratch cells, the chosen step's validation AUC against its test AUC
    (Spearman's rho over cells; the mean gap), and how often the chosen step is the start (step 0: the pretrained
    model as it is)."""
    from scipy import stats

    out = [
        "Selection: the chosen step's validation AUC against its test AUC, over the cells of each fraction "
        "(rho: Spearman's rank correlation; gap: validation − test, mean; start: cells whose chosen step is the "
        "pretrained start):",
        "",
        "| fraction | cells | valid labels (mean) | rho | gap | start chosen |",
        "|---|---|---|---|---|---|",
    ]
    for fraction in sorted({r["fraction"] for r in rows if r.get("valid_auc") is not None}):
        cells = [r for r in rows if r["fraction"] == fraction and r.get("valid_auc") is not None]
        valid, test = np.array([r["valid_auc"] for r in cells]), np.array([r["auc"] for r in cells])
        rho = stats.spearmanr(valid, test).statistic if len(cells) > 2 else float("nan")
        labels = np.mean([r["valid_examples"] or 0 for r in cells])
        start = sum(r.get("step") == 0 for r in cells)
        out.append(
            f"| {fraction:g} | {len(cells)} | {labels:,.0f} | {rho:+.2f} | {np.mean(valid - test):+.3f} | {start} |"
        )
    return out


def _any(table: list[dict], metric: str) -> bool:
    return any(r.get(f"{metric}_mean") is not None for r in table)


def _oracle(rows: list[dict]) -> float | None:
    values = [r["oracle_auc_mean"] for r in rows if r["oracle_auc_mean"] is not None]
    return float(sum(values) / len(values)) if values else None
