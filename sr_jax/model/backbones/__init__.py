"""The multi-task backbones of L1: what turns the fused sides into expert outputs for L2's domain gates.

One module per paper, its docstring the paper's definition and every deviation from it (docs/MODELS.md is the
guide). Every backbone is an `nnx.Module` built as `Backbone(cfg, num_domains, width, rngs=rngs)` and called as

    backbone(inputs: BackboneInput, dtype, train) -> BackboneOutput(experts [B, E, h], gate_input [B, g] or None)

E expert outputs per example (`num_outputs`), which L2 mixes with its domain's softmax gate (reading x_hat, or the
backbone's `gate_input` where it gives one: PLE's last domain input), or takes as they are when E = 1. Per-domain
parameters sit on a leading domain axis like the rest of the model, so fine-tuning gives a new domain its own rows.
A new backbone is one module here and one line in BACKBONES (research code outside the library: `register`).
"""

from __future__ import annotations

from flax import nnx

from sr_jax.config import ConfigError, ModelConfig
from sr_jax.model.backbones.adaptdhm import AdaptDHM
from sr_jax.model.backbones.adasparse import AdaSparse
from sr_jax.model.backbones.common import BackboneInput, BackboneOutput
from sr_jax.model.backbones.hamur import HAMUR
from sr_jax.model.backbones.m2m import M2M
from sr_jax.model.backbones.m3oe import M3oE
from sr_jax.model.backbones.mmoe import MMoE
from sr_jax.model.backbones.pepnet import EPNet, PPNet
from sr_jax.model.backbones.ple import PLE
from sr_jax.model.backbones.sarnet import SARNet
from sr_jax.model.backbones.star import STAR, StarAuxiliary

__all__ = [
    "BACKBONES",
    "BackboneInput",
    "BackboneOutput",
    "StarAuxiliary",
    "gate_width",
    "make_backbone",
    "num_outputs",
    "register",
]

BACKBONES: dict[str, type[nnx.Module]] = {  # model.backbone -> its class
    "mmoe": MMoE,
    "ple": PLE,
    "star": STAR,
    "m3oe": M3oE,
    "sarnet": SARNet,
    "adaptdhm": AdaptDHM,
    "epnet": EPNet,
    "ppnet": PPNet,
    "hamur": HAMUR,
    "m2m": M2M,
    "adasparse": AdaSparse,
}


def register(name: str, backbone: type[nnx.Module]) -> None:
    """Makes `model.backbone=name` build `backbone` (a backbone of research code outside the library)."""
    if name in BACKBONES and BACKBONES[name] is not backbone:
        raise ValueError(f"model.backbone {name!r} is taken by {BACKBONES[name].__name__}")
    BACKBONES[name] = backbone


def make_backbone(cfg: ModelConfig, num_domains: int, width: int, *, rngs: nnx.Rngs) -> nnx.Module:
    """The backbone `model.backbone` names; a ConfigError naming the key and the registered names otherwise (the
    config does not check it: the registry lives here, above the config)."""
    if cfg.backbone not in BACKBONES:
        raise ConfigError(f"invalid model config:\n  model.backbone: {cfg.backbone!r} is not one of {tuple(BACKBONES)}")
    return BACKBONES[cfg.backbone](cfg, num_domains, width, rngs=rngs)


def num_outputs(cfg: ModelConfig) -> int:
    """E: how many expert outputs the backbone gives each example."""
    return {"mmoe": cfg.num_experts, "ple": cfg.num_experts + cfg.domain_experts}.get(cfg.backbone, 1)


def gate_width(cfg: ModelConfig, width: int) -> int:
    """The width of what L2's domain gates read: x_hat, or PLE's last domain input."""
    return cfg.expert_hidden[-1] if cfg.backbone == "ple" and cfg.ple_levels > 1 else width
