"""Fine-tuning from a pretrained run: exact restore, fresh new-domain rows, frozen levels, mismatch
errors, resume, and the CLI."""

import dataclasses
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import finetune as finetune_config
from helpers import TINY, config
from sr_jax import model as sr_model
from sr_jax.config import FinetuneConfig, load_config
from sr_jax.data.pipeline import rows_read
from sr_jax.model import rows
from sr_jax.export import trained
from sr_jax.training import loop, records, restore, trainer, transfer
from sr_jax.training.spec import labelled_budget
from sr_jax.training.pretrained import domain_map
from sr_jax.training.checkpoint import CheckpointError
from sr_jax.treeutil import path_str
from sr_jax.data import selection
from sr_jax.featurized import load_dataset
from sr_jax import protocols
from train import evaluate
from train import finetune as finetune_cli

NEW = 7  # search_new_service, held out of pretraining


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("pretrained")
    trainer.fit(config(TINY, train={"epochs": 1.0, "checkpoint_every": 1000}), workdir)
    return workdir


def _finetune_cfg(pretrained, protocol="new-domain", **train):
    cfg = finetune_config.get_config(load_config(pretrained / "config.json"), protocol)
    return dataclasses.replace(
        cfg,
        finetune=dataclasses.replace(cfg.finetune, pretrained=str(pretrained), freeze=("l0", "l1")),  # what these test
        train=dataclasses.replace(cfg.train, **{"min_steps": 0, "epochs": 2.0, "checkpoint_every": 3, **train}),
    )


def _from_edited_copy(cfg, pretrained, copy, **run_info):
    """`cfg` fine-tuning from a copy of the pretrained run whose run_info.json has `run_info` changed."""
    shutil.copytree(pretrained, copy)
    info = json.loads((copy / records.RUN_INFO).read_text())
    (copy / records.RUN_INFO).write_text(json.dumps({**info, **run_info}))
    return dataclasses.replace(cfg, finetune=dataclasses.replace(cfg.finetune, pretrained=str(copy)))


def _pretrained_params(pretrained):
    run = trainer.build_run(load_config(pretrained / "config.json"), pretrained)
    state, _ = run.checkpointer.restore(run.spec.program.abstract_state)
    run.checkpointer.close()
    return state.params


