"""The per-device memory estimate, and the clear error before a run that cannot fit."""

import jax
import numpy as np
import pytest

from helpers import TINY, config
from sr_jax import model as sr_model
from sr_jax import memory
from sr_jax.training import trainer
from sr_jax.training.program import build_program
from sr_jax import sharding as shd


def _run(tmp_path, **mesh):
    cfg = config(TINY, train={"embedding_update": "lazy_adam"}, mesh=mesh or {"data": 1})
    devices = jax.devices() if mesh else jax.devices()[:1]
    return trainer.build_run(cfg, tmp_path, mesh=shd.make_mesh(cfg.mesh, devices))


def test_parameters_and_optimizer_state_are_counted_per_device(tmp_path):
    one, split = _run(tmp_path / "one"), _run(tmp_path / "split", data=4, model=2)
    params = one.spec.program.abstract_state.params
    exact = sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(params))
    assert memory.per_device_bytes(params) == exact
    tables = jax.tree.leaves((params["l0"]["id_tables"], params["l0"]["sparse_tables"]))
    halved = sum(int(np.prod(t.shape)) * 4 // 2 for t in tables)  # tables are padded: every one splits
    assert halved > 0  # on a model axis of 2, a table costs half per device
    assert memory.per_device_bytes(split.spec.program.abstract_state.params) == exact - halved
    state = one.spec.program.abstract_state
    opt_one = memory.per_device_bytes((state.opt_state, state.tables_state))
    assert opt_one >= 2 * exact - 64  # Adam's two moments of everything (lazy Adam's of the tables)
    estimate = memory.estimate(one.spec.program.abstract_state, {})
    assert estimate.params == exact and estimate.temporaries is None and estimate.capacity > 0


def test_a_run_that_cannot_fit_fails_before_allocating(tmp_path, monkeypatch):
    run = _run(tmp_path)
    monkeypatch.setattr(memory, "device_capacity", lambda device: 1 << 20)  # a 1 MiB device
    with pytest.raises(memory.OutOfMemoryError, match=r"(?s)needs about .* GiB per device.*parameters.*mesh.model"):
        run.compiled_train_step()
    monkeypatch.undo()
    step = run.compiled_train_step()
    assert step.memory_analysis() is None or step.memory_analysis().temp_size_in_bytes > 0


@pytest.mark.parametrize("freeze", [("l0", "l1"), ("l0",)])
def test_frozen_tables_cost_no_gradient_memory(freeze):
    """A fine-tune step with L0 frozen differentiates only the trainable part: its XLA temporaries do not grow
    with the frozen tables (a dense [rows, d] gradient per table would be 3 x 400k x 32 x 4 B = 147 MiB)."""
    from sr_jax.bench.world import bench_meta

    temporaries = {}
    for vocab in (10_000, 400_000):
        meta = bench_meta(fields=3, vocab=vocab, domains=3)
        cfg = config(TINY, finetune={"freeze": freeze}, data={"batch_size": 256})
        mesh = shd.make_mesh(cfg.mesh, jax.devices()[:1])
        steps = build_program(cfg, meta, 16, mesh, total_steps=10, new_domains=(2,))
        batch = {
            name: jax.ShapeDtypeStruct((256, *shape), dtype, sharding=shd.batch_sharding(mesh))
            for name, (dtype, shape) in meta.columns().items()
        }
        text = sr_model.TextTable(*[jax.ShapeDtypeStruct((meta.num_texts, 16), np.float32)] * 2)
        compiled = steps.train_step.lower(steps.abstract_state, batch, text, None).compile()
        temporaries[vocab] = compiled.memory_analysis().temp_size_in_bytes
    assert temporaries[400_000] < temporaries[10_000] + (1 << 20), temporaries  # grows by < 1 MiB
