"""A new domain starts from what was learned (issue 39): its per-domain rows from a source domain or the mean
of its task's, the source named or chosen by the validation data; zero-shot scoring with no label; fine-tuning
that guards the pretrained parameters (LP-FT, a lower rate, L2-SP); the user history aspect on by default
where the data have timestamps."""

import dataclasses
import json

import jax
import numpy as np
import optax
import pytest

from configs import finetune as finetune_config
from helpers import TINY, config
from sr_jax import model as sr_model
from sr_jax.config import ConfigError, FinetuneConfig, load_config, override, validate
from sr_jax.featurized import load_dataset
from sr_jax.training import evaluation, loop, restore, trainer, zero_shot
from sr_jax.training.checkpoint import BestCheckpoint
from sr_jax.training.optimizer import guard
from sr_jax.training.pretrained import domain_map
from sr_jax.treeutil import flatten
from train import finetune as finetune_cli

NEW = 7  # search_new_service, held out of pretraining; the synthetic search domains are rows 0-3


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("pretrained")
    trainer.fit(config(TINY, train={"epochs": 1.0, "checkpoint_every": 1000}), workdir)
    return workdir


def _info(pretrained):
    return json.loads((pretrained / "run_info.json").read_text())


def test_a_new_domain_starts_from_its_task_s_domains_by_name_or_by_size(pretrained):
    dataset = load_dataset(config(TINY).data)
    info = _info(pretrained)
    assert info["domain_tasks"][:5] == ["search"] * 4 + ["rec"] and sum(info["domain_examples"]) > 0
    source, candidates = domain_map(dataset, info, FinetuneConfig())
    trained = info["trained_domains"]
    search = tuple(k for k, t in enumerate(info["domain_tasks"]) if t == "search" and info["domains"][k] in trained)
    assert source.new_domains == (NEW,) and candidates == {NEW: search}
    biggest = max(search, key=lambda r: info["domain_examples"][r])
    assert source.start[NEW] == (biggest,)  # before the validation data choose
    mean, _ = domain_map(dataset, info, FinetuneConfig(new_domain_init="mean"))
    assert mean.start[NEW] == search
    fresh, none = domain_map(dataset, info, FinetuneConfig(new_domain_init="fresh"))
    assert (not fresh.start or fresh.start[NEW] == ()) and none == {}
    named, none = domain_map(dataset, info, FinetuneConfig(domain_source=("search_new_service=rec_deals",)))
    assert named.start[NEW] == (info["domains"].index("rec_deals"),) and none == {}
    for bad, why in [("nowhere=rec_deals", "not a new domain"), ("search_new_service=nowhere", "trained no domain")]:
        with pytest.raises(ConfigError, match=why):
            domain_map(dataset, info, FinetuneConfig(domain_source=(bad,)))


def _new_domain_cfg(pretrained, *overrides):
    cfg = finetune_config.get_config(load_config(pretrained / "config.json"), "new-domain")
    cfg = dataclasses.replace(cfg, finetune=dataclasses.replace(cfg.finetune, pretrained=str(pretrained)))
    return override(cfg, ["train.min_steps=0", "train.epochs=1", *overrides])


@pytest.mark.parametrize("init", ["match", "source", "mean", "fresh"])
def test_the_new_domain_s_rows_are_its_source_s_or_their_mean(pretrained, tmp_path, init):
    """`source` (a fine-tune's default) copies the source's rows; `match` (zero-shot's) is `source` with the
    towers' output kernel at zero: the network's logit starts constant, so the new domain is scored by its
    source's content match until its labels teach the network."""
    cfg = _new_domain_cfg(pretrained, f"finetune.new_domain_init={init}")
    run = trainer.build_run(cfg, tmp_path / "run")
    state = restore.initial_state(run.spec)
    record = json.loads((tmp_path / "run" / restore.NEW_DOMAINS).read_text())["search_new_service"]
    before = trainer.build_run(load_config(pretrained / "config.json"), pretrained)
    saved = {k: np.asarray(v) for k, v in flatten(restore.checkpoint_params(before.spec)).items()}
    per_domain = flatten(run.spec.program.per_domain)
    rows = [_info(pretrained)["domains"].index(n) for n in record["from"]]
    assert record["init"] == init and len(rows) == {"match": 1, "source": 1, "mean": 4, "fresh": 0}[init]
    if init in ("match", "source"):  # the validation data chose among the four search domains
        assert record["chosen_by"].startswith("validation") and len(record["scores"]) == 4
        assert record["from"] == [max(record["scores"], key=record["scores"].get)]
    compared, output = 0, sr_model.tower_output(cfg.model)
    for path, leaf in flatten(state.params).items():
        if init == "fresh" or not per_domain[path] or path not in saved:
            continue
        want = np.zeros_like(saved[path][0]) if (init, path) == ("match", output) else saved[path][rows].mean(0)
        np.testing.assert_allclose(np.asarray(leaf)[NEW], want, rtol=1e-5, atol=1e-6)
        compared += 1
    assert compared > 4 or init == "fresh"  # domain embedding, DAL, gates, tower, content match
    run.close()
    before.close()