def _leaves(tree):
    return {path_str(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def _in_row_order(table, layout=(64, "strided")):
    return np.asarray(rows.row_order(table, *layout))


def _new_table_rows(run):
    return {f"l0/{group}/{name}": mask for (group, name), mask in run.spec.start.new_rows.mask.items()}


def test_restore_is_exact_and_the_new_domain_starts_fresh(pretrained, tmp_path):
    cfg = _finetune_cfg(pretrained)
    tune = dataclasses.replace(cfg.finetune, new_rows_init="zero", new_domain_init="fresh")  # (the other starts:
    run = trainer.build_run(dataclasses.replace(cfg, finetune=tune), tmp_path)  # tests/test_new_domain.py)
    assert run.spec.start.domain_map.new_domains == (NEW,)
    new_rows = _new_table_rows(run)
    assert new_rows["l0/id_tables/item"].sum() > 0  # the held-out domain's items: never trained
    assert not any(m[0] for m in new_rows.values())  # row 0 (missing) is never new
    start = _leaves(restore.initial_state(run.spec).params)
    before = _leaves(_pretrained_params(pretrained))
    fresh = _leaves(
        jax.jit(
            lambda: sr_model.init_params(run.spec.config.model, run.spec.dataset.meta, run.spec.text.pooled.shape[1], 0)
        )()
    )
    per_domain = _leaves(run.spec.program.per_domain)
    assert sum(bool(v) for v in per_domain.values()) >= 6  # domain embedding, adapter W_k and b_k, gate, tower
    for path, value in start.items():
        if per_domain[path]:
            np.testing.assert_array_equal(value[:NEW], before[path][:NEW], err_msg=path)
            np.testing.assert_array_equal(value[NEW], fresh[path][NEW], err_msg=path)
        elif path in new_rows:  # never trained rows start at zero, the others as trained (in row order)
            new, value, was = new_rows[path], _in_row_order(value), _in_row_order(before[path])
            np.testing.assert_array_equal(value[new], 0.0, err_msg=path)
            np.testing.assert_array_equal(value[~new], was[~new], err_msg=path)
        else:
            np.testing.assert_array_equal(value, before[path], err_msg=path)


def test_a_run_recorded_in_row_order_fine_tunes_into_the_strided_layout(pretrained, tmp_path):
    """A pretrained run whose run_info records no layout (saved before `model.row_layout`) stored its rows in row
    order: the fine-tune reads its tables so and stores them strided (every trained row in place, by row)."""
    cfg = _finetune_cfg(pretrained)
    cfg = _from_edited_copy(cfg, pretrained, tmp_path / "old", row_layout=(1, "contiguous"))
    cfg = dataclasses.replace(cfg, finetune=dataclasses.replace(cfg.finetune, new_rows_init="zero"))
    run = trainer.build_run(cfg, tmp_path / "ft")
    start = restore.initial_state(run.spec).params["l0"]["id_tables"]["item"]
    saved = np.asarray(_pretrained_params(pretrained)["l0"]["id_tables"]["item"])  # read as rows 0, 1, 2, ...
    new = run.spec.start.new_rows.mask[("id_tables", "item")]
    assert saved.shape[0] > 64 and new.any() and (~new).sum() > 64  # a table the strided layout permutes
    np.testing.assert_array_equal(_in_row_order(start)[~new], saved[~new])
    assert not np.array_equal(np.asarray(start)[~new], saved[~new])  # stored strided, not as it came


@pytest.mark.parametrize("freeze", [("l0",), ("l0", "l1")])
def test_frozen_levels_do_not_move_and_have_no_optimizer_state(pretrained, tmp_path, freeze):
    cfg = _finetune_cfg(pretrained, optimizer="adamw", weight_decay=0.1)
    cfg = dataclasses.replace(cfg, finetune=dataclasses.replace(cfg.finetune, freeze=freeze))
    run = trainer.build_run(cfg, tmp_path)
    start = restore.initial_state(run.spec)
    before, per_domain = _leaves(start.params), _leaves(run.spec.program.per_domain)
    new_rows = _new_table_rows(run)
    state_paths = [path_str(p) for p, _ in jax.tree_util.tree_leaves_with_path(start.opt_state)]
    after = _leaves(loop.train(run, start, until=6).params)
    moved = 0
    for path, value in after.items():
        level = path.split("/")[0]
        if level not in freeze:
            moved += not np.array_equal(value, before[path])
            continue
        in_state = [p for p in state_paths if p.endswith(path)]
        if per_domain[path]:  # frozen, except the new domain's row
            np.testing.assert_array_equal(value[:NEW], before[path][:NEW], err_msg=path)
            assert not np.array_equal(value[NEW], before[path][NEW]), path
            assert in_state, path  # moments for its trainable row
        elif path in new_rows:  # a frozen table: only the rows the pretrained run never trained move
            new = new_rows[path]
            np.testing.assert_array_equal(value[~new], before[path][~new], err_msg=path)
            assert not np.any(value[~new] != before[path][~new]), path
        else:
            np.testing.assert_array_equal(value, before[path], err_msg=path)
            assert not in_state, f"{path} has optimizer state: {in_state}"
    assert moved > 5


@pytest.mark.parametrize("rule", ["dense", "rowwise_adagrad"])
def test_rows_pretraining_never_trained_train_in_a_frozen_l0(pretrained, tmp_path, rule):
    """Cold items (never in the pretraining data) are new rows: with L0 and L1 frozen, exactly the new rows the
    cold training data reads move, under a row-sparse rule (lazy Adam when the configured one is dense)."""
    cfg = _finetune_cfg(pretrained, "cold-items", embedding_update=rule)
    run = trainer.build_run(cfg, tmp_path)
    assert run.spec.program.embedding_update == ("lazy_adam" if rule == "dense" else rule)
    new = run.spec.start.new_rows.mask[("id_tables", "item")]
    read = np.zeros_like(new)
    read[np.unique(run.spec.train_columns["item_id"])] = True
    assert (new & read).sum() >= 5 and not run.spec.start.new_rows.mask[("id_tables", "user")].any()
    start = restore.initial_state(run.spec)
    before = jax.device_get(start.params["l0"]["id_tables"])
    after = jax.device_get(loop.train(run, start, until=4).params["l0"]["id_tables"])
    moved = _in_row_order(np.any(after["item"] != before["item"], axis=1))  # (the mask is in row order)
    assert moved[new & read].all() and not moved[~(new & read)].any()
    assert len(np.unique(run.spec.train_columns["user_id"])) >= 5  # users the batches read: trained, so frozen
    np.testing.assert_array_equal(after["user"], before["user"])


def test_mismatched_model_or_text_encoder_is_a_clear_error(pretrained, tmp_path):
    cfg = _finetune_cfg(pretrained)
    wider = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, dim=16))
    text_start = dataclasses.replace(wider, finetune=dataclasses.replace(wider.finetune, new_rows_init="text"))
    with pytest.raises(CheckpointError, match=r"item_text_map.npz: maps 64-wide text features to 32-wide rows"):
        trainer.build_run(text_start, tmp_path / "wider")
    with pytest.raises(CheckpointError, match=r"reference.npz: rows of width 96, but this model's z has 48"):
        trainer.build_run(wider, tmp_path / "wider")
    wider = dataclasses.replace(wider, finetune=dataclasses.replace(wider.finetune, align_reference=False))
    with pytest.raises(
        CheckpointError,
        match=r"parameter params/l0/id_tables/item has shape \(128, 32\) in the checkpoint, "
        r"\(128, 16\) in the model",
    ):
        restore.initial_state(trainer.build_run(wider, tmp_path / "wider").spec)
    elsewhere = _from_edited_copy(cfg, pretrained, tmp_path / "other-encoder", text_fingerprint="hashed-bow-v1:other")
    with pytest.raises(CheckpointError, match=r"pretrained with text encoder 'hashed-bow'.*but this run uses"):
        trainer.build_run(elsewhere, tmp_path / "elsewhere")
    with pytest.raises(CheckpointError, match=r"run_info.json: missing"):
        trainer.build_run(
            dataclasses.replace(cfg, finetune=dataclasses.replace(cfg.finetune, pretrained=str(tmp_path))),
            tmp_path / "from-a-folder-without-run-info",
        )


