"""What every entry point shares: `--workdir`, `--config NAME`, `section.field=value` overrides, logging."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from sr_jax.config import Config, config_from_name, load_config, override


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--workdir", required=True, help="run folder: config, checkpoints, metrics, reports")
    p.add_argument(
        "--config",
        default=None,
        help="a configs/NAME.py to start from (default: the workdir's "
        "saved config.json when resuming, else configs/default.py)",
    )
    p.add_argument("overrides", nargs="*", help="section.field=value, e.g. model.gating=cls train.epochs=2")
    return p


def resolve_config(args: argparse.Namespace) -> Config:
    """The config a command runs with: saved (when resuming) or named, then the overrides on top."""
    saved = Path(args.workdir) / "config.json"
    if args.config is None and saved.exists():
        base = load_config(saved)
    else:
        base = config_from_name(args.config or "default")
    return override(base, args.overrides)


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)
