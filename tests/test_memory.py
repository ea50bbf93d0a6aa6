"""The per-device memory estimate, and the clear error before a run that cannot fit."""

import jax
import numpy as np
import pytest

from helpers import TINY, config
from sr_jax.training import memory, trainer


def _run(tmp_path, **mesh):
    cfg = config(TINY, train={"embedding_update": "lazy_adam"}, mesh=mesh or {"data": 1})
    devices = jax.devices() if mesh else jax.devices()[:1]
    return trainer.build_run(cfg, tmp_path, mesh=trainer.shd.make_mesh(cfg.mesh, devices))


def test_parameters_and_optimizer_state_are_counted_per_device(tmp_path):
    one, split = _run(tmp_path / "one"), _run(tmp_path / "split", data=4, model=2)
    params = one.steps.abstract_state.params
    exact = sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(params))
    assert memory.per_device_bytes(params) == exact
    tables = jax.tree.leaves((params["l0"]["id_tables"], params["l0"]["sparse_tables"]))
    halved = sum(int(np.prod(t.shape)) * 4 // 2 for t in tables if t.shape[0] % 2 == 0)
    assert halved > 0  # on a model axis of 2, a table with an even number of rows costs half per device
    assert memory.per_device_bytes(split.steps.abstract_state.params) == exact - halved
    opt_one = memory.per_device_bytes((one.steps.abstract_state.opt_state, one.steps.abstract_state.tables_state))
    assert opt_one >= 2 * exact - 64  # Adam's two moments of everything (lazy Adam's of the tables)
    estimate = memory.estimate(one.steps.abstract_state, {})
    assert estimate.params == exact and estimate.temporaries is None and estimate.capacity > 0


def test_a_run_that_cannot_fit_fails_before_allocating(tmp_path, monkeypatch):
    run = _run(tmp_path)
    monkeypatch.setattr(memory, "device_capacity", lambda device: 1 << 20)  # a 1 MiB device
    with pytest.raises(memory.OutOfMemoryError, match=r"(?s)needs about .* GiB per device.*parameters.*mesh.model"):
        run.compiled_train_step()
    monkeypatch.undo()
    step = run.compiled_train_step()
    assert step.memory_analysis() is None or step.memory_analysis().temp_size_in_bytes > 0