def test_a_fine_tune_offers_the_zero_shot_model_as_its_step_0(pretrained, tmp_path):
    """A new domain starts from its source's rows (`source`), and step 0 also offers the zero-shot model: the
    same rows with the towers' output layer at zero (what `match` starts from), whichever validates better."""
    named = "finetune.domain_source=search_new_service=search_shop"  # the same source for both inits
    source = trainer.build_run(_new_domain_cfg(pretrained, named), tmp_path / "source")
    match = trainer.build_run(_new_domain_cfg(pretrained, named, "finetune.new_domain_init=match"), tmp_path / "m")
    zero = flatten(zero_shot.zero_shot_params(source.spec, restore.initial_state(source.spec).params))
    want = restore.initial_state(match.spec).params
    for path, leaf in flatten(want).items():
        np.testing.assert_array_equal(np.asarray(zero[path]), np.asarray(leaf), err_msg=path)
    assert zero_shot.zero_shot_params(match.spec, want) is None  # it starts so already
    source.close()
    match.close()
    result = trainer.fit(_new_domain_cfg(pretrained, named, "train.eval_every=4"), tmp_path / "run")
    start = result["validation"]["start"]
    assert set(start) == {loop.PRETRAINED_START, loop.ZERO_SHOT_START} and start[loop.ZERO_SHOT_START] > 0.0
    assert result["validation"]["history"][0] == [0, max(start.values())]
    assert result["validation"]["zero_shot_blend"] == {"weight": 0.75, "domains": ["search_new_service"]}
    report = (tmp_path / "run" / "eval.md").read_text()
    assert "Step 0's candidates" in report and "blended with the zero-shot model" in report


def test_a_fine_tune_is_blended_with_the_zero_shot_model_and_keeps_what_it_validated(pretrained, tmp_path):
    """The blend is one model whose new domain's logit is (1 - w) x the fine-tuned logit + w x the zero-shot
    model's, other domains untouched; validation scores and keeps the blend; a resumed run blends the same."""
    run = trainer.build_run(_new_domain_cfg(pretrained, "finetune.zero_shot_weight=0.6"), tmp_path / "run")
    spec = run.spec
    start = restore.initial_state(spec).params
    rows = zero_shot.zero_shot_rows(spec, start)
    assert rows["domains"] == [NEW] and len(rows["bias"]) == 1 and len(rows["match"][0]) == 2
    noise = np.random.default_rng(0)
    tuned = jax.tree.map(lambda x: x + 0.1 * noise.standard_normal(x.shape).astype(x.dtype), start)
    blended = zero_shot.blend(spec, tuned, rows)
    columns, trained = spec.valid_columns, evaluation.trained_rows(spec)
    assert set(np.unique(columns["domain"])) == {NEW}
    logit = {
        name: evaluation.predict_scores(spec, p, columns, trained)["logit"]
        for name, p in [("tuned", tuned), ("blended", blended), ("zero", zero_shot.zero_shot_params(spec, start))]
    }
    np.testing.assert_allclose(logit["blended"], 0.4 * logit["tuned"] + 0.6 * logit["zero"], rtol=1e-4, atol=1e-4)
    assert np.abs(logit["blended"] - logit["tuned"]).max() > 1e-2
    edited = {sr_model.tower_output(spec.config.model, leaf) for leaf in ("kernel", "bias")} | {zero_shot.MATCH}
    for path, leaf in flatten(blended).items():  # the pretrained domains' rows and shared parameters as tuned
        want, have = np.asarray(flatten(tuned)[path]), np.asarray(leaf)
        if path in edited:
            want, have = np.delete(want, NEW, axis=0), np.delete(have, NEW, axis=0)
        np.testing.assert_array_equal(have, want, err_msg=path)
    run.zero_shot, run.best = rows, BestCheckpoint(tmp_path / "best")
    score = loop.validate_step(run, tuned, 5)
    kept = run.best.restore(spec.program.abstract_state.params, own=True)
    for path, leaf in flatten(kept).items():
        np.testing.assert_array_equal(np.asarray(leaf), np.asarray(flatten(blended)[path]), err_msg=path)
    assert score == run.validation[-1][1] and loop.position(run, 5)["zero_shot"] == rows
    run.close()
    for bad in ("1", "-0.1"):  # w = 1 would throw the fine-tune away
        with pytest.raises(ConfigError, match="finetune.zero_shot_weight"):
            validate(override(spec.config, [f"finetune.zero_shot_weight={bad}"]))
    assert (
        zero_shot.zero_shot_rows(
            trainer.build_run(_new_domain_cfg(pretrained, "finetune.zero_shot_weight=0"), tmp_path / "off").spec, start
        )
        is None
    )


