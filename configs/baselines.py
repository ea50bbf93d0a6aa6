"""The multi-domain baselines of docs/DESIGN.md, in the same framework as the full model: the same L0
encoder, towers, training and evaluation, with the paper's additions switched off (mean fusion, no
Domain Adaptive Layer, no alignment regularizer) and another backbone.

    python -m train.pretrain --config baselines --workdir DIR                        # MMoE
    python -m train.pretrain --config baselines --workdir DIR model.backbone=ple     # CGC (PLE, one level; or star)
    python -m train.pretrain --config baselines --workdir DIR model.num_experts=1    # Shared-Bottom

`overrides(name)` gives the same as override strings, for experiment grids.
"""

from sr_jax.config import Config, override

ZOO = ("m3oe", "sarnet", "adaptdhm", "epnet", "ppnet", "hamur", "m2m", "adasparse")

BASELINES = {
    "shared-bottom": ["model.backbone=mmoe", "model.num_experts=1"],
    "mmoe": ["model.backbone=mmoe"],
    "cgc": ["model.backbone=ple"],  # PLE's one-level form, CGC
    "ple": ["model.backbone=ple", "model.ple_levels=2"],  # PLE with two progressive levels
    "star": ["model.backbone=star"],  # partitioned normalisation, as Sheng et al.
    "star-ln": ["model.backbone=star", "model.star_norm=layer"],  # STAR with a LayerNorm in place of it
    # the field's other multi-domain models (Scenario-Wise Rec's list; README: what is ours)
    **{name: [f"model.backbone={name}"] for name in ZOO},
}
PLAIN = ["model.gating=mean", "model.use_domain_adapter=false", "model.regularizer=none"]


def overrides(name: str) -> list[str]:
    if name not in BASELINES:
        raise ValueError(f"unknown baseline {name!r}; expected one of {sorted(BASELINES)}")
    return PLAIN + BASELINES[name]


def get_config(name: str = "mmoe") -> Config:
    return override(Config(), overrides(name))
