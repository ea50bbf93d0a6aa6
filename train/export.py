"""Export a run for serving: `python -m train.export --workdir RUN --out DIR [--dtype bfloat16] [--step N]`.

Writes a `jax.export` artifact of the prediction function (symbolic batch size) with its parameters, text
features, vocabularies and manifest; `DIR/serve.py` loads and calls it with jax alone (docs/EXPORT.md).
"""

from __future__ import annotations

import argparse

from sr_jax import io
from sr_jax.export import serving, trained
from train import cli


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--workdir", required=True, help="the run folder (config.json, checkpoints/)")
    p.add_argument("--out", required=True, help="the artifact's folder (an artifact there is replaced)")
    cli.add_overwrite(p)
    p.add_argument("--dtype", default="float32", choices=serving.DTYPES, help="parameters' and text features' dtype")
    p.add_argument("--step", type=int, default=None, help="a checkpoint step (default: the run's result)")
    p.add_argument("--platforms", default="cpu,cuda", help="comma-separated platforms to lower for")
    args = p.parse_args(argv)
    cli.setup()
    io.claim(args.out, io.ARTIFACT, args.overwrite, inputs=(args.workdir,))  # before the model is loaded
    model = trained.load(args.workdir, args.step)
    platforms = tuple(args.platforms.split(","))
    manifest = serving.export(model, model.text_table(), args.out, args.dtype, platforms, args.overwrite)
    print(
        f"wrote {args.out}: step {model.step} ({model.chosen_by}), {manifest['params']['count']:,} parameters in "
        f"{args.dtype}, {serving.size_bytes(args.out) / 2**20:.1f} MiB, {manifest['export_seconds']:.1f} s"
    )
    return manifest


if __name__ == "__main__":
    cli.interruptible(main)
