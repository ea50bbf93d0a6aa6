"""The train step over a mesh of 8 CPU devices matches the single-device step."""

import dataclasses

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from helpers import TINY, config
from sr_jax.training import evaluation, loop, restore, trainer
from sr_jax.treeutil import path_str
from sr_jax import sharding as shd
from sr_jax.model import rows as rows_of


def _train(cfg, workdir, devices, steps=6):
    mesh = shd.make_mesh(cfg.mesh, devices)
    run = trainer.build_run(cfg, workdir, mesh=mesh)
    state = loop.train(run, restore.initial_state(run.spec), until=steps)
    return run, state


@pytest.mark.parametrize("data, model, rule", [(4, 2, "dense"), (4, 2, "lazy_adam")])
def test_sharded_step_matches_single_device(tmp_path, data, model, rule):
    assert len(jax.devices()) == 8, "conftest sets --xla_force_host_platform_device_count=8"
    train = {"checkpoint_every": 1000, "embedding_update": rule}
    cfg = config(TINY, train=train)
    _, single = _train(cfg, tmp_path / "one", jax.devices()[:1])
    sharded_cfg = config(TINY, train=train, mesh={"data": data, "model": model})
    run, sharded = _train(sharded_cfg, tmp_path / "many", jax.devices())
    assert dict(run.spec.mesh.shape) == {"data": data, "model": model}
    item_table = sharded.params["l0"]["id_tables"]["item"]
    assert item_table.sharding.spec == P("model", None)
    assert item_table.addressable_shards[0].data.shape == (128 // model, cfg.model.dim)  # 120 rows padded to 128
    (mu,) = [  # Adam's first moment of the table is sharded like the table
        leaf
        for path, leaf in jax.tree_util.tree_leaves_with_path((sharded.opt_state, sharded.tables_state))
        if path_str(path).endswith(("mu/l0/id_tables/item", "id_tables/item/mu"))
    ]
    assert mu.sharding.spec == P("model", None)
    assert sharded.params["l1"]["backbone"]["experts"]["layers"][0]["kernel"].sharding.spec == P()
    texts = run.spec.dataset.meta.num_texts
    assert (
        run.spec.text.pooled.sharding.spec == P("model") and run.spec.text.pooled.shape[0] == -(-texts // model) * model
    )
    assert run.spec.text.pooled.addressable_shards[0].data.shape[0] == -(-texts // model)  # rows / model per device
    stored = np.asarray(run.spec.text.pooled)  # strided over the model axis (sharding.text_rows): row r on r mod M
    in_order = rows_of.row_order(stored, model, "strided")
    np.testing.assert_array_equal(in_order[:texts], run.spec.dataset.text_cache("hashed-bow")[0])
    assert run.spec.text.summary.shape[0] == model  # domain gating never reads the summary vectors: none kept
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=2e-5),
        single.params,
        sharded.params,
    )
    probs_single = evaluation.evaluate(_train(cfg, tmp_path / "one", jax.devices()[:1], 0)[0].spec, single.params)
    assert abs(probs_single["overall"]["auc"] - evaluation.evaluate(run.spec, sharded.params)["overall"]["auc"]) < 1e-3


def test_batch_must_divide_over_the_data_axis(tmp_path):
    cfg = config(TINY, data={"batch_size": 100, "synthetic": TINY, "eval_batch_size": 512}, mesh={"data": 8})
    with pytest.raises(ValueError, match="data.batch_size=100 is not divisible"):
        trainer.build_run(cfg, tmp_path)


def test_checkpoint_restores_onto_a_different_mesh(tmp_path):
    """Saved from one device, resumed on a 4 x 2 mesh: the same values, in the new mesh's shardings."""
    train = {"checkpoint_every": 3, "embedding_update": "lazy_adam"}
    one_cfg = config(TINY, train=train)
    one = trainer.build_run(one_cfg, tmp_path, mesh=shd.make_mesh(one_cfg.mesh, jax.devices()[:1]))
    saved = loop.train(one, restore.initial_state(one.spec), until=3)
    one.checkpointer.close()
    many_cfg = config(TINY, train=train, mesh={"data": 4, "model": 2})
    many = trainer.build_run(many_cfg, tmp_path, mesh=shd.make_mesh(many_cfg.mesh, jax.devices()))
    restored = restore.restore_or_init(many)
    assert int(restored.step) == 3
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), saved, restored)
    assert restored.params["l0"]["id_tables"]["item"].sharding.spec == P("model", None)
    assert restored.tables_state["id_tables"]["item"]["nu"].sharding.spec == P("model", None)
    assert len(restored.params["l1"]["backbone"]["experts"]["layers"][0]["kernel"].sharding.device_set) == 8


