"""Checkpoint conversions (docs/EXPORT.md).

    python -m train.convert hf-to-orbax --src SPEC --dst DIR [--dtype bfloat16]  # HF text model -> orbax folder
    python -m train.convert params RUN OUT [--dtype bfloat16]          # params-only run folder (no optimizer state)
    python -m train.convert to-safetensors RUN OUT.safetensors          # flat, dot-named parameters
    python -m train.convert to-torch RUN OUT.safetensors|OUT.pt         # the PyTorch reference's state_dict
    python -m train.convert from-torch STATE --like RUN --out DIR       # a state_dict back -> params-only run folder
    python -m train.convert inspect PATH                                # print any of these artifacts' trees

Each conversion from a run takes its result (the best validated step, else the latest; `--step N` for another).
`inspect` takes a run folder (its latest checkpoint), one checkpoint step folder, an orbax encoder folder, a
serving artifact (train.export) or a safetensors file, and prints every array's path, shape, dtype and level,
with parameter counts per level.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from safetensors import safe_open

from sr_jax import io
from sr_jax.export import interop, trained
from sr_jax.model.levels import LEVELS
from sr_jax.text.encoder import ORBAX_MARKER
from sr_jax.training.checkpoint import Checkpointer
from sr_jax.treeutil import path_str
from train import cli

_NUMPY = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "I32": "int32", "I64": "int64", "F64": "float64"}


def checkpoint_tree(path: Path) -> tuple[str, object, str]:
    """(description, metadata tree, kind) for a run folder, a checkpoint step folder, an encoder folder, a
    serving artifact or a safetensors file."""
    if path.suffix == ".safetensors":
        with safe_open(str(path), "np") as f:
            meta = f.metadata() or {}
            tree = {k: f.get_slice(k) for k in f.keys()}
            tree = {
                k: jax.ShapeDtypeStruct(tuple(v.get_shape()), jnp.dtype(_NUMPY[v.get_dtype()])) for k, v in tree.items()
            }
        kind = "torch state_dict" if "dal_kernel" in tree else "safetensors"
        return f"{path} ({kind}; step {meta.get('step', '?')}, run {meta.get('fingerprint', '?')[:12]})", tree, kind
    if (path / "manifest.json").exists():
        manifest = json.loads((path / "manifest.json").read_text())
        with np.load(path / manifest["params"]["file"]) as saved:
            tree = {
                k.replace("/", "."): jax.ShapeDtypeStruct(saved[k].shape, manifest["params"]["dtype"])
                for k in saved.files
            }
        features = ", ".join(f["name"] for f in manifest["features"])
        where = f"{path} (serving artifact; step {manifest['run']['step']}; features: {features})"
        return where, tree, "serving artifact"
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
    tree = checkpointer.item_metadata(step)
    kind = "train state" if "opt_state" in tree else "params only"
    return f"{directory / str(step)} ({kind})", tree, kind


def level(path: str, kind: str) -> str:
    if kind == "encoder":
        return "encoder (frozen, feeds L0)"
    if kind == "torch state_dict":
        return "-"
    parts = path.replace(".", "/").split("/")
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
    conv = sub.add_parser("hf-to-orbax", help="a Hugging Face text model folder -> an orbax encoder folder")
    conv.add_argument("--src", required=True, help="folder or packaged name (all-MiniLM-L6-v2), [?feature options]")
    conv.add_argument("--dst", required=True)
    conv.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="a decoder's weight dtype")
    cli.add_overwrite(conv, "--dst")
    for name, what in [
        ("params", "a params-only run folder (float32 or bfloat16), for fine-tuning, evaluation and export"),
        ("to-safetensors", "the parameters as one flat safetensors file"),
        ("to-torch", "the PyTorch reference module's state_dict (.safetensors, or .pt with torch)"),
    ]:
        conv = sub.add_parser(name, help=what)
        conv.add_argument("run", help="a run folder")
        conv.add_argument("out")
        conv.add_argument("--step", type=int, default=None, help="a checkpoint step (default: the run's result)")
        cli.add_overwrite(conv)
        if name == "params":
            conv.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    back = sub.add_parser("from-torch", help="a reference state_dict -> a params-only run folder")
    back.add_argument("state", help="a .safetensors or .pt state_dict (to-torch's format)")
    back.add_argument("--like", required=True, help="the run folder it was converted from (config, vocabulary)")
    back.add_argument("--out", required=True)
    cli.add_overwrite(back)
    insp = sub.add_parser("inspect", help="print a checkpoint's tree: paths, shapes, dtypes, levels")
    insp.add_argument("path")
    args = p.parse_args(argv)
    if args.command == "hf-to-orbax":
        from sr_jax.text.conversion import hf_to_orbax

        print(f"wrote {hf_to_orbax(args.src, args.dst, args.dtype, args.overwrite)}")
    elif args.command == "inspect":
        print(inspect(args.path))
    elif args.command == "from-torch":
        io.claim(args.out, io.PARAMS_RUN, args.overwrite, inputs=(args.like, args.state))
        model = trained.load(args.like)
        params = interop.from_torch_state_dict(interop.read_torch(args.state), model.params)
        print(f"wrote {interop.write_params_run(model, params, args.out, overwrite=args.overwrite)}")
    else:
        kind = {"params": io.PARAMS_RUN, "to-safetensors": interop.SAFETENSORS, "to-torch": interop.TORCH}
        io.claim(args.out, kind[args.command], args.overwrite, inputs=(args.run,))  # before the model is loaded
        model = trained.load(args.run, args.step)
        if args.command == "params":
            out = interop.write_params_run(model, model.params, args.out, args.dtype, args.overwrite)
        elif args.command == "to-safetensors":
            out = interop.to_safetensors(model, args.out, args.overwrite)
        else:
            out = interop.to_torch(model, args.out, args.overwrite)
        print(f"wrote {out} (step {model.step}, {model.chosen_by})")


if __name__ == "__main__":
    cli.interruptible(main)