def test_domains_map_by_name(pretrained):
    dataset = load_dataset(config(TINY).data)
    names = [d.name for d in dataset.meta.domains]
    info = {"domains": names[::-1], "trained_domains": names[2:5]}  # other order, only three trained
    mapping, _ = domain_map(dataset, info, FinetuneConfig(new_domain_init="fresh"))
    assert mapping.source == (None, None, 5, 4, 3, None, None, None)
    assert mapping.new_domains == (0, 1, 5, 6, 7)


def test_finetune_resumes_exactly(pretrained, tmp_path):
    cfg = _finetune_cfg(pretrained, epochs=4.0)
    straight = trainer.build_run(cfg, tmp_path / "straight")
    end = loop.train(straight, restore.initial_state(straight.spec))
    assert len(straight.spec.train_columns["label"]) == 512 - round(0.1 * 512)  # a tenth carved for validation
    assert int(end.step) == straight.spec.total_steps == 4 * (461 // 256)
    interrupted = trainer.build_run(cfg, tmp_path / "resumed")
    loop.train(interrupted, restore.initial_state(interrupted.spec), until=3)
    interrupted.checkpointer.close()
    resumed = trainer.build_run(cfg, tmp_path / "resumed")
    state = restore.restore_or_init(resumed)
    assert int(state.step) == 3
    end_resumed = loop.train(resumed, state)
    for a, b in zip(jax.tree.leaves(end), jax.tree.leaves(end_resumed)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert resumed.zero_shot is not None and resumed.zero_shot == straight.zero_shot  # it blends as it began
    kept = [run.best.restore(run.spec.program.abstract_state.params, own=True) for run in (straight, resumed)]
    for a, b in zip(*map(jax.tree.leaves, kept)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_cli_finetunes_cold_items_on_a_fraction(pretrained, tmp_path):
    workdir, copy = tmp_path / "ft", tmp_path / "pretrained"
    shutil.copytree(pretrained, copy)
    args = ["--pretrained", str(copy), "--workdir", str(workdir), "--protocol", "cold-items"]
    result = finetune_cli.main([*args, "data.train_fraction=0.5", "train.min_steps=7", "finetune.freeze=l0"])
    assert result["split"] == "cold_test" and set(result["domains"]) <= set(
        records.read_run_info(pretrained)["domains"]
    )
    saved = load_config(workdir / "config.json")
    assert saved.finetune.freeze == ("l0",) and saved.finetune.pretrained == str(copy.absolute())
    assert saved.data.train_split == "cold_train" and saved.data.train_fraction == 0.5
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[-1])["step"] == 7  # 256 examples: 5 epochs of one batch, so min_steps decides
    shutil.rmtree(copy)  # a started fine-tune run no longer needs its pretrained folder
    again = finetune_cli.main(["--workdir", str(workdir)])  # finished: resumes at the end, evaluates again
    assert again["overall"]["auc"] == pytest.approx(result["overall"]["auc"], abs=1e-6)


def test_train_fraction_is_a_seeded_subset(tmp_path):
    columns = load_dataset(config(TINY).data).split("train")
    half = selection.train_subset(columns, 0.25, seed=3)
    assert len(half["label"]) == 1024 and np.array_equal(
        half["user_id"], selection.train_subset(columns, 0.25, 3)["user_id"]
    )
    assert not np.array_equal(half["user_id"], selection.train_subset(columns, 0.25, 4)["user_id"])
    with pytest.raises(ValueError, match=r"train_fraction=0.0: expected a fraction"):
        selection.train_subset(columns, 0.0, 0)
    run = trainer.build_run(config(TINY, data={"train_fraction": 0.01}), tmp_path)  # 41 examples: one batch of 41
    assert run.spec.batch_size == 41 and run.spec.steps_per_epoch == 1
    assert selection.clamped_batch_size(256, 41, 8, "x") == 40  # a multiple of the data axis
    with pytest.raises(ValueError, match=r"5 examples cannot fill a batch over 8 devices"):
        selection.clamped_batch_size(256, 5, 8, "x")


def test_merge_takes_mapped_rows_and_fresh_rows_for_new_domains():
    """A fine-tune model may have more domains than the pretrained one, in another order."""
    pre = {"rows": jnp.arange(6.0).reshape(2, 3), "shared": jnp.ones(4)}
    fresh = {"rows": -jnp.ones((3, 3)), "shared": jnp.zeros(4)}
    merged = transfer.merge_pretrained(pre, fresh, {"rows": True, "shared": False}, transfer.DomainMap((1, None, 0)))
    np.testing.assert_array_equal(merged["rows"], [[3, 4, 5], [-1, -1, -1], [0, 1, 2]])
    np.testing.assert_array_equal(merged["shared"], pre["shared"])


def test_cold_items_are_those_the_model_never_trained(pretrained, tmp_path):
    """In a cold-items fine-tune, the cold items are those neither the pretrained run nor the fine-tune (up to
    its result's step) trained: the same meaning as in its scratch baseline's report."""
    # no validation: the result is the last step (16 validated rows may well choose the start, which trains none)
    cfg = _finetune_cfg(pretrained, "cold-items", epochs=1.0, eval_every=0, evals_per_epoch=0.0)
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, train_fraction=0.1))  # leaves items untrained
    result = trainer.fit(cfg, tmp_path)
    run = trainer.build_run(cfg, tmp_path)
    cold_test = run.spec.split("cold_test")
    with np.load(tmp_path / records.TRAINED_ROWS) as saved:
        never = ~saved["item_id"][np.asarray(cold_test["item_id"])]
    pretrained_items = np.unique(run.spec.dataset.split("train")["item_id"])
    new_to_pretraining = ~np.isin(run.spec.dataset.split("cold_test")["item_id"], pretrained_items)
    assert 0 < never.sum() < new_to_pretraining.sum()  # the fine-tune trained some of the new items
    assert result["cold_items"]["examples"] == int(never.sum())
    with np.load(tmp_path / records.TRAINED_ROWS) as saved:  # the record: pretrained rows and those its result read
        step = run.spec.total_steps
        read = rows_read(len(run.spec.train_columns["label"]), run.spec.batch_size, cfg.train.seed, step)
        items = np.asarray(run.spec.train_columns["item_id"])[read]
        before = run.spec.trained_rows["item_id"]
        expected = before | np.isin(np.arange(len(before)), items)
        expected[0] = False
        np.testing.assert_array_equal(saved["item_id"], expected)
        assert set(saved.files) == set(run.spec.model_meta.tables())


