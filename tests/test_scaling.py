"""Data parallelism read from the compiled train step: each device computes its share of the global batch
(per-device FLOPs = one device's / the devices the batch is split over), the per-domain layers included, and no
collective gathers the batch (XLA may all-gather a tiny table rather than move its vectors)."""

import re
from pathlib import Path

import jax
import pytest

from helpers import TINY, config
from sr_jax import sharding as shd
from sr_jax.config import override
from sr_jax.training import trainer

BATCH = 16384  # global: 2,048 rows a device at 8, so the per-shard tile padding (7 domains x 31 rows) is small


def _compiled(tmp_path, backbone: str, data: int, model: int, rules: tuple[str, ...] = (), assignments=()):
    mesh = {"data": data, "model": model, **({"rules": rules} if rules else {})}
    cfg = override(config(TINY, model={"backbone": backbone}, mesh=mesh), list(assignments))
    run = trainer.build_run(
        cfg,
        tmp_path / f"{backbone}-{data}x{model}-{len(assignments)}",
        mesh=shd.make_mesh(cfg.mesh, jax.devices()[: data * model]),
    )
    spec = run.spec
    batch = {
        k: jax.ShapeDtypeStruct((BATCH, *v.shape[1:]), v.dtype, sharding=v.sharding)
        for k, v in spec.batch_shapes().items()
    }
    compiled = spec.program.train_step.lower(spec.program.abstract_state, batch, spec.text, spec.reference).compile()
    run.close()
    cost = compiled.cost_analysis()
    return (cost[0] if isinstance(cost, list) else cost)["flops"], compiled.as_text()


@pytest.mark.parametrize(
    "backbone, meshes",
    [("mmoe", [(8, 1), (4, 2)]), ("ple", [(8, 1)]), ("star", [(8, 1)]), ("hamur", [(8, 1)]), ("m3oe", [(8, 1)])],
)
def test_each_device_computes_its_share_of_the_batch(tmp_path, backbone, meshes):
    one, _ = _compiled(tmp_path, backbone, 1, 1)
    for data, model in meshes:
        flops, hlo = _compiled(tmp_path, backbone, data, model)
        assert flops == pytest.approx(one / (data * model), rel=0.10), (backbone, data, model, flops, one / data)
        gathered = [int(rows) for rows in re.findall(r"= \w+\[(\d+)[,\]][^\n]* all-gather\(", hlo)]
        assert all(rows < BATCH // 8 for rows in gathered), ("a collective gathers the batch", gathered)


def test_the_default_layout_puts_the_batch_on_every_device(tmp_path):
    """With `mesh.model > 1` and no rule, each of the 8 devices of a 4 x 2 mesh computes an eighth of the batch (the
    tables still split by rows over `model`); `mesh.rules=batch=data` (a config change, no code) puts the batch on
    `data` alone, and the model axis repeats the dense layers."""
    one, _ = _compiled(tmp_path, "mmoe", 1, 1)
    flops, hlo = _compiled(tmp_path, "mmoe", 4, 2)
    assert flops == pytest.approx(one / 8, rel=0.10), (flops, one / 8)
    on_data, _ = _compiled(tmp_path, "mmoe", 4, 2, rules=("batch=data",))
    assert on_data == pytest.approx(one / 4, rel=0.10)


def _docs_commands() -> list[list[str]]:
    """Every `train.pretrain` command of docs/SCALE.md's launch section: its config assignments."""
    text = (Path(__file__).parents[1] / "docs" / "SCALE.md").read_text()
    block = text.split("## Launching on a pod or a cluster")[1].split("```bash")[1].split("```")[0]
    commands = [line for line in block.replace("\\\n", " ").splitlines() if "train.pretrain" in line]
    return [[w.strip('"') for w in c.split() if "=" in w and w[0].islower()] for c in commands]


def test_the_scale_doc_s_launch_commands_give_each_device_its_share(tmp_path):
    """docs/SCALE.md's pod and cluster commands, compiled on 8 virtual devices with their layout (rules, lookup,
    model axis; the model axis cut to the 8 devices there are): each device computes an eighth of the batch."""
    commands = _docs_commands()
    assert len(commands) >= 3 and any("mesh.model=64" in c for c in commands), commands
    one, _ = _compiled(tmp_path, "mmoe", 1, 1)
    for assignments in commands:
        keys = ("mesh.rules", "model.lookup", "model.table_row_multiple", "data.text_join")
        kept = [a for a in assignments if a.split("=")[0] in keys]
        model = min(8, int(next((a.split("=")[1] for a in assignments if a.startswith("mesh.model=")), 1)))
        flops, _ = _compiled(tmp_path, "mmoe", 8 // model, model, assignments=kept)
        # the routed lookup adds its dedupe and exchange per row (15% of this tiny network); a repeated layout: +100%
        slack = 0.20 if "model.lookup=all_to_all" in kept else 0.10
        assert flops == pytest.approx(one / 8, rel=slack), (assignments, flops, one / 8)
