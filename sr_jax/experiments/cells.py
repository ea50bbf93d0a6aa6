"""One cell of an experiment grid: a run folder that is run once and then only read back."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import jax

from sr_jax.config import Config
from sr_jax.io import atomic_file


def run_once(workdir: Path, run: Callable[[Config, Path], object], cfg: Config) -> tuple[dict, float]:
    """(eval.json, wall seconds) of `run(cfg, workdir)`, which writes workdir/eval.json. workdir/cell.json
    marks the cell done, so a grid that is run again skips it."""
    done = workdir / "cell.json"
    if not done.exists():
        start = time.perf_counter()
        run(cfg, workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        with atomic_file(done) as tmp:  # whole or absent: a kill here runs the (finished) cell's command again
            tmp.write_text(json.dumps({"seconds": time.perf_counter() - start}) + "\n")
        jax.clear_caches()  # every run compiles its own closures: drop them, keep memory flat over the grid
    return json.loads((workdir / "eval.json").read_text()), json.loads(done.read_text())["seconds"]