def test_zero_shot_scores_a_new_domain_with_no_label_and_exports(pretrained, tmp_path):
    from train import export

    workdir = tmp_path / "zero"
    result = finetune_cli.main(["--pretrained", str(pretrained), "--workdir", str(workdir), "--strategy", "zero-shot"])
    assert result["budget"] == {"train_examples": 0, "valid_examples": 0}
    assert 0.0 < result["domains"]["search_new_service"]["auc"] < 1.0 and "validation" not in result
    record = json.loads((workdir / restore.NEW_DOMAINS).read_text())["search_new_service"]
    assert record["chosen_by"] == "the most pretraining examples of its task"  # no label to choose with
    assert record["init"] == "match"  # the network's logit constant: the source's content match scores it
    assert json.loads((workdir / "config.json").read_text())["train"]["max_steps"] == 0
    export.main(["--workdir", str(workdir), "--out", str(tmp_path / "served"), "--platforms", "cpu"])
    with pytest.raises(ConfigError, match="--strategy all"):
        finetune_cli.resolve(finetune_cli.parser().parse_args(["--workdir", str(workdir), "--strategy", "all"]))


def _params(seed=0):
    rng = np.random.default_rng(seed)
    normal = lambda *shape: rng.standard_normal(shape).astype(np.float32)  # noqa: E731
    return {"l1": {"w": normal(3, 2)}, "l2": {"tower": normal(4, 2)}}


def test_lp_ft_moves_only_what_is_new_then_everything_at_the_pretrained_rate():
    params = _params()
    fresh = {"l1": {"w": np.bool_(False)}, "l2": {"tower": np.array([False, False, False, True])[:, None]}}
    before, after = guard(fresh, probe_steps=2, rate=0.1, l2sp=0.0)
    tx = optax.chain(*before, optax.sgd(1.0), *after)
    state = tx.init(params)
    grads = jax.tree.map(np.ones_like, params)
    for step in range(3):
        updates, state = tx.update(grads, state, params)
        pretrained_part = -1.0 * (0.0 if step < 2 else 0.1)
        np.testing.assert_allclose(updates["l1"]["w"], pretrained_part)
        np.testing.assert_allclose(updates["l2"]["tower"][:3], pretrained_part)
        np.testing.assert_allclose(updates["l2"]["tower"][3], -1.0)  # the new domain's row: the full rate


def test_l2sp_pulls_the_pretrained_parameters_back_to_their_start():
    params = _params()
    fresh = {"l1": {"w": np.bool_(False)}, "l2": {"tower": np.array([False, False, False, True])[:, None]}}
    before, _ = guard(fresh, probe_steps=0, rate=1.0, l2sp=0.5)
    tx = optax.chain(*before, optax.sgd(1.0))
    state = tx.init(params)
    moved = jax.tree.map(lambda p: p + 2.0, params)
    zero = jax.tree.map(np.zeros_like, params)
    updates, _ = tx.update(zero, state, moved)
    np.testing.assert_allclose(updates["l1"]["w"], -0.5 * 2.0)  # -lr * l2sp * (theta - theta_0)
    np.testing.assert_allclose(updates["l2"]["tower"][:3], -1.0)
    np.testing.assert_allclose(updates["l2"]["tower"][3], 0.0)  # new: not pulled


