"""Scaling read from the compiled program: `python -m train.bench_scaling [--devices 1 2 4 8 ..] [--models default
star ..] [--modes weak strong] [--meshes data data-model] [--updates dense rowwise_adagrad] [--out DIR]
[--compiled-on cpu|gpu] [overrides of configs/bench.py]`.

Compiles the real train step (configs/bench.py's network on a world of --fields id fields of --rows rows) for
each device count D on a mesh of D devices: `data` (D x 1: the batch over data) or `data-model` (D/2 x 2, the
tables split by rows over `model`, the batch over both axes, the default rule), at a fixed
per-device batch (weak scaling, --batch rows a device) and at a fixed global batch (strong, --global-batch).
Nothing runs: each program is compiled for abstract inputs, so D = 64 and 100M-row tables cost only compile
time. From each compiled program it reads the per-device FLOPs, bytes accessed and every collective (kind,
group, bytes; `sr_jax.bench.compiled`) and projects a step time on H100 SXM, TPU v5e and TPU v5p
(`sr_jax.bench.roofline`), hence examples/s and the scaling efficiency against D = 1 (examples/s at D over
D x examples/s at 1). `--compiled-on cpu` (default) compiles for D virtual CPU devices; `gpu` for the local
GPUs (D up to their count). Writes DIR/scaling.json, scaling.md and scaling.png; prints the table last.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import re
import shlex
import sys
import time
from pathlib import Path

log = logging.getLogger("sr_jax")

MODELS = {
    "default": {},
    "ple": {"backbone": "ple"},
    "star": {"backbone": "star", "num_experts": 4},
}  # star has no shared experts: the default count
# the model axis: 1, 2, all D (the batch over both axes when > 1); routed: tables read by all-to-all (model.lookup)
MESHES = ("data", "data-model", "tables", "tables-routed")


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--devices", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    p.add_argument("--models", nargs="+", default=["default", "star"], choices=list(MODELS))
    p.add_argument("--modes", nargs="+", default=["weak", "strong"], choices=["weak", "strong"])
    p.add_argument("--meshes", nargs="+", default=list(MESHES), choices=MESHES)
    p.add_argument("--updates", nargs="+", default=["dense"], choices=["dense", "rowwise_adagrad", "lazy_adam"])
    p.add_argument("--batch", type=int, default=4096, help="rows a device (weak scaling)")
    p.add_argument("--global-batch", type=int, default=65536, help="rows of the global batch (strong scaling)")
    p.add_argument("--rows", type=int, default=100_000, help="rows per id field")
    p.add_argument("--fields", type=int, default=15)
    p.add_argument("--domains", type=int, default=7)
    p.add_argument("--text-dim", type=int, default=384)
    p.add_argument("--texts", type=int, default=10_000, help="rows of the text table (frozen features)")
    p.add_argument(
        "--inter-node-efficiency", type=float, default=0.6,
        help="the share of the line rate a collective gets between nodes (islands)",
    )  # fmt: skip
    p.add_argument("--compiled-on", default="cpu", choices=["cpu", "gpu"])
    p.add_argument(
        "--lookups", type=int, nargs="*", default=None, metavar="ROWS",
        help="instead: one table's lookup and gradient at these rows per field (default 1M and 100M), replicated, "
        "GSPMD row-sharded and routed by all-to-all (sr_jax/model/lookup.py), for each of --devices",
    )  # fmt: skip
    p.add_argument(
        "--drops", type=int, default=None, metavar="ROWS",
        help="instead: run the routed lookup of one table of ROWS rows at the default capacity, --batch ids a device "
        "drawn uniform, Zipf and among the last 10%% of rows, stored in row order and strided (model.row_layout), "
        "for each of --devices, and count the unique ids it drops",
    )  # fmt: skip
    p.add_argument("--out", default="runs/bench_scaling")
    p.add_argument("overrides", nargs="*", help="section.field=value on configs/bench.py")
    args = p.parse_args(argv)
    if args.compiled_on == "cpu":  # before the backend starts: D virtual devices (XLA reads this once)
        asked = re.findall(r"--xla_force_host_platform_device_count=(\d+)", os.environ.get("XLA_FLAGS", ""))
        # never fewer than already asked for (the test session's 8): a later flag wins if the backend starts after
        flag = f"--xla_force_host_platform_device_count={max([*args.devices, *map(int, asked)])}"
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flag}".strip()
        os.environ["JAX_PLATFORMS"] = "cpu"
    from train import cli

    cli.setup()
    import jax

    devices = jax.devices()
    if max(args.devices) > len(devices):
        raise SystemExit(f"--devices {max(args.devices)}: only {len(devices)} {devices[0].platform} devices here")
    from sr_jax.config import override

    command = "python -m train.bench_scaling " + shlex.join(sys.argv[1:] if argv is None else argv)
    if args.drops is not None:
        from sr_jax.bench.world import ID_MODES
        from sr_jax.config import ROW_LAYOUTS

        rows = [count_drops(args.drops, d, args.batch, ids, layout, devices[:d])
                for d in args.devices if d > 1 for ids in ID_MODES for layout in ROW_LAYOUTS]  # fmt: skip
        write_drops(rows, Path(args.out), command)
        return rows
    if args.lookups is not None:
        rows = [
            measure_lookup(layout, table_rows, d, args.batch, args.fields, devices[:d])
            for table_rows in args.lookups or [1_000_000, 100_000_000]
            for d in args.devices
            if d > 1
            for layout in LOOKUPS
        ]
        write_lookups(rows, Path(args.out), command, args)
        return rows
    base = override(cli.config_from_name("bench"), args.overrides)
    rows = []
    for model in args.models:
        for update in args.updates:
            for mode in args.modes:
                rows.append(measure(base, args, model, update, mode, "data", 1, devices[:1]))  # the baseline
                for mesh in args.meshes:
                    for d in args.devices:
                        routed_lazy = mesh == "tables-routed" and update == "lazy_adam"  # config.validate refuses
                        if d > 1 and (mesh == "data" or d % 2 == 0) and not routed_lazy:
                            rows.append(measure(base, args, model, update, mode, mesh, d, devices[:d]))
    with_efficiency(rows)
    write_report(rows, Path(args.out), command, f"{devices[0].device_kind} ({devices[0].platform})")
    return rows


def measure(base, args, model: str, update: str, mode: str, mesh_kind: str, d: int, devices) -> dict:
    """One compiled train step's per-device work and its projections."""
    import jax
    import numpy as np

    from sr_jax import model as sr_model
    from sr_jax import sharding as shd
    from sr_jax.bench import compiled as reader
    from sr_jax.bench import roofline
    from sr_jax.bench.world import bench_meta
    from sr_jax.config import MeshConfig
    from sr_jax.data.pipeline import join_texts
    from sr_jax.training.program import build_program
    from sr_jax.training.spec import text_inputs

    batch = args.batch * d if mode == "weak" else args.global_batch
    model_axis = {"data": 1, "data-model": 2, "tables": d, "tables-routed": d}[mesh_kind]
    lookup = "all_to_all" if mesh_kind == "tables-routed" else "gspmd"
    cfg = dataclasses.replace(
        base,
        data=dataclasses.replace(base.data, batch_size=batch),
        model=dataclasses.replace(base.model, lookup=lookup, **MODELS[model]),
        train=dataclasses.replace(base.train, embedding_update=update),
        mesh=MeshConfig(data=d // model_axis, model=model_axis),
    )
    meta = bench_meta(args.fields, args.rows, args.domains, num_texts=args.texts)
    mesh = shd.make_mesh(cfg.mesh, devices)
    parsed = shd.parse_rules(cfg.mesh.rules)
    started = time.perf_counter()
    program = build_program(cfg, meta, args.text_dim, mesh, total_steps=1_000_000)
    # one example's columns; with data.text_join=host its text vectors too, as the input pipeline joins them
    first = {name: np.zeros((1, *shape), dtype) for name, (dtype, shape) in meta.columns().items()}
    _, joined = text_inputs(cfg, mesh, *[np.zeros((1, args.text_dim), np.float32)] * 2, parsed)
    host = bool(joined)
    first = join_texts(first, joined) if host else first
    inputs = {
        name: jax.ShapeDtypeStruct((batch, *col.shape[1:]), col.dtype, sharding=shd.batch_sharding(mesh, parsed))
        for name, col in first.items()
    }
    texts = model_axis if host else -(-meta.num_texts // model_axis) * model_axis  # host: zero rows only
    table = jax.ShapeDtypeStruct((texts, args.text_dim), np.float32, sharding=shd.text_sharding(mesh, parsed))
    text = sr_model.TextTable(table, table)
    compiled = program.train_step.lower(program.abstract_state, inputs, text, None).compile()
    compile_s = time.perf_counter() - started
    flops, accessed = reader.step_cost(compiled)
    found = reader.collectives(compiled.as_text(), d)
    kernels = reader.kernels(compiled.as_text())
    infeed = sum(math.prod(x.shape) * x.dtype.itemsize for x in inputs.values()) / d  # a device's batch bytes
    row = dict(
        model=model, mode=mode, mesh=mesh_kind, update=update, devices=d, global_batch=batch, rows=args.rows,
        texts=args.texts, text_join=cfg.data.text_join, inter_node_efficiency=args.inter_node_efficiency,
        flops_per_device=flops, bytes_per_device=accessed,
        collective_bytes_per_device=sum(c.wire_bytes for c in found), infeed_bytes_per_device=infeed, kernels=kernels,
        collectives=reader.summary(found), compile_s=round(compile_s, 1),
        step_seconds={}, projected_examples_per_s={}, costliest_collective={},
    )  # fmt: skip
    for name, acc in roofline.ACCELERATORS.items():
        times = roofline.step_seconds(acc, flops, accessed, found, args.inter_node_efficiency, infeed, kernels)
        row["step_seconds"][name] = times
        row["projected_examples_per_s"][name] = batch / times["step"]
        row["costliest_collective"][name] = roofline.costliest(acc, found, args.inter_node_efficiency)
    log.info(
        "%s %s %s %s D=%d: %.3g GFLOP, %.3g GB, %.3g MB on the wire a device; H100 %.3g ex/s (%.0f s to compile)",
        model, update, mode, mesh_kind, d, flops / 1e9, accessed / 1e9, row["collective_bytes_per_device"] / 1e6,
        row["projected_examples_per_s"]["h100"], compile_s,
    )  # fmt: skip
    return row


LOOKUPS = {
    "replicated": "the table on every device (batch over data): no lookup collective, the table's dense gradient "
    "all-reduced",
    "gspmd": "rows split over all devices, batch over all (the default rule, `batch=data+model`): XLA's masked "
    "gather and "
    "its collectives",
    "all-to-all": "rows split over all devices, ids routed to their rows' owner and vectors back "
    "(sr_jax/model/lookup.py, capacity factor 2)",
}


def count_drops(table_rows: int, d: int, batch: int, ids: str, layout: str, devices) -> dict:
    """The routed lookup run (not compiled only) on D devices at the default capacity: unique ids dropped."""
    import jax
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P

    from sr_jax.bench.world import draw_ids
    from sr_jax.model import rows as layouts
    from sr_jax.model.lookup import routed_lookup

    mesh = jax.make_mesh((1, d), ("data", "model"), devices=devices)
    size = -(-table_rows // 64) * 64
    table = jax.device_put(np.zeros((size, 8), np.float32), NamedSharding(mesh, P("model", None)))
    drawn = draw_ids(np.random.default_rng(0), table_rows, (d * batch,), ids)
    at = jax.device_put(layouts.position(drawn, size, 64, layout), NamedSharding(mesh, P(("data", "model"))))
    _, dropped = jax.jit(lambda t, i: routed_lookup([t], [i], mesh))(table, at)
    unique = sum(len(np.unique(drawn[k * batch : (k + 1) * batch])) for k in range(d))
    log.info("drops: %s ids, %s rows, D=%d: %d of %d unique ids dropped", ids, layout, d, int(dropped), unique)
    return dict(ids=ids, row_layout=layout, devices=d, table_rows=table_rows, ids_per_device=batch,
                unique_ids=unique, dropped=int(dropped))  # fmt: skip


def write_drops(rows: list[dict], out: Path, command: str) -> None:
    from sr_jax.experiments import report

    out.mkdir(parents=True, exist_ok=True)
    (out / "drops.json").write_text(json.dumps(rows, indent=2) + "\n")
    lines = [
        *report.header("Lookups the routed exchange drops at the default capacity", command),
        "Unique ids a device sends, summed over devices, and those past the capacity (2x a device's fair share "
        "per owner), by how ids are drawn and where the table stores its rows (`model.row_layout`).",
        "",
        "| ids | rows stored | D | table rows | ids a device | unique ids | dropped | share |",
        "|---|---|---|---|---|---|---|---|",
        *(f"| {r['ids']} | {r['row_layout']} | {r['devices']} | {r['table_rows']:,} | {r['ids_per_device']:,} | "
          f"{r['unique_ids']:,} | {r['dropped']:,} | {r['dropped'] / r['unique_ids']:.0%} |" for r in rows),
    ]  # fmt: skip
    (out / "drops.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def measure_lookup(layout: str, table_rows: int, d: int, batch: int, fields: int, devices) -> dict:
    """`fields` tables' lookups and their gradient (dim 32), `batch` ids a device each, compiled for D devices:
    the bytes a device sends per step."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P

    from sr_jax import sharding as shd
    from sr_jax.bench import compiled as reader
    from sr_jax.config import MeshConfig
    from sr_jax.model.lookup import routed_lookup

    split = layout != "replicated"
    mesh = shd.make_mesh(MeshConfig(data=1 if split else d, model=d if split else 1), devices)
    rows = -(-table_rows // d) * d
    table = jax.ShapeDtypeStruct((rows, 32), jnp.float32, sharding=NamedSharding(mesh, P("model" if split else None)))
    ids = jax.ShapeDtypeStruct((batch * d,), jnp.int32, sharding=NamedSharding(mesh, P(("data", "model"))))
    cotangent = jax.ShapeDtypeStruct((batch * d, 32), jnp.float32, sharding=NamedSharding(mesh, P(("data", "model"))))
    if layout == "all-to-all":
        gather = lambda t, i: routed_lookup(t, i, mesh)[0]  # noqa: E731
    else:
        gather = lambda t, i: [a[b] for a, b in zip(t, i)]  # noqa: E731

    def step(t, i, c):
        return jax.grad(lambda t: sum(jnp.sum(v * g) for v, g in zip(gather(t, i), c)))(t)

    tables, ids, cotangents = [table] * fields, [ids] * fields, [cotangent] * fields  # each its own argument
    program = jax.jit(step, out_shardings=[table.sharding] * fields).lower(tables, ids, cotangents).compile()
    found = reader.collectives(program.as_text(), d)
    kinds = reader.summary(found)
    flops, accessed = reader.step_cost(program)
    return dict(
        layout=layout, devices=d, table_rows=table_rows, ids_per_device=batch, fields=fields,
        flops_per_device=flops, bytes_per_device=accessed,
        collective_bytes_per_device=sum(c.wire_bytes for c in found),
        collectives={k: v["count"] for k, v in kinds.items()},
    )  # fmt: skip


def write_lookups(rows: list[dict], out: Path, command: str, args) -> None:
    from sr_jax.experiments import report

    out.mkdir(parents=True, exist_ok=True)
    (out / "lookups.json").write_text(json.dumps(rows, indent=2) + "\n")
    layouts = list(LOOKUPS)
    lines = [
        *report.header("Embedding lookups at pod scale: bytes each device sends per step", command),
        f"{args.fields} tables of 32-wide rows, {args.batch:,} ids a device per table, the lookup and its gradient, "
        "compiled for D virtual devices; MB sent per device per step for all tables (ring algorithms; "
        "`sr_jax/bench/compiled.py`). Layouts:",
        "",
        *[f"- `{k}`: {v}" for k, v in LOOKUPS.items()],
        "",
        "| rows per table | D | " + " | ".join(f"{k} MB" for k in layouts) + " | fewest |",
        "|---|---|" + "---|" * (len(layouts) + 1),
    ]
    for table_rows, d in dict.fromkeys((r["table_rows"], r["devices"]) for r in rows):
        by = {r["layout"]: r for r in rows if (r["table_rows"], r["devices"]) == (table_rows, d)}
        sent = {k: by[k]["collective_bytes_per_device"] / 1e6 for k in layouts if k in by}
        cells = " | ".join(f"{sent[k]:,.1f}" if k in sent else "" for k in layouts)
        lines.append(f"| {table_rows:,} | {d} | {cells} | {min(sent, key=sent.get)} |")
    table = "\n".join(lines)
    (out / "lookups.md").write_text(table + "\n")
    print(table)


def with_efficiency(rows: list[dict]) -> None:
    """Each row's efficiency per accelerator: examples/s at D over D x examples/s of the same model, update and
    mode at D = 1 (the 1-device `data` mesh: a data-model mesh needs 2), and `efficiency_vs_best` over D x the
    best one-device configuration of the same model and mode (whatever its update: one device's best is
    row-wise Adagrad where it was compiled)."""
    ones = {(r["model"], r["update"], r["mode"]): r for r in rows if r["devices"] == 1}
    for r in rows:
        one = ones.get((r["model"], r["update"], r["mode"]))
        mine = [o for (m, _, mode), o in ones.items() if (m, mode) == (r["model"], r["mode"])]
        r["efficiency"], r["efficiency_vs_best"] = {}, {}
        for acc, v in r["projected_examples_per_s"].items():
            r["efficiency"][acc] = None if one is None else v / (r["devices"] * one["projected_examples_per_s"][acc])
            best = max((o["projected_examples_per_s"][acc] for o in mine), default=None)
            r["efficiency_vs_best"][acc] = None if best is None else v / (r["devices"] * best)


TEXT_JOINS = {
    "device": "the text table on the devices (data.text_join=device)",
    "host": "each example's text vectors joined on the host and fed with its batch (data.text_join=host)",
}


def write_report(rows: list[dict], out: Path, command: str, compiled_on: str) -> None:
    from sr_jax.bench import roofline
    from sr_jax.experiments import report

    out.mkdir(parents=True, exist_ok=True)
    (out / "scaling.json").write_text(json.dumps(rows, indent=2) + "\n")
    names = list(roofline.ACCELERATORS)
    lines = [
        *report.header("Scaling of the train step, read from the compiled program", command),
        f"Compiled on: {compiled_on}. Per device: XLA's FLOPs and bytes accessed, and the bytes its collectives "
        "send (ring algorithms). Projected from XLA:CPU counts at 100% of peak FLOP/s and HBM bandwidth with no "
        "kernel launch cost (a lower bound on a step's compute and memory time), no overlap of compute and "
        f"communication, collectives between nodes at {rows[0]['inter_node_efficiency']:.0%} of line rate and a TPU "
        "all-to-all at the torus bisection's share of a chip's links: examples/s and efficiency (examples/s at D "
        "over D x at 1 with the same update; `vs best`: over D x the best one-device configuration) on "
        + ", ".join(roofline.ACCELERATORS[n].name for n in names)
        + f" (`sr_jax/bench/roofline.py`; docs/PERFORMANCE.md), {rows[0]['texts']:,} texts in the text table, "
        + TEXT_JOINS[rows[0]["text_join"]]
        + ". `MB in/dev`: a device's batch from its host, moved while the step before runs (a step takes at least "
        "its time). `kernels`: those the compiled step launches (the compiling backend's count); `us/kernel`: the "
        "H100's compute or memory term over them: where a kernel costs more than that to launch and run (a few us "
        "on a GPU), the H100 figure is bound by kernel count, an upper bound on its rate rather than a projection. "
        "`costliest` names the collective kind that costs the H100 projection the most.",
        "",
        "| model | update | mode | mesh | D | global batch | GFLOP/dev | GB accessed/dev | MB sent/dev | MB in/dev | "
        "kernels | us/kernel (H100) | "
        + " | ".join(f"{roofline.ACCELERATORS[n].name} ex/s | eff. | vs best" for n in names)
        + " | costliest (H100) |",
        "|" + "---|" * (13 + 3 * len(names)),
    ]
    for r in rows:
        cells = []
        for n in names:
            shares = (r["efficiency"][n], r["efficiency_vs_best"][n])
            cells += [f"{r['projected_examples_per_s'][n]:,.0f}", *("" if e is None else f"{e:.0%}" for e in shares)]
        lines.append(
            f"| {r['model']} | {r['update']} | {r['mode']} | {r['mesh']} | {r['devices']} | {r['global_batch']:,} | "
            f"{r['flops_per_device'] / 1e9:.2f} | {r['bytes_per_device'] / 1e9:.3f} | "
            f"{r['collective_bytes_per_device'] / 1e6:.2f} | {r['infeed_bytes_per_device'] / 1e6:.2f} | "
            f"{r['kernels']} | {r['step_seconds']['h100']['us_per_kernel']:.2f} | "
            + " | ".join(cells)
            + f" | {r['costliest_collective']['h100']} |"
        )
    table = "\n".join(lines)
    (out / "scaling.md").write_text(table + "\n\n![scaling efficiency against devices](scaling.png)\n")
    panels = {
        f"{mode} scaling, {roofline.ACCELERATORS[n].name}": [
            dict(r, efficiency_mean=r["efficiency"][n], efficiency_std=0.0, series=f"{r['model']} {r['mesh']}")
            for r in rows
            if r["mode"] == mode and r["efficiency"][n] is not None
        ]
        for mode in dict.fromkeys(r["mode"] for r in rows)
        for n in ("h100", "tpu-v5p")
    }
    report.plot_lines(
        out / "scaling.png", panels, "devices", "efficiency", ("series",), style_key="update",
        xlabel="devices", ylabel="projected scaling efficiency", logx=True,
    )  # fmt: skip
    print(table)


if __name__ == "__main__":
    from train import cli

    cli.interruptible(main)
