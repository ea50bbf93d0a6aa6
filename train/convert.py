"""Checkpoint utilities.

    python -m train.convert hf-to-orbax --src PATH_OR_NAME --dst DIR   # HF encoder -> orbax encoder folder
    python -m train.convert inspect PATH                                # print a checkpoint's tree

`inspect` takes a run folder (its latest checkpoint), one checkpoint step folder, or an orbax encoder
folder, and prints every array's path, shape, dtype and level, with parameter counts per level.
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp

from sr_jax.model.levels import LEVELS
from sr_jax.text.encoder import ORBAX_MARKER
from sr_jax.training.checkpoint import Checkpointer
from sr_jax.treeutil import path_str
from train import cli


def checkpoint_tree(path: Path) -> tuple[str, object, str]:
    """(description, metadata tree, kind) for a run folder, a checkpoint step folder or an encoder folder."""
    if (path / ORBAX_MARKER).exists():
        metadata = ocp.StandardCheckpointer().metadata(path / "params")
        return f"{path} (encoder)", metadata.item_metadata, "encoder"
    if (path / "checkpoints").is_dir():
        directory, step = path / "checkpoints", None
    elif path.name.isdigit() and (path / "state").is_dir():
        directory, step = path.parent, int(path.name)
    else:
        raise FileNotFoundError(f"{path}: not a run folder, checkpoint step folder or encoder folder")
    checkpointer = Checkpointer(directory)
    step = checkpointer.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"{directory}: no checkpoint")
    return f"{directory / str(step)} (train state)", checkpointer.item_metadata(step), "train state"


def level(path: str, kind: str) -> str:
    if kind == "encoder":
        return "encoder (frozen, feeds L0)"
    parts = path.split("/")
    found = next((p for p in parts if p in LEVELS), None)
    where = found.upper() if found else "-"
    return f"optimizer state of {where}" if parts[0] == "opt_state" and found else where


def inspect(path: str | Path) -> str:
    where, tree, kind = checkpoint_tree(Path(path))
    rows, counts = [], Counter()
    for p, leaf in jax.tree_util.tree_leaves_with_path(tree):
        name = path_str(p)
        lvl = level(name, kind)
        size = int(np.prod(leaf.shape)) if leaf.shape else 1
        counts[lvl] += size
        rows.append(f"| {name} | {tuple(leaf.shape)} | {leaf.dtype} | {lvl} |")
    summary = [f"| {lvl} | {n:,} |" for lvl, n in sorted(counts.items())]
    return (
        "\n".join(
            [
                where,
                "",
                "| path | shape | dtype | level |",
                "|---|---|---|---|",
                *rows,
                "",
                "| level | values |",
                "|---|---|",
                *summary,
            ]
        )
        + "\n"
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    conv = sub.add_parser("hf-to-orbax", help="a Hugging Face BERT-family folder -> an orbax encoder folder")
    conv.add_argument("--src", required=True, help="folder, or a packaged name such as all-MiniLM-L6-v2")
    conv.add_argument("--dst", required=True)
    insp = sub.add_parser("inspect", help="print a checkpoint's tree: paths, shapes, dtypes, levels")
    insp.add_argument("path")
    args = p.parse_args(argv)
    if args.command == "hf-to-orbax":
        from sr_jax.text.conversion import hf_to_orbax

        print(f"wrote {hf_to_orbax(args.src, args.dst)}")
    else:
        print(inspect(args.path))


if __name__ == "__main__":
    cli.interruptible(main)