def test_held_out_domains_stay_out_of_pretraining(tmp_path):
    """A domain meta.json marks pretrain: false is not trained (nor evaluated) by a pretraining run, and
    run_info records what was really trained; the fine-tune config trains it."""
    from sr_jax.data.store import write_dataset

    base = load_dataset(config(TINY).data)
    train = {k: np.asarray(v) for k, v in base.split("train").items()}
    train["domain"] = np.where(np.arange(len(train["domain"])) % 8 == 0, 7, train["domain"]).astype(np.int32)
    test = {k: np.asarray(v) for k, v in base.split("test").items()}
    test["domain"] = np.where(np.arange(len(test["domain"])) % 8 == 0, 7, test["domain"]).astype(np.int32)
    meta = dataclasses.replace(base.meta, text_caches={}, oracle_auc={})
    root = tmp_path / "data"
    write_dataset(root, meta, base.texts(), {"train": train, "test": test}, base.keys())
    from sr_jax.text import HashedBagOfWords, build_text_cache

    build_text_cache(root, HashedBagOfWords(), progress=False)
    cfg = config(TINY, data={"path": str(root)}, train={"epochs": 1.0})
    run = trainer.build_run(cfg, tmp_path / "run")
    assert NEW not in np.unique(run.spec.train_columns["domain"]) and "search_new_service" not in run.spec.domains
    result = trainer.fit(cfg, tmp_path / "run")
    assert "search_new_service" not in result["domains"]
    assert "search_new_service" not in records.read_run_info(tmp_path / "run")["trained_domains"]
    ft = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, pretrain_domains_only=False))
    assert NEW in np.unique(trainer.build_run(ft, tmp_path / "ft").spec.train_columns["domain"])
    with pytest.raises(ValueError, match=r"held out of pretraining in meta.json"):
        trainer.build_run(config(TINY, data={"path": str(root), "domains": ("search_new_service",)}), tmp_path / "x")