def test_a_guarded_fine_tune_trains_and_probing_holds_the_pretrained_parameters(pretrained, tmp_path):
    from sr_jax.training import loop

    cfg = _new_domain_cfg(pretrained, "finetune.probe_steps=3", "finetune.l2sp_weight=0.01", "train.min_steps=8")
    run = trainer.build_run(cfg, tmp_path / "run")
    shared, tower = "l1/backbone/experts/layers/0/kernel", "l2/tower/layers/0/kernel"

    def host(state):  # the train step donates its input state: read it first
        return {k: np.asarray(v) for k, v in flatten(state.params).items() if k in (shared, tower)}

    state = restore.initial_state(run.spec)
    start = host(state)
    state = loop.train(run, state, until=3)
    probed = host(state)
    np.testing.assert_array_equal(probed[shared], start[shared])  # pretrained: held while probing
    assert not np.allclose(probed[tower][NEW], start[tower][NEW])  # the new domain's tower moved meanwhile
    after = host(loop.train(run, state, until=5))
    assert not np.allclose(after[shared], start[shared])
    run.close()


def test_the_history_aspect_is_on_where_the_data_have_timestamps(tmp_path):
    from sr_jax.data.importer import import_tables
    from sr_jax.text import build_text_cache, get_featurizer

    src = tmp_path / "src"
    src.mkdir()
    (src / "domains.csv").write_text("name,task\nfeed,rec\n")
    (src / "items.csv").write_text("item_id,text\n" + "\n".join(f"i{k},item {k} words" for k in range(8)) + "\n")
    rows = [f"{'train' if i % 5 else 'test'},feed,u{i % 4},i{i % 8},{int(i % 3 == 0)},{i}" for i in range(200)]
    (src / "impressions.csv").write_text("split,domain,user_id,item_id,label,timestamp\n" + "\n".join(rows) + "\n")
    build_text_cache(import_tables(src, tmp_path / "stamped").root, get_featurizer("hashed-bow"), progress=False)
    base = config(TINY, train={"epochs": 1.0})
    assert base.model.user_history == -1  # the default: auto
    stamped = dataclasses.replace(base, data=dataclasses.replace(base.data, path=str(tmp_path / "stamped")))
    trainer.fit(stamped, tmp_path / "with")
    trainer.fit(base, tmp_path / "without")  # the embedded dataset has no timestamps
    assert load_config(tmp_path / "with" / "config.json").model.user_history == 5
    assert load_config(tmp_path / "without" / "config.json").model.user_history == 0


def test_the_content_match_is_the_domain_s_weights_of_the_text_cosines():
    from sr_jax.model.match import MATCH_SCALE, ContentMatch, unit_texts

    rng = np.random.default_rng(0)
    pooled = rng.standard_normal((6, 4)).astype(np.float32)
    query, item, history = np.array([1, -1]), np.array([2, 3]), np.array([[4, 5, -1], [-1, -1, -1]])
    texts = unit_texts(*((pooled[np.maximum(r, 0)], r) for r in (query, item, history)))
    unit = pooled / np.linalg.norm(pooled, axis=1, keepdims=True)
    np.testing.assert_allclose(texts["user_text"][0], (unit[4] + unit[5]) / 2, rtol=1e-5)
    assert not np.asarray(texts["user_text"][1]).any() and not np.asarray(texts["query_text"][1]).any()
    match = ContentMatch(3)
    match.weight[...] = np.array([[0.0, 0.0], [0.5, -1.0], [2.0, 0.25]], np.float32)
    domain = np.array([1, 2])
    cos_q, cos_h = (unit[1] @ unit[2], 0.0), ((unit[4] + unit[5]) / 2 @ unit[2], 0.0)
    want = [(0.5 * cos_q[0] - 1.0 * cos_h[0]) * MATCH_SCALE, 0.0]
    np.testing.assert_allclose(np.asarray(match(texts, domain)), want, rtol=1e-5, atol=1e-6)
    side = np.asarray(match.query_side(texts, domain))  # the two-tower form: a dot product with the item's
    np.testing.assert_allclose((side * np.asarray(texts["item_text"])).sum(1), want, rtol=1e-5, atol=1e-6)
