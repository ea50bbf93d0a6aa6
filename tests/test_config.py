import pytest

from sr_jax.config import Config, ConfigError, load_config, override, save_config, validate
from train import pretrain
from train.cli import config_from_name


def test_overrides_parse_by_declared_type():
    cfg = override(
        Config(),
        [
            "model.dim=16",
            "model.expert_hidden=128,64",
            "model.use_text=false",
            "train.learning_rate=1e-4",
            "data.synthetic.seed=7",
            "model.gating=cls",
        ],
    )
    assert cfg.model.dim == 16 and cfg.model.expert_hidden == (128, 64) and cfg.model.use_text is False
    assert cfg.train.learning_rate == 1e-4 and cfg.data.synthetic.seed == 7 and cfg.model.gating == "cls"
    assert Config().model.dim == 32  # the default is untouched


@pytest.mark.parametrize(
    "bad, words",
    [
        ("model.nope=1", "unknown config key 'model.nope'"),
        ("model.dim=abc", "cannot read 'abc' as int"),
        ("model.use_text=maybe", "expected a boolean"),
        ("model=3", "is a section"),
        ("model.dim.x=3", "is a field"),
        ("model.dim", "section.field=value"),
    ],
)
def test_bad_overrides_are_named(bad, words):
    with pytest.raises(ConfigError, match=words.replace("(", r"\(").replace(".", r"\.")):
        override(Config(), [bad])


def test_saved_config_round_trips(tmp_path):
    cfg = override(config_from_name("default"), ["model.tower_hidden=8,4", "mesh.model=2"])
    save_config(cfg, tmp_path / "config.json")
    assert load_config(tmp_path / "config.json") == cfg
    with pytest.raises(ConfigError, match="no config named"):
        config_from_name("missing")


@pytest.mark.parametrize(
    "overrides, words",
    [
        (["train.weight_decay=0.1"], "train.weight_decay: 0.1 needs train.optimizer=adamw"),
        (["model.gating=cls", "model.use_text=false"], "model.gating: cls gating reads text features"),
        (["model.reg_temperature=0"], "model.reg_temperature: 0.0 must be a finite number > 0"),
        (["model.reg_temperature=-1"], "model.reg_temperature: -1.0 must be a finite number > 0"),
        (["data.batch_size=0"], "data.batch_size: 0 must be a finite number > 0"),
        (["train.epochs=nan"], "train.epochs: nan must be a finite number > 0"),
        (["train.log_every=0"], "train.log_every: 0 must be a finite number > 0"),
        (["train.keep_checkpoints=0"], "train.keep_checkpoints: 0 must be a finite number > 0"),
        (["model.num_experts=0"], "model.num_experts: 0 must be a finite number > 0"),
        (["model.dtype=float16"], "model.dtype: 'float16' is not one of"),
        (["model.ple_levels=2"], "model.ple_levels=2 is set, but it applies only to model.backbone=ple"),
        (["model.star_norm=layer"], "model.star_norm='layer' is set, but it applies only to model.backbone=star"),
        (["model.regularizer=none", "model.reg_weight=0.2"], "model.reg_weight=0.2 is set, but it applies only with"),
        (["model.mmd_bandwidth=2"], "model.mmd_bandwidth=2.0 is set, but it applies only to model.regularizer=mmd"),
        (["finetune.freeze=l3"], "finetune.freeze: unknown level(s) ['l3']"),
        (["finetune.replay_fraction=0.3"], "finetune.replay_fraction: replays the pretraining data"),
        (["mesh.model=3"], "mesh.model: 3 must divide model.table_row_multiple=64"),
        (["train.embedding_update=sparse"], "train.embedding_update: 'sparse' is not one of"),
        # issue 38: accepted unvalidated (inf: an OverflowError after config.json; an empty rule: replicated)
        (["model.lookup_capacity=inf"], "model.lookup_capacity: inf must be a finite number > 0"),
        (["model.lookup_wire=float16"], "model.lookup_wire: 'float16' is not one of"),
        (["data.text_join=disk"], "data.text_join: 'disk' is not one of"),
        (["data.text_join=host", "model.use_text=false"], "data.text_join: 'host' joins text vectors, but model.use"),
        (["mesh.rules=batch="], "mesh.rules: 'batch=' names no axes (write batch=none to replicate it)"),
    ],
)
def test_validate_names_the_key_of_every_problem(overrides, words):
    with pytest.raises(ConfigError, match=words.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        validate(override(Config(), overrides))


def test_validate_reports_all_problems_at_once_and_accepts_the_named_configs():
    with pytest.raises(ConfigError) as e:
        validate(override(Config(), ["data.batch_size=0", "model.dim=-1", "train.seed=-3"]))
    assert all(k in str(e.value) for k in ("data.batch_size", "model.dim", "train.seed"))
    for name in ("default", "baselines", "bench", "finetune"):
        validate(config_from_name(name))


def test_a_bad_override_is_refused_before_anything_is_written(tmp_path):
    workdir = tmp_path / "run"
    with pytest.raises(ConfigError, match="train.log_every: 0 must be a finite number > 0"):
        pretrain.main(["--workdir", str(workdir), "train.log_every=0"])
    assert not (workdir / "config.json").exists()


def test_a_config_saved_before_a_new_default_keeps_its_meaning(tmp_path):
    """A run folder saved before `model.id_dropout`, `model.untrained_ids` and `train.evals_per_epoch` existed
    resumes and re-evaluates as it trained (no id dropout, untrained ids as rows, a fixed validation interval)."""
    import json

    from sr_jax.config import Config, load_config, save_config

    save_config(Config(), tmp_path / "config.json")
    saved = json.loads((tmp_path / "config.json").read_text())
    assert load_config(tmp_path / "config.json") == Config()  # keys present: as saved
    del saved["model"]["id_dropout"], saved["model"]["untrained_ids"], saved["train"]["evals_per_epoch"]
    (tmp_path / "old.json").write_text(json.dumps(saved))
    old = load_config(tmp_path / "old.json")
    assert (old.model.id_dropout, old.model.untrained_ids, old.train.evals_per_epoch) == (0.0, "row", 0.0)


def test_the_docs_count_the_backbones_the_config_lists():
    """One list (the registry, `sr_jax.model.backbones.BACKBONES`), the docs from it (issue 38: 11 names, docs
    saying twelve backbones)."""
    import re
    from pathlib import Path

    from sr_jax.model.backbones import BACKBONES

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    words = {11: "eleven", 12: "twelve", 13: "thirteen"}
    assert f"the {words[len(BACKBONES)]} backbones of the registry" in readme
    assert f"{words[len(BACKBONES) + 1]} backbones" not in readme.lower()
    for name in BACKBONES:
        assert re.search(rf"[`=]{name}\b", readme), name  # `name` or model.backbone=name
