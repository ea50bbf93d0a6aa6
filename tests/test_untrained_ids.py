"""`model.untrained_ids=missing`: an id the model never trained reads as a missing aspect, the same way in
evaluation, batch scoring and the serving artifact."""

import json

import jax.numpy as jnp
import numpy as np
import pyarrow.parquet as pq
import pytest

from helpers import TINY, config
from sr_jax import metrics, model as sr_model
from sr_jax.export import scoring, trained
from sr_jax.featurized import load_dataset
from sr_jax.training import records, trainer
from train import export, predict


def test_an_untrained_row_scores_as_a_missing_id():
    cfg = config(TINY)
    ds = load_dataset(cfg.data)
    pooled, first = ds.text_cache("hashed-bow")
    text = sr_model.TextTable(jnp.asarray(pooled), jnp.asarray(first))
    batch = {k: jnp.asarray(v[:64]) for k, v in ds.split("test").items()}
    graphdef, params = sr_model.init(cfg.model, ds.meta, pooled.shape[1])
    known = np.zeros(ds.meta.vocab["item_id"], bool)
    known[np.asarray(batch["item_id"])[:32]] = True  # the first 32 examples' items are trained
    masked = sr_model.predict(graphdef, params, batch, text, {"item_id": jnp.asarray(known)})["logit"]
    zeroed = {**batch, "item_id": jnp.where(jnp.asarray(known)[batch["item_id"]], batch["item_id"], 0)}
    np.testing.assert_array_equal(masked, sr_model.predict(graphdef, params, zeroed, text)["logit"])
    plain = sr_model.predict(graphdef, params, batch, text)["logit"]
    untrained = ~known[np.asarray(batch["item_id"])]
    assert untrained.any() and not np.allclose(np.asarray(masked)[untrained], np.asarray(plain)[untrained])
    np.testing.assert_array_equal(np.asarray(masked)[~untrained], np.asarray(plain)[~untrained])


def test_evaluation_scoring_and_serving_read_untrained_ids_alike(tmp_path):
    """A run on a tenth of its data leaves items untrained; eval.json, train.predict and the artifact agree."""
    cfg = config(TINY, model={"untrained_ids": "missing"}, data={"train_fraction": 0.1}, train={"epochs": 2.0})
    result = trainer.fit(cfg, tmp_path / "run")
    model = trained.load(tmp_path / "run")
    mask = model.trained_mask()
    assert mask["item_id"].any() and not mask["item_id"][1:].all()
    assert result["cold_items"]["examples"] > 0  # test items the run never trained: read as missing
    out = tmp_path / "scores.parquet"
    predict.main(["--workdir", str(tmp_path / "run"), "--out", str(out)])
    table = pq.read_table(out)
    domains, labels, logits = (np.asarray(table[c].to_pylist()) for c in ("domain", "label", "logit"))
    for name, m in result["domains"].items():
        assert metrics.auc(labels[domains == name], logits[domains == name]) == pytest.approx(m["auc"], abs=1e-9)
    export.main(["--workdir", str(tmp_path / "run"), "--out", str(tmp_path / "served")])
    served = scoring.predict(scoring.artifact_scorer(tmp_path / "served", 512), model.dataset().root, "test",
                             tmp_path / "served.parquet")  # fmt: skip
    assert served["rows"] == len(labels)
    np.testing.assert_allclose(pq.read_table(tmp_path / "served.parquet")["logit"].to_numpy(), logits, atol=1e-5)
    with np.load(tmp_path / "run" / records.TRAINED_ROWS) as saved:
        np.testing.assert_array_equal(saved["item_id"], mask["item_id"])
    assert json.loads((tmp_path / "run" / "config.json").read_text())["model"]["untrained_ids"] == "missing"