def test_evaluating_a_run_without_checkpoints_is_an_error_not_a_fresh_model(pretrained, tmp_path):
    cfg = load_config(pretrained / "config.json")
    run = trainer.build_run(cfg, tmp_path)  # an empty folder: no checkpoint
    with pytest.raises(CheckpointError, match=r"no checkpoint folder|no checkpoint to restore"):
        restore.checkpoint_params(run.spec)
    params = restore.checkpoint_params(trainer.build_run(cfg, pretrained).spec)
    assert jax.tree.structure(params) == jax.tree.structure(run.spec.program.abstract_state.params)


def test_new_domain_fine_tuning_aligns_against_the_pretrained_reference(pretrained, tmp_path):
    """A new-domain batch holds one domain: without the pretrained run's reference L_reg is zero; with it the
    new domain is pulled towards the pretrained domains."""
    saved = np.load(pretrained / "reference.npz")
    assert saved["rows"].shape == (8, 512, 96) and saved["count"][NEW] == 0 and saved["count"][:NEW].min() > 0
    regs = {}
    for align in (True, False):
        cfg = _finetune_cfg(pretrained, epochs=1.0)
        cfg = dataclasses.replace(cfg, finetune=dataclasses.replace(cfg.finetune, align_reference=align))
        trainer.fit(cfg, tmp_path / str(align))
        lines = (tmp_path / str(align) / "metrics.jsonl").read_text().splitlines()
        regs[align] = [m["reg"] for m in map(json.loads, lines) if "reg" in m]  # (validation lines have none)
    assert regs[True] and all(r > 0 for r in regs[True]) and all(r == 0 for r in regs[False])