def test_every_table_is_row_sharded_whatever_its_vocabulary(tmp_path, caplog):
    """Vocabularies such as an importer's len(ids) + 1 rarely divide the model axis: tables are padded to
    model.table_row_multiple rows, so every one is split over `model`, and the start of a run logs the layout."""
    cfg = config(TINY, mesh={"data": 2, "model": 4})
    run = trainer.build_run(cfg, tmp_path, mesh=shd.make_mesh(cfg.mesh, jax.devices()))
    tables = {
        **run.spec.program.abstract_state.params["l0"]["id_tables"],
        **run.spec.program.abstract_state.params["l0"]["sparse_tables"],
    }
    assert run.spec.dataset.meta.vocab["item_id"] % 4 != 0 or any(
        f.vocab % 4 for f in run.spec.dataset.meta.sparse_fields
    )
    assert all(t.sharding.spec == P("model", None) for t in tables.values())
    layout = shd.table_layout(run.spec.mesh, run.spec.program.abstract_state.params)
    assert "l0/sparse_tables/item_price: 64 rows x 32, 16 per device over model=4" in layout


def test_a_frozen_l0_fine_tune_with_new_rows_matches_single_device(tmp_path):
    """The new-row mask of a frozen L0 is sharded by rows like its table, and the masked row-sparse update
    gives the single-device result on a 4 x 2 mesh."""
    import dataclasses

    from configs import finetune as finetune_config
    from sr_jax.config import load_config

    trainer.fit(config(TINY, train={"epochs": 1.0, "checkpoint_every": 1000}), tmp_path / "pre")
    cfg = finetune_config.get_config(load_config(tmp_path / "pre" / "config.json"), "cold-items")
    cfg = dataclasses.replace(
        cfg,
        finetune=dataclasses.replace(cfg.finetune, pretrained=str(tmp_path / "pre"), freeze=("l0", "l1")),
        train=dataclasses.replace(cfg.train, min_steps=0, epochs=2.0, checkpoint_every=1000),
    )
    _, single = _train(cfg, tmp_path / "one", jax.devices()[:1], steps=4)
    sharded_cfg = dataclasses.replace(cfg, mesh=dataclasses.replace(cfg.mesh, data=4, model=2))
    run, sharded = _train(sharded_cfg, tmp_path / "many", jax.devices(), steps=4)
    mask = sharded.tables_state["id_tables"]["item"]["trainable"]
    assert (
        mask.sharding.spec == P("model")
        and np.asarray(mask).sum() == run.spec.start.new_rows.mask[("id_tables", "item")].sum()
    )
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=2e-5),
        single.params,
        sharded.params,
    )


