"""The multi-domain baselines of DESIGN.md, in the same framework as the full model: the same L0
encoder, towers, training and evaluation, with the paper's additions switched off (mean fusion, no
Domain Adaptive Layer, no alignment regularizer) and another backbone.

    python -m train.pretrain --config baselines --workdir DIR                        # MMoE
    python -m train.pretrain --config baselines --workdir DIR model.backbone=ple     # PLE (or star)
    python -m train.pretrain --config baselines --workdir DIR model.num_experts=1    # Shared-Bottom

`overrides(name)` gives the same as override strings, for experiment grids.
"""

from sr_jax.config import Config, override

BASELINES = {
    "shared-bottom": ["model.backbone=mmoe", "model.num_experts=1"],
    "mmoe": ["model.backbone=mmoe"],
    "ple": ["model.backbone=ple"],
    "star": ["model.backbone=star"],
}
PLAIN = ["model.gating=mean", "model.use_domain_adapter=false", "model.regularizer=none"]


def overrides(name: str) -> list[str]:
    if name not in BASELINES:
        raise ValueError(f"unknown baseline {name!r}; expected one of {sorted(BASELINES)}")
    return PLAIN + BASELINES[name]


def get_config(name: str = "mmoe") -> Config:
    return override(Config(), overrides(name))
