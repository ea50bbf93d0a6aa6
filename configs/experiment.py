"""The grid of docs/RESULTS.md: the full model, its ablations and the baselines (each a list of overrides on
configs/default.py), the datasets with their own overrides, and the search space of `train.tune`.

Every dataset validates during training (its `valid` split, `train.eval_every` steps apart), stops after
three validations without a gain and reports its best validated step on the test split; `train.epochs` is
the most a run may train. `train.tune` gives every model of TUNED the same number of trials over SEARCH_SPACE
(REG_SPACE for the models with an alignment regularizer, BACKBONE_SPACE for a zoo backbone's own options) on
the validation split; an ablation reuses the settings tuned for the models it ablates (ABLATES), so that it
differs from them in its one component only: the paper's additions on a zoo backbone take that backbone's
tuned settings and the full model's tuned regularizer.
"""

import json
from pathlib import Path

from configs.baselines import BASELINES, ZOO, overrides
from sr_jax.config import Config, ConfigError, override

NO_TEXT = ["model.use_text=false"]
SINGLE_DOMAIN = ("single-domain", "single-domain-no-text")  # one Shared-Bottom DNN per domain

MODELS = {
    "full": [],  # MMoE-DA-JS with domain gating: the paper's best
    "full-star": ["model.backbone=star"],  # the paper's additions (gating, DAL, JS) on the STAR backbone
    "full-ple": ["model.backbone=ple", "model.ple_levels=2"],  # ... and on PLE
    "full-no-text": NO_TEXT,
    "full-no-dal": ["model.use_domain_adapter=false"],
    "full-no-reg": ["model.regularizer=none"],
    "full-no-da-js": ["model.use_domain_adapter=false", "model.regularizer=none"],  # MMoE with domain gating
    "full-reg-0.2": ["model.reg_weight=0.2"],
    "full-reg-1": ["model.reg_weight=1.0"],
    "full-mmd": ["model.regularizer=mmd"],
    "full-mean-gating": ["model.gating=mean"],
    "full-cls-gating": ["model.gating=cls"],
    **{f"full-{name}": [f"model.backbone={name}"] for name in ZOO},  # the paper's additions on each backbone
    **{name: overrides(name) for name in BASELINES},
    **{f"{name}-no-text": overrides(name) + NO_TEXT for name in BASELINES},
    "single-domain": overrides("shared-bottom"),
    "single-domain-no-text": overrides("shared-bottom") + NO_TEXT,
}

# The grid validates a fixed number of steps apart (its tuning did too), and runs without the content defaults
# (id dropout, untrained ids read as missing) under which it was not made: pinned, so that its commands reproduce
# its cells.
EVERY = ["train.evals_per_epoch=0", "model.id_dropout=0", "model.untrained_ids=row"]
DATASETS = {
    "synthetic": ["train.eval_every=250", "train.early_stopping_patience=3", *EVERY],
    "movielens": [
        "train.epochs=8",
        "data.batch_size=512",
        "train.eval_every=50",
        "train.early_stopping_patience=3",
        *EVERY,
    ],
    "amazon": ["train.epochs=5", "train.eval_every=50", "train.early_stopping_patience=3", *EVERY],
}

# What `train.tune` tunes, each with its own trials, and the models whose tuned settings each ablation takes
# (a key from the first that has it).
TUNED = ("full", "full-star", "full-ple", "shared-bottom", "mmoe", "ple", "star", *ZOO)
ABLATES = {
    **{m: ("full",) for m in MODELS if m.startswith("full-") and m not in TUNED},
    **{f"full-{name}": (name, "full") for name in ZOO},
    **{f"{name}-no-text": (name,) for name in BASELINES if name in TUNED},
    "single-domain": ("shared-bottom",),
    "single-domain-no-text": ("shared-bottom",),
}

# key -> ("log", low, high) | ("choice", values): the same space for every model.
SEARCH_SPACE = {
    "train.learning_rate": ("log", 3e-4, 1e-2),
    "model.dim": ("choice", (16, 32, 64)),
    "model.expert_hidden": ("choice", ("32,16", "64,32", "128,64")),
}
REG_SPACE = {  # the models with the JS alignment regularizer, in addition
    "model.reg_weight": ("log", 0.01, 1.0),
    "model.reg_temperature": ("log", 0.25, 4.0),
}

# Each zoo backbone's own options, in addition (some recorded studies searched SEARCH_SPACE and REG_SPACE only,
# their own options at the defaults: docs/RESULTS.md says so where it compares them).
EXPERTS = {"model.num_experts": ("choice", (2, 4, 8))}
GATE = {"model.gate_hidden": ("choice", (32, 64, 128))}  # a gate NU's hidden width, or HAMUR's hyper-network's
BACKBONE_SPACE = {
    "m3oe": {**EXPERTS, "model.domain_experts": ("choice", (1, 2))},
    "sarnet": {**EXPERTS, "model.domain_experts": ("choice", (1, 2))},
    "adaptdhm": {"model.adaptdhm_clusters": ("choice", (2, 4, 8))},
    "epnet": GATE,
    "ppnet": GATE,
    "hamur": {**GATE, "model.adapter_rank": ("choice", (4, 8, 16))},
    "m2m": {**EXPERTS, "model.meta_layers": ("choice", (1, 2, 3))},
    "adasparse": {
        "model.adasparse_weight": ("log", 0.005, 0.5),
        "model.adasparse_sparsity": ("choice", (0.1, 0.2, 0.4)),
    },
}

# The paper's claims and the questions the reading asks: (label, model a, model b), tested a − b per dataset.
COMPARISONS = (
    ("domain gating − mean gating", "full", "full-mean-gating"),
    ("domain gating − cls gating", "full", "full-cls-gating"),
    ("DA + JS − neither (MMoE, domain gating)", "full", "full-no-da-js"),
    ("full − no DAL", "full", "full-no-dal"),
    ("full − no JS", "full", "full-no-reg"),
    ("full − MMoE", "full", "mmoe"),
    ("full on STAR − STAR", "full-star", "star"),
    ("full on PLE − PLE", "full-ple", "ple"),
    ("STAR − full", "star", "full"),
    *((f"full on {name} − {name}", f"full-{name}", name) for name in ZOO),  # the additions on each other backbone
)

TUNED_DIR = Path(__file__).parent / "tuned"


def space_for(cfg: Config) -> dict:
    """The search space of a model: SEARCH_SPACE, REG_SPACE where the model has the JS regularizer, and its
    backbone's own options (BACKBONE_SPACE)."""
    reg = REG_SPACE if cfg.model.regularizer == "js" else {}
    return {**SEARCH_SPACE, **reg, **BACKBONE_SPACE.get(cfg.model.backbone, {})}


def tuned(dataset: str, model: str) -> list[str]:
    """The tuned settings (configs/tuned/DATASET/MODEL.json, written by `train.tune`) of `model`, or of the
    models it ablates, limited to the keys of the search space that `model` has."""
    keys = space_for(override(Config(), MODELS[model]))
    chosen = {}
    for source in (model,) if model in TUNED else ABLATES.get(model, (model,)):
        path = TUNED_DIR / dataset / f"{source}.json"
        if not path.is_file():
            raise ConfigError(f"{model} on {dataset}: no tuned settings ({path}); run python -m train.tune first")
        for setting in json.loads(path.read_text())["settings"]:
            key = setting.partition("=")[0]
            if key in keys:
                chosen.setdefault(key, setting)
    return list(chosen.values())