def test_the_mesh_uses_every_device_or_says_why_and_rules_are_checked():
    from sr_jax.config import ConfigError, MeshConfig, validate

    with pytest.raises(ConfigError, match="does not divide the 8 devices"):
        shd.make_mesh(MeshConfig(data=3, model=1), jax.devices())
    with pytest.raises(ConfigError, match="does not divide the 8 devices"):
        shd.make_mesh(MeshConfig(data=-1, model=3), jax.devices())
    with pytest.raises(ConfigError, match="needs 16 devices; there are 8"):
        shd.make_mesh(MeshConfig(data=16, model=1), jax.devices())
    mesh = shd.make_mesh(MeshConfig(data=-1, model=2, slices=1), jax.devices())
    assert dict(mesh.shape) == {"data": 4, "model": 2}
    with pytest.raises(ConfigError, match="mesh.slices=3 does not divide"):
        shd.make_mesh(MeshConfig(data=4, model=2, slices=3), jax.devices())
    rules = shd.parse_rules(("batch=data+model", "heads=none"))
    assert dict(rules)["batch"] == ("data", "model") and dict(rules)["heads"] is None
    assert dict(rules)["table_rows"] == ("model",)  # not named: the default
    assert shd.batch_sharding(mesh, rules).spec == P(("data", "model"))
    for bad, why in [("batch=pipe", "distinct names"), ("rows=model", "LOGICAL=AXES"), ("batch", "LOGICAL=AXES")]:
        with pytest.raises(ConfigError, match=why):
            shd.parse_rules((bad,))
    with pytest.raises(ConfigError, match="given twice"):
        shd.parse_rules(("batch=data", "batch=model"))
    with pytest.raises(ConfigError, match="mesh.rules"):
        validate(config(TINY, mesh={"rules": ("batch=pipe",)}))


def test_routed_lookups_train_as_the_single_device_step(tmp_path):
    """`model.lookup=all_to_all` with the tables over all 8 devices and the batch over both axes: the same
    parameters after 6 steps as one device (at a capacity of 8x the fair share, which no skew can exceed on 8
    devices), and fewer bytes sent per device than GSPMD's lookup of the same layout (read from the compiled
    step). At the default capacity (2x) this tiny batch (32 rows a device) overflows: the log says how many."""
    from sr_jax.bench import compiled

    import json

    train = {"checkpoint_every": 1000, "log_every": 1}
    _, single = _train(config(TINY, train=train), tmp_path / "one", jax.devices()[:1])
    layout = {"data": 1, "model": 8, "rules": ("batch=data+model",)}
    sent = {}
    for lookup in ("gspmd", "all_to_all"):
        cfg = config(TINY, train=train, mesh=layout, model={"lookup": lookup, "lookup_capacity": 8.0})
        run, state = _train(cfg, tmp_path / lookup, jax.devices())
        jax.tree.map(
            lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=2e-5),
            single.params,
            state.params,
        )
        if lookup == "all_to_all":
            run.close()
            logged = [json.loads(line) for line in (tmp_path / lookup / "metrics.jsonl").read_text().splitlines()]
            assert logged and all(line["lookup_dropped"] == 0 for line in logged)
    for lookup in ("gspmd", "all_to_all"):  # the default capacity (gspmd's program compiled only, never trained)
        cfg, workdir = config(TINY, train=train, mesh=layout, model={"lookup": lookup}), tmp_path / f"{lookup}-default"
        if lookup == "gspmd":
            run = trainer.build_run(cfg, workdir, mesh=shd.make_mesh(cfg.mesh, jax.devices()))
        else:
            run, _ = _train(cfg, workdir, jax.devices())
        spec = run.spec
        program = spec.program.train_step.lower(spec.program.abstract_state, spec.batch_shapes(), spec.text, None)
        hlo = program.compile().as_text()
        sent[lookup] = sum(c.wire_bytes for c in compiled.collectives(hlo, 8))
        run.close()
    assert " all-to-all(" in hlo
    assert sent["all_to_all"] < sent["gspmd"], sent
    logged = [json.loads(line) for line in (tmp_path / "all_to_all-default" / "metrics.jsonl").read_text().splitlines()]
    assert len(logged) == 6 and any(line["lookup_dropped"] > 0 for line in logged)


