"""Fine-tuning a pretrained run for one of the two cold-start protocols of docs/DESIGN.md
(`sr_jax.protocols.PROTOCOLS`): the pretrained run's model and data settings (on its dataset or
another one), the protocol's splits (or those named), and
fine-tuning's own schedule (5 epochs and at least 100 steps, Adam 2e-3 with 20 warm-up steps, batch
256), every level trained (`finetune.freeze=l0,l1` is the paper's best split; docs/COLD_START.md)."""

from sr_jax.config import Config
from sr_jax.protocols import PROTOCOLS, finetune_config

__all__ = ["PROTOCOLS", "get_config"]


def get_config(
    pretrained: Config | None = None,
    protocol: str = "new-domain",
    splits: tuple[str, str] | None = None,
    data_path: str | None = None,
) -> Config:
    return finetune_config(pretrained or Config(), protocol, splits, data_path)
