"""The train step over a mesh of 8 CPU devices matches the single-device step."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from helpers import TINY, config
from sr_jax.training import trainer
from sr_jax.treeutil import path_str


def _train(cfg, workdir, devices, steps=6):
    mesh = trainer.shd.make_mesh(cfg.mesh, devices)
    run = trainer.build_run(cfg, workdir, mesh=mesh)
    state = trainer.train(run, trainer.initial_state(run), until=steps)
    return run, state


@pytest.mark.parametrize("data, model", [(8, 1), (4, 2)])
def test_sharded_step_matches_single_device(tmp_path, data, model):
    assert len(jax.devices()) == 8, "conftest sets --xla_force_host_platform_device_count=8"
    cfg = config(TINY, train={"checkpoint_every": 1000})
    _, single = _train(cfg, tmp_path / "one", jax.devices()[:1])
    sharded_cfg = config(TINY, train={"checkpoint_every": 1000}, mesh={"data": data, "model": model})
    run, sharded = _train(sharded_cfg, tmp_path / "many", jax.devices())
    assert dict(run.mesh.shape) == {"data": data, "model": model}
    item_table = sharded.params["l0"]["id_tables"]["item"]
    rows = TINY.num_items
    assert item_table.sharding.spec == P("model", None)
    assert item_table.addressable_shards[0].data.shape == (rows // model, cfg.model.dim)
    (mu,) = [  # Adam's first moment of the table is sharded like the table
        leaf
        for path, leaf in jax.tree_util.tree_leaves_with_path(sharded.opt_state)
        if path_str(path).endswith("mu/l0/id_tables/item")
    ]
    assert mu.sharding.spec == P("model", None)
    assert sharded.params["l1"]["experts"]["layers"][0]["kernel"].sharding.spec == P()
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=2e-5),
        single.params,
        sharded.params,
    )
    probs_single = trainer.evaluate(_train(cfg, tmp_path / "one", jax.devices()[:1], 0)[0], single.params)
    assert abs(probs_single["overall"]["auc"] - trainer.evaluate(run, sharded.params)["overall"]["auc"]) < 1e-3


def test_batch_must_divide_over_the_data_axis(tmp_path):
    cfg = config(TINY, data={"batch_size": 100, "synthetic": TINY, "eval_batch_size": 512}, mesh={"data": 8})
    with pytest.raises(ValueError, match="data.batch_size=100 is not divisible"):
        trainer.build_run(cfg, tmp_path)