def test_routed_lookups_train_row_wise_adagrad_as_the_row_sparse_rule_on_one_device(tmp_path):
    """`train.embedding_update=rowwise_adagrad` with `model.lookup=all_to_all` over all 8 devices: each device's rows
    take the dense form of row-wise Adagrad (`optimizer.rowwise_adagrad`: one accumulator a row, split by rows like
    the table, no Adam moments), and 6 steps give the parameters of one device's row-sparse rule; lazy_adam stays
    refused with routed lookups."""
    from sr_jax.config import ConfigError, validate

    train = {"checkpoint_every": 1000, "embedding_update": "rowwise_adagrad", "embedding_learning_rate": 0.05}
    _, single = _train(config(TINY, train=train), tmp_path / "one", jax.devices()[:1])
    assert single.tables_state["id_tables"]["item"]["acc"].shape == (128,)  # the row-sparse rule's state
    layout = {"data": 1, "model": 8, "rules": ("batch=data+model",)}
    cfg = config(TINY, train=train, mesh=layout, model={"lookup": "all_to_all", "lookup_capacity": 8.0})
    run, routed = _train(cfg, tmp_path / "routed", jax.devices())
    assert routed.tables_state == {}
    (acc,) = [
        leaf
        for path, leaf in jax.tree_util.tree_leaves_with_path(routed.opt_state)
        if path_str(path).endswith("acc/l0/id_tables/item")
    ]
    assert acc.shape == (128,) and acc.sharding.spec == P("model")
    table_state = [
        path_str(p) for p, _ in jax.tree_util.tree_leaves_with_path(routed.opt_state) if "id_tables" in path_str(p)
    ]
    assert table_state and not [p for p in table_state if "mu" in p or "nu" in p]  # no Adam moments for the tables
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=2e-5),
        single.params,
        routed.params,
    )  # and the accumulators (both stored in the tables' strided row order)
    np.testing.assert_allclose(np.asarray(acc), np.asarray(single.tables_state["id_tables"]["item"]["acc"]), rtol=2e-4)
    run.close()
    with pytest.raises(ConfigError, match="lazy_adam reads gathered rows"):
        validate(config(TINY, train={"embedding_update": "lazy_adam"}, model={"lookup": "all_to_all"}))


def test_a_routed_row_wise_adagrad_run_with_text_joined_on_the_host_resumes_exactly(tmp_path):
    """Interrupted at step 4 (a checkpoint: the row-wise accumulators in the optimizer state) and resumed to 6,
    over 8 devices with routed lookups and the text joined on the host: the same parameters and optimizer state,
    bit for bit, as 6 steps uninterrupted."""
    train = {"checkpoint_every": 2, "embedding_update": "rowwise_adagrad"}
    layout = {"data": 1, "model": 8, "rules": ("batch=data+model",)}
    routed = {"lookup": "all_to_all", "lookup_capacity": 8.0}
    cfg = config(TINY, train=train, mesh=layout, model=routed, data={"text_join": "host"})

    def train_until(workdir, steps):
        run = trainer.build_run(cfg, workdir, mesh=shd.make_mesh(cfg.mesh, jax.devices()))
        start = restore.restore_or_init(run)
        step = int(start.step)  # before the step donates the state's buffers
        state = loop.train(run, start, until=steps)
        run.close()
        return step, state

    assert train_until(tmp_path / "a", 4)[0] == 0
    started, resumed = train_until(tmp_path / "a", 6)
    assert started == 4
    _, uninterrupted = train_until(tmp_path / "b", 6)
    jax.tree.map(
        lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
        (resumed.params, resumed.opt_state),
        (uninterrupted.params, uninterrupted.opt_state),
    )


