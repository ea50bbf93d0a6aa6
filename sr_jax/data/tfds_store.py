"""Any dataset of the store as a tensorflow-datasets dataset in `array_record` files, readable with
`tfds.data_source(...)` and no TensorFlow installed:

    write_tfds("data/mine", "tfds_out")                      # or: python -m train.export_tfds
    source = tfds.data_source("sr_jax_store", data_dir="tfds_out")
    source["train"][0]   # {"domain": 1, "user_id": 7, ..., "item_text_value": b"red running shoes"}

Every column of the store becomes a feature of the same name and dtype (multi-valued fields a fixed
length tensor), and the two text columns also get their text (`query_text_value`, `item_text_value`;
empty where there is none), so the export stands alone. The store's meta.json is kept in the dataset's
description. This is an interchange format: records are written and read one by one (about 10k/s), so
training reads the store's memory-mapped columns instead.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds

from sr_jax.data.schema import TEXT_FIELDS
from sr_jax.data.store import Dataset, open_dataset

NAME = "sr_jax_store"


class SrJaxStore(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """The builder; its name is fixed (`sr_jax_store`): one dataset per tfds data_dir."""

    VERSION = tfds.core.Version("1.0.0")
    name = NAME

    def __init__(self, store: Dataset, **kwargs):
        self.store = store
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        features = {}
        for name, (dtype, shape) in self.store.meta.columns().items():
            features[name] = tfds.features.Tensor(shape=shape, dtype=dtype) if shape else tfds.features.Scalar(dtype)
        for name in TEXT_FIELDS:
            features[f"{name}_value"] = tfds.features.Text()
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict(features),
            description=f"sr-jax dataset store export; meta.json:\n{self.store.meta.to_json()}",
            disable_shuffling=True,  # record i is row i of the split
        )

    def _split_generators(self, dl_manager):
        return {split: self._generate_examples(split) for split in self.store.meta.splits}

    def _generate_examples(self, split: str):
        columns = {name: np.asarray(col) for name, col in self.store.split(split).items()}
        texts = self.store.texts()
        for i in range(len(columns["label"])):
            example = {name: col[i] for name, col in columns.items()}
            for name in TEXT_FIELDS:
                example[f"{name}_value"] = texts[example[name]] if example[name] >= 0 else ""
            yield i, example


def write_tfds(store: str | Path | Dataset, data_dir: str | Path) -> Path:
    """Exports a store dataset into `data_dir` (array_record); returns the folder tfds wrote."""
    dataset = store if isinstance(store, Dataset) else open_dataset(store)
    builder = SrJaxStore(dataset, data_dir=str(data_dir), file_format="array_record")
    builder.download_and_prepare()
    return Path(builder.data_dir)
