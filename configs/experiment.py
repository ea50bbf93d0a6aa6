"""The grid of docs/RESULTS.md: the full model, its ablations and the baselines (each a list of
overrides on configs/default.py), and the datasets with their own overrides."""

from configs.baselines import BASELINES, overrides

NO_TEXT = ["model.use_text=false"]
SINGLE_DOMAIN = ("single-domain", "single-domain-no-text")  # one Shared-Bottom DNN per domain

MODELS = {
    "full": [],  # MMoE-DA-JS with domain gating: the paper's best
    "full-no-text": NO_TEXT,
    "full-no-dal": ["model.use_domain_adapter=false"],
    "full-no-reg": ["model.regularizer=none"],
    "full-reg-0.2": ["model.reg_weight=0.2"],
    "full-reg-1": ["model.reg_weight=1.0"],
    "full-mmd": ["model.regularizer=mmd"],
    "full-mean-gating": ["model.gating=mean"],
    "full-cls-gating": ["model.gating=cls"],
    **{name: overrides(name) for name in BASELINES},
    **{f"{name}-no-text": overrides(name) + NO_TEXT for name in BASELINES},
    "single-domain": overrides("shared-bottom"),
    "single-domain-no-text": overrides("shared-bottom") + NO_TEXT,
}

DATASETS = {
    "synthetic": [],
    "movielens": ["train.epochs=5", "data.batch_size=512"],
    "amazon": ["train.epochs=3"],
}
