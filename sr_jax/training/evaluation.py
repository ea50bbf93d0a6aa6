"""Evaluation on a held-out split: per-domain AUC, GAUC and log loss, overall AUC, cold-item AUC, and
the dataset's oracle AUCs beside them; written as `eval.json` and `eval.md`.

Cold items are the items whose id rows the model never trained: neither its pretrained run (if any) nor this
run, up to its result's step (the fraction and domains it really read). One meaning for a pretraining run, a
fine-tune and its scratch baseline, so their cold-item rows compare. A domain whose labels in the split are
all one class has no AUC: it is left out of the mean per-domain AUC, and the report says so."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np

from sr_jax import calibration, metrics
from sr_jax import sharding as shd
from sr_jax.data.pipeline import map_batches
from sr_jax.data.store import Dataset
from sr_jax.io import atomic_file
from sr_jax.training import records
from sr_jax.training.spec import RunSpec

SCORES = "scores_{split}.npz"  # a run's per-example test scores, beside eval.json (for bootstrap intervals)


def trained_rows(spec: RunSpec, trained: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """table -> [rows] bool, the rows the model trained (the items among them are warm, the others the report's
    cold items): `trained` (`handover.trained_so_far`: its pretrained run's and this run's up to its result),
    else the run's record of them (`trained_rows.npz`, once written), else its pretrained run's (none for a
    fresh run)."""
    if trained is None and (spec.workdir / records.TRAINED_ROWS).exists():
        trained = records.read_trained_rows(spec.workdir, spec.row_map.vocab)
    return trained or spec.trained_rows


def evaluate(
    spec: RunSpec,
    params,
    split: str | None = None,
    trained: dict[str, np.ndarray] | None = None,
    scores_to: Path | None = None,
    fitted: dict | None = None,
) -> dict:
    """Metrics of `params` on a split of the run's domains (default: data.eval_split); `trained`: see
    `trained_rows` (its default); `scores_to`: a folder to write the per-example scores to (`SCORES`);
    `fitted`: the run's calibration (calibration.json), whose probabilities are measured beside the raw ones."""
    split = split or spec.config.data.eval_split
    columns = spec.split(split)
    rows = trained_rows(spec, trained)
    scores = predict_scores(spec, params, columns, rows, fitted)
    if scores_to is not None:
        write_scores(Path(scores_to), split, scores, columns)
    calibrated = scores["calibrated_logit"] if fitted is not None else None
    result = compute_metrics(spec.dataset, split, scores["logit"], columns, rows["item_id"], calibrated)
    if fitted is not None:
        result["calibration"] = {"summary": calibration.summary(fitted), "file": calibration.FILE}
    return result


def predict_scores(
    spec: RunSpec, params, columns: dict[str, np.ndarray], trained: dict[str, np.ndarray], fitted: dict | None = None
) -> dict[str, np.ndarray]:
    """{"logit", "calibrated_logit"} [rows] float32: the model's logits on `columns` (rows in the model's tables)
    and their calibration by `fitted` (None: the same); `trained`: the rows the model trained, whose complement
    reads as missing under `model.untrained_ids=missing`."""
    mask = device_mask(spec, trained)
    table = None
    if fitted is not None:
        names = [d.name for d in spec.dataset.meta.domains]
        table = jax.device_put(calibration.arrays(fitted, names), shd.replicated(spec.mesh))

    def predict(batch):
        out = spec.program.predict(params, spec.global_eval_batch(batch), spec.text, mask, table)
        return {k: out[k] for k in ("logit", "calibrated_logit")}

    return map_batches(predict, columns, spec.config.data.eval_batch_size)


def fit_calibration(
    spec: RunSpec,
    params,
    trained: dict[str, np.ndarray],
    rates: dict[str, float] | None = None,
    target: str = "",
    traffic: tuple[np.ndarray, np.ndarray] | None = None,
) -> dict | None:
    """The run's calibration (train.calibration) fitted on its validation data (never the test), or None where
    it is off or the run has no validation data (train.eval_every=0). `rates`: per-domain click rates to target
    in place of train.calibration_rate (`calibration.fit`), `target` saying whose they are, `traffic` the raw
    logits and domains of the rows they are of (matched in the mean)."""
    train = spec.config.train
    if train.calibration == "none" or spec.valid_columns is None:
        return None
    columns = spec.valid_columns
    return calibration.fit(
        predict_scores(spec, params, columns, trained)["logit"],
        np.asarray(columns["label"]),
        np.asarray(columns["domain"]),
        [d.name for d in spec.dataset.meta.domains],
        method=train.calibration,
        min_clicks=train.calibration_min_clicks,
        rate=train.calibration_rate if rates is None else rates,
        fitted_on=spec.validation_data,
        sampled=spec.dataset.meta.negatives_per_click,
        target=target,
        traffic=traffic,
    )


