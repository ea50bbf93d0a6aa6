import pytest

from sr_jax.config import Config, ConfigError, config_from_name, load_config, override, save_config


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
