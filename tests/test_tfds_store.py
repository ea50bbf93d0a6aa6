"""The tfds export: every split and column round-trips through array_record, read without TensorFlow."""

import sys

import numpy as np
import tensorflow_datasets as tfds

from helpers import TINY, config
from sr_jax.data.tfds_store import write_tfds
from sr_jax.featurized import load_dataset
from train import export_tfds


def test_round_trip_through_tfds_data_source(tmp_path):
    dataset = load_dataset(config(TINY).data)
    assert export_tfds.main(["--data", str(dataset.root), "--out", str(tmp_path)]) == write_tfds(dataset, tmp_path)
    source = tfds.data_source("sr_jax_store", data_dir=str(tmp_path))
    assert set(source.keys()) == set(dataset.meta.splits)
    texts = dataset.texts()
    for split, size in dataset.meta.splits.items():
        assert len(source[split]) == size, split
    columns = dataset.split("heldout_test")
    records = [source["heldout_test"][i] for i in range(len(columns["label"]))]
    features = source["heldout_test"].dataset_info.features
    for name, col in columns.items():
        np.testing.assert_array_equal(np.stack([r[name] for r in records]), np.asarray(col), err_msg=name)
        assert features[name].np_dtype == col.dtype and features[name].shape == col.shape[1:], name
    for r in records[:50]:
        assert r["item_text_value"].decode() == texts[r["item_text"]]
        assert r["query_text_value"].decode() == (texts[r["query_text"]] if r["query_text"] >= 0 else "")
    assert "tensorflow" not in sys.modules