def test_replay_mixes_pretraining_examples_into_every_fine_tune_batch(pretrained, tmp_path):
    cfg = _finetune_cfg(pretrained)
    cfg = dataclasses.replace(cfg, finetune=dataclasses.replace(cfg.finetune, replay_fraction=0.25))
    run = trainer.build_run(cfg, tmp_path / "run")
    assert (run.spec.batch_size, run.spec.replay_size) == (256, 64)
    batch = next(loop.batches(run.spec, 0))
    assert np.all(batch["domain"][:192] == NEW) and np.all(batch["domain"][192:] != NEW)
    np.testing.assert_array_equal(batch["item_id"], next(loop.batches(run.spec, 0))["item_id"])  # (seed, step)
    assert trainer.fit(cfg, tmp_path / "run")["domains"]["search_new_service"]["examples"] > 0
    elsewhere = _from_edited_copy(cfg, pretrained, tmp_path / "other-data", dataset="elsewhere")
    with pytest.raises(ValueError, match=r"trained on dataset 'elsewhere'.*replay needs the pretraining data"):
        trainer.build_run(elsewhere, tmp_path / "elsewhere")


def test_finetune_cli_refuses_options_that_disagree_with_the_run_and_trains_scratch(pretrained, tmp_path):
    from sr_jax.config import ConfigError, save_config

    workdir = tmp_path / "ft"
    args = finetune_cli.parser().parse_args(["--pretrained", str(pretrained), "--workdir", str(workdir)])
    cfg = finetune_cli.resolve(args)
    assert cfg.finetune.protocol == "new-domain" and cfg.data.train_split == "heldout_train"
    assert cfg.finetune.pretrained == str(pretrained.absolute())
    assert cfg.finetune.freeze == finetune_cli.STRATEGIES[finetune_cli.RECOMMENDED]  # the recommended default
    workdir.mkdir()
    save_config(cfg, workdir / "config.json")
    for extra, flag in (
        (["--protocol", "cold-items"], "--protocol"),
        (["--pretrained", str(tmp_path)], "--pretrained"),
        (["--strategy", "scratch"], "--strategy"),
        (["--eval-split", "test"], "--eval-split"),
    ):
        with pytest.raises(ConfigError, match=flag):
            finetune_cli.resolve(finetune_cli.parser().parse_args(["--workdir", str(workdir), *extra]))
    same = ["--workdir", str(workdir), "--pretrained", str(pretrained), "--protocol", "new-domain"]
    assert finetune_cli.resolve(finetune_cli.parser().parse_args(same)) == cfg  # agreeing options resume
    scratch = finetune_cli.resolve(
        finetune_cli.parser().parse_args(
            ["--pretrained", str(pretrained), "--strategy", "scratch", "--workdir", str(tmp_path / "s")]
        )
    )
    assert scratch.finetune.pretrained == "" and scratch.finetune.freeze == () and scratch.model == cfg.model
    assert scratch.train == cfg.train and scratch.data == cfg.data  # the fine-tune's data and schedule
    with pytest.raises(ValueError, match=r"--train-split and --eval-split"):
        protocols.protocol_splits(["train", "valid"], "cold-items")


