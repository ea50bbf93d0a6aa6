"""Per-device memory of the train step against the size of the text table:
`XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m train.bench_text_table [--texts N] [--text-dim D]
[--mesh-model M] [--out FILE]`.

The full model's train step (configs/bench.py, batch 4096) is compiled, not run, with the text table given as
shapes only, so a table far larger than the machine's memory can be measured: parameters, optimizer state,
inputs (batch + text table) and XLA's temporaries per device (`memory.estimate`), for the table split by rows
over the model axis with the summary-token vectors (what `cls` gating needs) and without them (every other
gating). The replicated layout, `pooled` and `summary` whole on every device, is given by its table's size
per device (the step is not compiled for it).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from sr_jax import memory, sharding as shd
from sr_jax.bench.timing import host_batches
from sr_jax.bench.world import bench_meta, random_columns
from sr_jax.config import MeshConfig, override
from sr_jax.model import TextTable
from sr_jax.training.program import build_program
from train import cli


def table(shape: tuple[int, int], spec: P, mesh) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(shape, np.float32, sharding=NamedSharding(mesh, spec))


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--texts", type=int, default=10_000_000)
    p.add_argument("--text-dim", type=int, default=384)
    p.add_argument("--mesh-model", type=int, default=8)
    p.add_argument("--out", default=None, help="also write the rows as JSON here")
    args = p.parse_args(argv)
    cli.setup()
    model = args.mesh_model
    cfg = override(cli.config_from_name("bench"), [f"mesh.model={model}", f"mesh.data={jax.device_count() // model}"])
    mesh = shd.make_mesh(MeshConfig(data=jax.device_count() // model, model=model))
    meta = bench_meta(num_texts=args.texts)
    program = build_program(cfg, meta, args.text_dim, mesh, total_steps=1_000)
    batch = shd.to_global(host_batches(random_columns(meta, cfg.data.batch_size), cfg.data.batch_size, 1)[0],
                          shd.batch_sharding(mesh))  # fmt: skip
    rows_padded = -(-args.texts // model) * model
    split, none = (rows_padded, args.text_dim), (model, args.text_dim)
    layouts = {
        "rows over model, with summary (cls gating)": TextTable(
            table(split, P("model"), mesh), table(split, P("model"), mesh)
        ),
        "rows over model, no summary (other gatings)": TextTable(
            table(split, P("model"), mesh), table(none, P("model"), mesh)
        ),
    }
    replicated = 2 * args.texts * args.text_dim * 4
    out = [{"layout": "replicated pooled + summary", "text_table_gib": replicated / memory.GiB}]
    for name, text in layouts.items():
        compiled = program.train_step.lower(program.abstract_state, batch, text, None).compile()
        estimate = memory.estimate(program.abstract_state, (batch, text, None), compiled)
        gib = {
            "text_table_gib": memory.per_device_bytes(text),
            "inputs_gib": estimate.inputs,
            "temporaries_gib": estimate.temporaries or 0,
            "total_gib": estimate.total,
        }
        out.append({"layout": name, **{k: v / memory.GiB for k, v in gib.items()}})
    device = f"{jax.devices()[0].device_kind} x{jax.device_count()} ({jax.default_backend()})"
    print(f"\n{args.texts:,} texts x {args.text_dim}, mesh model={model}, {device}; GiB per device\n")
    print("| text table layout | text table | inputs | XLA temporaries | step total |\n|---|---|---|---|---|")
    for r in out:
        cells = [
            f"{r[k]:.2f}" if k in r else "n/a" for k in ("text_table_gib", "inputs_gib", "temporaries_gib", "total_gib")
        ]
        print(f"| {r['layout']} | " + " | ".join(cells) + " |")
    if args.out:
        Path(args.out).write_text(json.dumps({"device": device, "texts": args.texts, "rows": out}, indent=2) + "\n")
    return out


if __name__ == "__main__":
    cli.interruptible(main)