def test_text_vectors_joined_on_the_host_train_as_the_device_table_and_send_no_text_row(tmp_path):
    """`data.text_join=host` with routed lookups over all 8 devices: the device holds one zero row of text a shard,
    the batches carry their vectors (the history's too), and 6 steps give one device's parameters with the text
    table on it; the compiled step routes the id tables only (3 all-to-alls, not 5) and sends fewer bytes a device
    than the same layout reading the text table on the devices; evaluation reads the same."""
    from sr_jax.bench import compiled
    from sr_jax.data.pipeline import joined

    train = {"checkpoint_every": 1000}
    model = {"user_history": 3}
    single_run, single = _train(config(TINY, train=train, model=model), tmp_path / "one", jax.devices()[:1])
    layout = {"data": 1, "model": 8, "rules": ("batch=data+model",)}
    sent, programs = {}, {}
    for join in ("device", "host"):
        routed = {**model, "lookup": "all_to_all", "lookup_capacity": 8.0}
        cfg = config(TINY, train=train, mesh=layout, model=routed, data={"text_join": join})
        run, state = _train(cfg, tmp_path / join, jax.devices())
        spec = run.spec
        if join == "host":
            assert spec.text.pooled.shape[0] == 8 and not np.asarray(spec.text.pooled).any()
            assert set(spec.joined_text) == {"pooled"}
            assert spec.batch_shapes()[joined("user.history", "pooled")].shape == (spec.batch_size, 3, 64)
            jax.tree.map(
                lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=2e-5),
                single.params,
                state.params,
            )
            ours, theirs = evaluation.evaluate(spec, state.params), evaluation.evaluate(single_run.spec, single.params)
            assert abs(ours["overall"]["auc"] - theirs["overall"]["auc"]) < 1e-4
        program = spec.program.train_step.lower(spec.program.abstract_state, spec.batch_shapes(), spec.text, None)
        hlo = program.compile().as_text()
        found = compiled.collectives(hlo, 8)
        programs[join] = [c.kind for c in found].count("all-to-all")
        sent[join] = sum(c.wire_bytes for c in found)
        run.close()
    assert programs == {"device": 5, "host": 3}, programs
    assert sent["host"] < sent["device"], sent


def test_inference_reads_every_row_whatever_the_lookup_capacity(tmp_path):
    """A routed run at a capacity that drops most of its training lookups (0.05), its vectors on the wire in
    bfloat16, still evaluates as the plain gather does with the same parameters: inference routes with room for
    every id (issue 38: its evaluation differed from its exported model's in 3,787 of 4,000 rows), in float32."""
    import json

    train = {"checkpoint_every": 1000, "log_every": 1}
    layout = {"data": 1, "model": 8, "rules": ("batch=data+model",)}
    routed = {"lookup": "all_to_all", "lookup_capacity": 0.05, "lookup_wire": "bfloat16"}
    tight = config(TINY, train=train, mesh=layout, model=routed)
    run, state = _train(tight, tmp_path / "tight", jax.devices(), steps=2)
    run.close()
    logged = [json.loads(line) for line in (tmp_path / "tight" / "metrics.jsonl").read_text().splitlines()]
    assert all(line["lookup_dropped"] > 0 for line in logged)  # training does drop at this capacity
    once = dataclasses.replace(tight, train=dataclasses.replace(tight.train, log_every=2))
    _train(once, tmp_path / "logged-once", jax.devices(), steps=2)[0].close()
    summed = [json.loads(line) for line in (tmp_path / "logged-once" / "metrics.jsonl").read_text().splitlines()]
    assert [line["lookup_dropped"] for line in summed] == [logged[0]["lookup_dropped"] + logged[1]["lookup_dropped"]]
    plain = config(TINY, train=train, mesh=layout, model={"lookup": "gspmd"})
    gather = trainer.build_run(plain, tmp_path / "plain", mesh=run.spec.mesh)
    routed, gathered = evaluation.evaluate(run.spec, state.params), evaluation.evaluate(gather.spec, state.params)
    gather.close()
    for metric in ("auc", "log_loss"):
        assert abs(routed["overall"][metric] - gathered["overall"][metric]) < 1e-6, (routed, gathered)