def test_overrides_go_anywhere_on_the_command_line():
    from train import cli

    p = cli.parser("x")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--finetune", action="append", default=[])
    args = cli.parse(p, ["--workdir", "w", "--seeds", "0", "1", "model.dim=8", "--finetune", "train.epochs=1", "a.b=2"])
    assert args.seeds == [0, 1] and args.overrides == ["model.dim=8", "a.b=2"] and args.finetune == ["train.epochs=1"]


def test_new_rows_start_from_zero_the_mean_or_the_text_estimate():
    table = jnp.asarray(np.arange(24, dtype=np.float32).reshape(6, 4))
    params = {"l0": {"id_tables": {"item": table}, "sparse_tables": {}}}
    new = np.array([False, False, True, False, True, False])
    trained = np.array([False, True, False, True, False, False])
    rows = transfer.NewRows({("id_tables", "item"): new}, {("id_tables", "item"): trained})
    zero = np.asarray(transfer.init_new_rows(params, rows, "zero")["l0"]["id_tables"]["item"])
    np.testing.assert_array_equal(zero[new], 0.0)
    np.testing.assert_array_equal(zero[~new], np.asarray(table)[~new])
    mean = np.asarray(transfer.init_new_rows(params, rows, "mean")["l0"]["id_tables"]["item"])
    np.testing.assert_allclose(mean[new], np.broadcast_to(np.asarray(table)[trained].mean(0), (2, 4)))
    estimate = (np.array([4], np.int32), np.full((1, 4), 7.0, np.float32))  # item 4 has text, item 2 none
    text = np.asarray(
        transfer.init_new_rows(params, dataclasses.replace(rows, text=estimate), "text")["l0"]["id_tables"]["item"]
    )
    np.testing.assert_array_equal(text[4], 7.0)
    np.testing.assert_allclose(text[2], mean[2])


def test_the_text_map_recovers_a_linear_relation():
    rng = np.random.default_rng(0)
    texts = rng.normal(size=(400, 8)).astype(np.float32)
    truth = rng.normal(size=(8, 3)).astype(np.float32)
    rows = texts @ truth + 0.5
    kernel, bias = records.fit_text_map(texts, rows, seed=0)
    np.testing.assert_allclose(texts @ kernel + bias, rows, rtol=0.05, atol=0.05)  # ridge: a slight shrinkage


def test_strategy_auto_keeps_the_candidate_the_validation_data_prefer(pretrained, tmp_path):
    """Also a signal during the selection (issue 38): SIGTERM while the second candidate trains stops the command
    in one line, exit 143; the same command then resumes that candidate and finishes the selection."""
    import signal
    import subprocess
    import sys
    import time

    workdir = tmp_path / "auto"
    argv = ["--pretrained", str(pretrained), "--workdir", str(workdir), "--strategy", "auto",
            "train.epochs=1", "train.min_steps=0", "train.eval_every=2", "finetune.auto_min_valid=0"]  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-m", "train.finetune", *argv], stderr=subprocess.PIPE, text=True)
    second = workdir / "candidates" / list(finetune_cli.STRATEGIES)[1] / "config.json"
    deadline = time.monotonic() + 240
    while not second.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == 128 + signal.SIGTERM and "Traceback" not in err, err[-3000:]
    assert not (workdir / "strategy.json").exists() and "interrupted by SIGTERM" in err.strip().splitlines()[-1]
    result = finetune_cli.main(argv)
    chosen = json.loads((workdir / "strategy.json").read_text())
    assert set(chosen["validation"]) == set(finetune_cli.STRATEGIES)
    assert chosen["chosen"] == max(chosen["validation"], key=chosen["validation"].get)
    ranked = sorted(chosen["validation"].values(), reverse=True)
    assert chosen["margin"] == pytest.approx(ranked[0] - ranked[1])
    own = json.loads((workdir / "candidates" / chosen["chosen"] / "eval.json").read_text())
    report = json.loads((workdir / "eval.json").read_text())
    assert report["mean_domain_auc"] == own["mean_domain_auc"] == result["mean_domain_auc"]
    assert report["strategy"] == chosen and "Strategy" in (workdir / "eval.md").read_text()
    budgets = {json.dumps(json.loads((workdir / "candidates" / n / "eval.json").read_text())["budget"]) for n in
               finetune_cli.STRATEGIES}  # fmt: skip
    assert len(budgets) == 1  # the same labels for every candidate
    assert chosen["rule"].startswith("the best validation score")


