"""What every entry point shares: `--workdir`, `--config NAME`, `section.field=value` overrides, logging
and JAX's persistent compilation cache."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path

import jax

from sr_jax import distributed
from sr_jax.config import Config, ConfigError, load_config, override, validate
from sr_jax.training.trainer import TrainingInterrupted


def parser(description: str, named_configs: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True, help="run folder: config, checkpoints, metrics, reports")
    if named_configs:
        p.add_argument(
            "--config",
            default=None,
            help="a configs/NAME.py to start from (default: the workdir's "
            "saved config.json when resuming, else configs/default.py)",
        )
    p.add_argument("overrides", nargs="*", help="section.field=value, e.g. model.gating=cls train.epochs=2")
    return p


def config_from_name(name: str) -> Config:
    """`configs/NAME.py`'s `get_config()`: the named starting points of the command line."""
    import importlib

    try:
        module = importlib.import_module(f"configs.{name}")
    except ModuleNotFoundError as e:
        raise ConfigError(f"no config named {name!r} in configs/") from e
    return module.get_config()


def resolve_config(args: argparse.Namespace) -> Config:
    """The config a command runs with: saved (when resuming) or named, then the overrides on top, checked
    (`validate`) before anything is written."""
    saved = Path(args.workdir) / "config.json"
    if args.config is None and saved.exists():
        base = load_config(saved)
    else:
        base = config_from_name(args.config or "default")
    return validate(override(base, args.overrides))


def setup() -> None:
    """Logging, JAX's persistent compilation cache in `$SR_JAX_COMPILE_CACHE` (default ~/.cache/sr_jax/jax;
    empty: off), so a rerun or a sweep of same-shaped runs skips recompiling, and the multi-host wiring
    (`sr_jax.distributed`: a no-op unless its environment variables are set)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", force=True)
    logging.getLogger("absl").setLevel(logging.WARNING)
    cache = os.environ.get("SR_JAX_COMPILE_CACHE", str(Path.home() / ".cache" / "sr_jax" / "jax"))
    if cache and not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    distributed.initialize()


def interruptible(main: Callable[[], object]) -> object:
    """Runs an entry point's main: a training stopped by a signal (after saving) ends with one clear line and
    the exit status 128 + the signal, as a process killed by it would, instead of a traceback."""
    try:
        return main()
    except TrainingInterrupted as e:
        print(e, file=sys.stderr)
        sys.exit(128 + e.signum)
