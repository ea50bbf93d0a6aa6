"""Data parallelism read from the compiled train step: on a mesh whose `data` axis splits the batch, each device
computes its share of the global batch (per-device FLOPs = one device's / data-axis size), the per-domain
layers included, and no collective gathers the batch."""

import re

import jax
import pytest

from helpers import TINY, config
from sr_jax import sharding as shd
from sr_jax.training import trainer

BATCH = 16384  # global: 2,048 rows a device at 8, so the per-shard tile padding (7 domains x 31 rows) is small


def _compiled(tmp_path, backbone: str, data: int, model: int, rules: tuple[str, ...] = ()):
    mesh = {"data": data, "model": model, **({"rules": rules} if rules else {})}
    cfg = config(TINY, model={"backbone": backbone}, mesh=mesh)
    run = trainer.build_run(
        cfg, tmp_path / f"{backbone}-{data}x{model}", mesh=shd.make_mesh(cfg.mesh, jax.devices()[: data * model])
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
        assert flops == pytest.approx(one / data, rel=0.10), (backbone, data, model, flops, one / data)
        assert not re.search(r" all-gather\(", hlo), "a collective gathers the batch onto every device"


def test_a_logical_rule_puts_the_batch_on_both_axes(tmp_path):
    """`mesh.rules=batch=data+model` (a config change, no code): on a 4 x 2 mesh every one of the 8 devices
    computes an eighth of the batch, the tables still split by rows over `model`."""
    one, _ = _compiled(tmp_path, "mmoe", 1, 1)
    flops, hlo = _compiled(tmp_path, "mmoe", 4, 2, rules=("batch=data+model",))
    assert flops == pytest.approx(one / 8, rel=0.10), (flops, one / 8)
    default, _ = _compiled(tmp_path, "mmoe", 4, 2)
    assert default == pytest.approx(one / 4, rel=0.10)  # batch=data: the model axis repeats the dense layers