def test_a_default_fine_tune_on_more_rows_than_pretraining_also_trains_scratch_and_keeps_the_better(
    pretrained, tmp_path
):
    """Issue 39: where the new data hold finetune.scratch_above times the pretraining run's rows, the default
    command trains `all` and `scratch` and keeps the better on validation; the folder is a selection that the
    same command resumes and that the other commands read as the run it kept. Below the ratio, a plain run."""
    rows, _ = labelled_budget(_finetune_cfg(pretrained))
    pretraining = sum(json.loads((pretrained / "run_info.json").read_text())["domain_examples"])
    ratio = 0.999 * rows / pretraining
    workdir = tmp_path / "versus"
    argv = ["--pretrained", str(pretrained), "--workdir", str(workdir), "train.epochs=1", "train.min_steps=0",
            "train.eval_every=2", "finetune.auto_min_valid=0", f"finetune.scratch_above={ratio}"]  # fmt: skip
    result = finetune_cli.main(argv)
    chosen = json.loads((workdir / "strategy.json").read_text())
    assert set(chosen["validation"]) == {"all", "scratch"} and f"finetune.scratch_above={ratio:g}" in chosen["rule"]
    assert chosen["chosen"] == max(chosen["validation"], key=chosen["validation"].get)
    kept = workdir / "candidates" / chosen["chosen"]
    assert trained.load(workdir).workdir == kept.absolute()
    assert result["mean_domain_auc"] == json.loads((kept / "eval.json").read_text())["mean_domain_auc"]
    assert finetune_cli.main(argv)["mean_domain_auc"] == result["mean_domain_auc"]  # resumed: nothing retrained
    again = tmp_path / "from-the-selection"  # a fine-tune of the selection starts from the run it kept
    finetune_cli.main(["--pretrained", str(workdir), "--workdir", str(again), "train.max_steps=0"])
    assert load_config(again / "config.json").finetune.pretrained == str(kept.absolute())
    split = evaluate.main(["--workdir", str(workdir)])["split"]
    assert (kept / f"reevaluation_{split}.json").exists() and not (workdir / f"reevaluation_{split}.json").exists()
    # just below the ratio: the plain run the default always was
    plain = tmp_path / "plain"
    finetune_cli.main([*argv[:2], "--workdir", str(plain), *argv[4:-1], f"finetune.scratch_above={ratio * 1.02}"])
    assert (plain / "config.json").exists() and not (plain / "strategy.json").exists()


def test_strategy_auto_keeps_the_recommended_one_when_too_few_labels_validate(pretrained, tmp_path):
    workdir = tmp_path / "few"
    argv = ["--pretrained", str(pretrained), "--workdir", str(workdir), "--strategy", "auto", "train.epochs=1",
            "train.min_steps=0", "train.eval_every=2", "finetune.auto_min_valid=1000000"]  # fmt: skip
    result = finetune_cli.main(argv)
    chosen = json.loads((workdir / "strategy.json").read_text())
    assert chosen["chosen"] == finetune_cli.RECOMMENDED and list(chosen["validation"]) == [finetune_cli.RECOMMENDED]
    assert "finetune.auto_min_valid=1000000" in chosen["rule"] and chosen["margin"] is None
    assert [p.name for p in (workdir / "candidates").iterdir()] == [finetune_cli.RECOMMENDED]  # no other trained
    assert result["strategy"] == chosen and "no choice made" in (workdir / "eval.md").read_text()