def device_mask(spec: RunSpec, trained: dict[str, np.ndarray]) -> dict | None:
    """The trained rows on the mesh, for the predict step to read the others as missing
    (`model.untrained_ids=missing`); None when the model reads every row."""
    if spec.config.model.untrained_ids != "missing":
        return None
    return jax.device_put({t: np.asarray(r) for t, r in trained.items()}, shd.replicated(spec.mesh))


def write_scores(workdir: Path, split: str, scores: dict[str, np.ndarray], columns: dict[str, np.ndarray]) -> None:
    """The logits (raw and calibrated) with what a bootstrap over users needs: label, domain and user of every
    row."""
    keep = {k: np.asarray(columns[k]) for k in ("label", "domain", "user_id")}
    with atomic_file(workdir / SCORES.format(split=split)) as tmp:
        np.savez(tmp, **{k: np.asarray(v, np.float32) for k, v in scores.items()}, **keep)


def compute_metrics(
    dataset: Dataset,
    split: str,
    logits: np.ndarray,
    columns: dict[str, np.ndarray],
    warm: np.ndarray | None,
    calibrated: np.ndarray | None = None,
) -> dict:
    """Metrics of the model's `logits` on `columns` (rows of the split), per domain and overall:
    - ranking: AUC and GAUC (by user) rank the logits; search domains add `qauc`, AUC grouped by query (the unit
      a search ranks); `ndcg@10`, `hr@10` and `mrr` rank each candidate list, a user's examples for one query
      in one domain (one positive among sampled negatives, where the data were made so), over `lists` lists
      with both labels;
    - calibration: `log_loss` (the cross-entropy of the probabilities), `pcoc` (mean prediction / CTR), `ece`.
    `warm` [item vocab] bool: the items whose id rows were trained before this evaluation (the others are the
    cold items; None: no cold-item block). `calibrated`: the calibrated logits, whose log loss, PCOC and ECE
    each block gives under "calibrated" (the ranking metrics are the raw logits': calibration is monotone per
    domain). Non-finite logits are a ValueError."""
    metrics.check_finite(logits, f"the model's scores on {split!r}")
    cols = columns
    labels, domain, users = np.asarray(cols["label"]), np.asarray(cols["domain"]), np.asarray(cols["user_id"])
    queries = np.asarray(cols["query_id"])
    _, candidate_list = np.unique(np.stack([domain, users, queries], 1), axis=0, return_inverse=True)
    candidate_list = candidate_list.reshape(-1)
    probs = metrics.probabilities(logits)
    oracle = dataset.meta.oracle_auc.get(split, {})

    def block(mask: np.ndarray, oracle_key: str, search: bool = False) -> dict:
        y, z = labels[mask], logits[mask]
        ranked = metrics.ranking(y, z, candidate_list[mask])
        out = {
            "examples": int(mask.sum()),
            "ctr": float(y.mean()),
            "auc": metrics.auc(y, z),
            "gauc": metrics.gauc(y, z, users[mask]),
            "log_loss": metrics.log_loss_from_logits(y, z),
            "oracle_auc": oracle.get(oracle_key),
            **metrics.calibration(y, probs[mask]),
            **{key: ranked[key] for key in ("ndcg@10", "hr@10", "mrr")},
            "lists": ranked["lists"],
        }
        if search:
            out["qauc"] = metrics.gauc(y, z, queries[mask])
        if calibrated is not None:
            out["calibrated"] = metrics.probability_metrics(y, calibrated[mask])
        return out

    per_domain = {
        d.name: block(domain == k, d.name, d.task == "search")
        for k, d in enumerate(dataset.meta.domains)
        if (domain == k).any()
    }
    scored = {name: m for name, m in per_domain.items() if not np.isnan(m["auc"])}
    result = {
        "split": split,
        "domains": per_domain,
        "overall": block(np.ones_like(labels, bool), "overall"),
        "mean_domain_auc": float(np.mean([m["auc"] for m in scored.values()])) if scored else float("nan"),
        "domains_without_auc": sorted(set(per_domain) - set(scored)),  # one class only: no AUC
    }
    oracle_means = [m["oracle_auc"] for m in scored.values() if m["oracle_auc"] is not None]
    if scored and len(oracle_means) == len(scored):
        result["mean_domain_oracle_auc"] = float(np.mean(oracle_means))
    cold = np.zeros(len(labels), bool) if warm is None else ~warm[np.asarray(cols["item_id"])]
    if cold.any():
        result["cold_items"] = block(cold, "cold_items")
    return result


