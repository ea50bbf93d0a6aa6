"""docs/MODELS.md's worked example: a backbone in one file and one line trains, and its per-domain parameter is
found as such (what a fine-tune gives a new domain rows of)."""

import importlib.util
import re
from pathlib import Path

from helpers import TINY, config
from sr_jax.model import backbones
from sr_jax.training import trainer
from sr_jax.treeutil import flatten

DOC = Path(__file__).resolve().parents[1] / "docs" / "MODELS.md"


def test_the_worked_example_adds_a_backbone_in_one_file(tmp_path, monkeypatch):
    section = DOC.read_text().split("## Adding a backbone", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S)[1]
    monkeypatch.setattr(backbones, "BACKBONES", dict(backbones.BACKBONES))  # the registration stays in this test
    (tmp_path / "mine.py").write_text(code)
    spec = importlib.util.spec_from_file_location("mine", tmp_path / "mine.py")
    spec.loader.exec_module(importlib.util.module_from_spec(spec))
    assert backbones.BACKBONES["domain_scaled"].__name__ == "DomainScaled"
    cfg = config(TINY, model={"backbone": "domain_scaled"}, train={"epochs": 1.0})
    run = trainer.build_run(cfg, tmp_path / "run")
    per_domain = flatten(run.spec.program.per_domain)
    assert per_domain["l1/backbone/scale"] and not per_domain["l1/backbone/mlp/layers/0/kernel"]
    run.close()
    result = trainer.fit(cfg, tmp_path / "run")
    assert 0.5 < result["overall"]["auc"] <= 1.0


def test_an_unknown_backbone_is_a_config_error_naming_the_registered_ones():
    import dataclasses

    import pytest
    from flax import nnx

    from sr_jax.config import ConfigError

    cfg = dataclasses.replace(config(TINY).model, backbone="nope")
    with pytest.raises(ConfigError, match=r"model.backbone: 'nope' is not one of \('mmoe', 'ple'"):
        backbones.make_backbone(cfg, 3, 12, rngs=nnx.Rngs(0))
