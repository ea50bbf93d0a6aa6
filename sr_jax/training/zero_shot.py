"""A new domain's zero-shot model, and a fine-tune's result blended with it.

The zero-shot model scores a new domain through its source domain's rows with the tower's output kernel at
zero: its logit is the source's tower bias plus the source's content match, which read no learned feature (the
match's cosines are of the frozen encoder's vectors). So the blend of a fine-tuned model with it,

    logit_k = (1 - w) * fine-tuned logit_k + w * zero-shot logit_k     (w: finetune.zero_shot_weight)

is one model of the same shape: the new domain's output kernel times 1 - w, its output bias and match weights
interpolated towards the zero-shot model's. It is the output-space form of WiSE-FT (Wortsman et al. 2022,
"Robust fine-tuning of zero-shot models"): on a catalogue the model never saw it keeps the zero-shot model's
robustness where the fine-tune's few labels mislead it (docs/COLD_START.md). Domains the pretrained run trained
are not touched, and STAR's auxiliary logit (shared, read off x_hat) stays as trained.
"""

from __future__ import annotations

import numpy as np

from sr_jax import model as sr_model
from sr_jax.training.spec import RunSpec
from sr_jax.treeutil import flatten, unflatten

MATCH = "l2/match/weight"  # the content match's per-domain weights [K, 2]


def _new_domains(spec: RunSpec) -> list[int]:
    """The rows of the run's new domains (none for a run that does not fine-tune)."""
    mapping = spec.start.domain_map if spec.start else None
    return list(mapping.new_domains) if mapping is not None else []


def zero_shot_params(spec: RunSpec, params):
    """`params` with the towers' output kernel of every new domain at zero (None: no new domain, or its rows
    already start so: `finetune.new_domain_init` match; or fresh, which has no source to score by)."""
    rows = _new_domains(spec)
    if not rows or spec.config.finetune.new_domain_init != "source":
        return None
    path, k = sr_model.tower_output(spec.config.model), np.asarray(rows)
    return unflatten({p: leaf.at[k].set(0.0) if p == path else leaf for p, leaf in flatten(params).items()})


def zero_shot_rows(spec: RunSpec, start) -> dict | None:
    """The zero-shot model's rows of the blend, read off a fine-tune's start `params` (JSON, kept with the run's
    position so a resumed run blends as it began): {"domains": [k], "bias": [[...]], "match": [[...]] or None};
    None where no blend applies (finetune.zero_shot_weight 0, no new domain, or one without a source:
    new_domain_init mean or fresh)."""
    rows, tune = _new_domains(spec), spec.config.finetune
    if tune.zero_shot_weight == 0 or not rows or tune.new_domain_init not in ("source", "match"):
        return None
    leaves = flatten(start)
    match = leaves.get(MATCH)
    return {
        "domains": rows,
        "bias": np.asarray(leaves[sr_model.tower_output(spec.config.model, "bias")])[rows].tolist(),
        "match": None if match is None else np.asarray(match)[rows].tolist(),
    }


def blend(spec: RunSpec, params, rows: dict | None):
    """`params` whose new domains score (1 - w) x their logit + w x the zero-shot model's (`zero_shot_rows`);
    `params` itself where `rows` is None."""
    if rows is None:
        return params
    w, k = spec.config.finetune.zero_shot_weight, np.asarray(rows["domains"])
    bias = sr_model.tower_output(spec.config.model, "bias")
    toward = {bias: rows["bias"], **({MATCH: rows["match"]} if rows["match"] is not None else {})}
    kernel = sr_model.tower_output(spec.config.model)

    def edit(path, leaf):
        if path == kernel:
            return leaf.at[k].multiply(1.0 - w)
        if path in toward:
            zero = np.asarray(toward[path], np.float32).astype(leaf.dtype)
            return leaf.at[k].set((1.0 - w) * leaf[k] + w * zero)
        return leaf

    return unflatten({p: edit(p, leaf) for p, leaf in flatten(params).items()})
