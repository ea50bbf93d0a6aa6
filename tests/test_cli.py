"""The command line: `section.field=value` overrides go anywhere, whatever option of several values comes last."""

from __future__ import annotations

import pytest

from train import cli, cold_start, experiment, tune


def test_the_issue_command_line_parses():
    argv = "--workdir W --report-dir R train.epochs=1 --seeds 0 --fractions 0.05 --protocols new-domain "
    argv += "--settings scratch freeze-l0-l1 --text on"
    args = cli.parse(cold_start.parser(), argv.split())
    assert args.overrides == ["train.epochs=1"] and args.text == ["on"]
    assert args.settings == ["scratch", "freeze-l0-l1"] and args.seeds == [0] and args.fractions == [0.05]


def _first_value(action) -> str:
    return str(action.choices[0] if action.choices else (action.default or [0])[0])


@pytest.mark.parametrize("module", [cold_start, experiment, tune], ids=lambda m: m.__name__)
def test_overrides_anywhere_with_every_multi_value_option_last(module):
    p = module.parser()
    required = [o for a in p._actions if a.required and a.option_strings for o in (a.option_strings[0], "x")]
    many = [a for a in p._actions if a.option_strings and a.nargs in ("+", "*")]
    assert many, "the entry point has options of several values"
    for action in many:
        value = _first_value(action)
        argv = ["model.dim=8", *required, "train.epochs=1", action.option_strings[0], value, "train.seed=3"]
        args = cli.parse(p, argv)
        assert args.overrides == ["model.dim=8", "train.epochs=1", "train.seed=3"], action.dest
        assert [str(v) for v in getattr(args, action.dest)] == [value], action.dest


def test_a_stray_word_is_still_an_error(capsys):
    with pytest.raises(SystemExit):
        cli.parse(cold_start.parser(), ["--workdir", "W", "--report-dir", "R", "stray"])
    assert "unrecognized arguments: stray" in capsys.readouterr().err


def test_pretrain_and_finetune_take_overrides_anywhere(monkeypatch, tmp_path):
    """The entry points that train parse as the grid commands do: `a.b=1 --workdir X c.d=2` is two overrides."""
    from sr_jax.config import Config, save_config
    from train import finetune, pretrain

    seen = []
    for module in (pretrain, finetune):
        monkeypatch.setattr(module.trainer, "fit", lambda cfg, workdir: seen.append(cfg) or {})
        monkeypatch.setattr(module.evaluation, "markdown_table", lambda result: "")
    monkeypatch.setattr(finetune, "versus_scratch", lambda cfg: None)  # reads the data and the pretrained run
    pretrain.main(["model.dim=8", "--workdir", str(tmp_path / "p"), "train.seed=3"])
    (tmp_path / "old").mkdir()
    save_config(Config(), tmp_path / "old" / "config.json")
    finetune.main(
        ["model.dim=8", "--pretrained", str(tmp_path / "old"), "--workdir", str(tmp_path / "f"), "train.seed=3"]
    )
    assert [(c.model.dim, c.train.seed) for c in seen] == [(8, 3), (8, 3)]