def markdown_table(result: dict) -> str:
    fmt = lambda x: "" if x is None else f"{x:.4f}"  # noqa: E731
    lines = [
        f"Evaluation on split `{result['split']}`",
        "",
        "| domain | examples | CTR | AUC | oracle AUC | GAUC | log loss |",
        "|---|---|---|---|---|---|---|",
    ]
    rows = list(result["domains"].items()) + [("**overall**", result["overall"])]
    if "cold_items" in result:
        rows.append(("**cold items**", result["cold_items"]))
    for name, m in rows:
        lines.append(
            f"| {name} | {m['examples']} | {m['ctr']:.3f} | {fmt(m['auc'])} | {fmt(m['oracle_auc'])} "
            f"| {fmt(m['gauc'])} | {fmt(m['log_loss'])} |"
        )
    lines += [
        "",
        f"Mean per-domain AUC: {result['mean_domain_auc']:.4f}"
        + (f" (oracle {result['mean_domain_oracle_auc']:.4f})" if "mean_domain_oracle_auc" in result else ""),
        "",
        "| domain | query AUC | NDCG@10 | HR@10 | MRR | lists | PCOC | ECE |",
        "|---|---|---|---|---|---|---|---|",
        *(
            f"| {name} | {fmt(m.get('qauc'))} | {fmt(m['ndcg@10'])} | {fmt(m['hr@10'])} | {fmt(m['mrr'])} "
            f"| {m['lists']} | {fmt(m['pcoc'])} | {fmt(m['ece'])} |"
            for name, m in rows
        ),
        "",
        "Query AUC: AUC within each query (search domains). NDCG@10, HR@10, MRR: over candidate lists, a user's "
        "examples for one query in one domain, with both labels. PCOC: mean prediction / CTR (1: calibrated).",
    ]
    if fitted := result.get("calibration"):
        lines += [
            "",
            f"Calibration ({fitted['file']}): {fitted['summary']}. The probabilities before and after it:",
            "",
            "| domain | log loss | calibrated | PCOC | calibrated | ECE | calibrated |",
            "|---|---|---|---|---|---|---|",
            *(
                f"| {name} | {fmt(m['log_loss'])} | {fmt(m['calibrated']['log_loss'])} | {fmt(m['pcoc'])} "
                f"| {fmt(m['calibrated']['pcoc'])} | {fmt(m['ece'])} | {fmt(m['calibrated']['ece'])} |"
                for name, m in rows
            ),
            "",
        ]
    if chosen := result.get("validation"):
        lines.append(
            f"Parameters of step {chosen['step']}, the best {chosen['metric']} on the validation data "
            f"({chosen['score']:.4f}; {chosen.get('data', 'validation data')}), of {result['trained_steps']} steps "
            "trained."
        )
        if start := chosen.get("start"):
            kept = max(start, key=start.get)
            scores = ", ".join(f"{name} {score:.4f}" for name, score in start.items())
            lines.append(f"Step 0's candidates on the validation data: {scores} ({kept} offered as step 0).")
        if blended := chosen.get("zero_shot_blend"):
            lines.append(
                f"Every candidate blended with the zero-shot model (finetune.zero_shot_weight={blended['weight']}) "
                f"for {', '.join(blended['domains'])}: logit = {1 - blended['weight']:g} x the fine-tuned + "
                f"{blended['weight']:g} x the zero-shot model's."
            )
    if strategy := result.get("strategy"):
        margin = "" if strategy["margin"] is None else f"; +{strategy['margin']:.4f} over the runner-up"
        lines.append(
            f"Strategy {strategy['chosen']} (train.finetune --strategy auto), kept by {strategy['rule']}: validation "
            f"{strategy['metric']} {', '.join(f'{k} {v:.4f}' for k, v in strategy['validation'].items())}{margin}; "
            f"its run is {strategy['run']}."
        )
    if budget := result.get("budget"):
        lines.append(
            f"Labels used: {budget['train_examples']} to train, {budget['valid_examples']} to choose the step."
        )
    if skipped := result.get("domains_without_auc"):
        lines.append(
            f"Left out of the mean: {len(skipped)} domain(s) whose labels in this split are one class, so they have "
            f"no AUC: {', '.join(skipped)}."
        )
    return "\n".join(lines) + "\n"


def write_report(workdir: str | Path, result: dict, name: str = "eval") -> None:
    """NAME.json and NAME.md, each written whole or not at all."""
    workdir = Path(workdir)
    with atomic_file(workdir / f"{name}.json") as tmp:
        tmp.write_text(json.dumps(result, indent=2) + "\n")
    with atomic_file(workdir / f"{name}.md") as tmp:
        tmp.write_text(markdown_table(result))
