"""A trained model read back from its run folder, without its dataset or its optimizer state: what export,
batch scoring, embeddings and conversions start from.

    model = load("runs/pretrain")            # the run's result: its best validated step, else its latest
    logits, _ = sr_jax.model.apply(model.graphdef, model.params, batch, text)

A run's parameters mean something only with its vocabulary (`vocab.json`: the raw key of every table row) and
its domains and text encoder (`run_info.json`); all three travel with every export.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from sr_jax import calibration
from sr_jax import model as sr_model
from sr_jax.config import Config, load_config
from sr_jax.data.schema import DatasetMeta, Domain
from sr_jax.data.store import Dataset
from sr_jax.data.vocabulary import Vocabulary, read as read_vocab
from sr_jax.featurized import load_dataset
from sr_jax.training.checkpoint import BestCheckpoint, CheckpointError, ParamsReader
from sr_jax.training.records import read_run_info, read_trained_rows, result_folder
from sr_jax.treeutil import path_str


@dataclasses.dataclass(frozen=True)
class TrainedModel:
    workdir: Path
    config: Config
    run_info: dict  # run_info.json: dataset, domains, trained domains, text encoder and its fingerprint
    vocab: Vocabulary
    graphdef: nnx.GraphDef
    params: Any  # nested dict of numpy arrays (host memory)
    step: int
    chosen_by: str  # "validation" (the best validated step, what eval.json reports) or "latest"
    model_meta: DatasetMeta  # what the model's shapes follow (table sizes, sparse fields, domains)
    text_dim: int
    calibration: dict | None = None  # calibration.json: the per-domain map of its logits (None: not calibrated)

    @property
    def domains(self) -> list[str]:
        return list(self.run_info["domains"])

    @property
    def fingerprint(self) -> str:
        """sha256 of the run's config, run_info, vocabulary, calibration and the chosen step: names the scores."""
        h = hashlib.sha256()
        for name in ("config.json", "run_info.json", "vocab.json"):
            h.update((self.workdir / name).read_bytes())
        if self.calibration is not None:  # a refit (train.calibrate) changes the probabilities
            h.update(json.dumps(self.calibration, sort_keys=True).encode())
        h.update(f"{self.chosen_by}:{self.step}".encode())
        return h.hexdigest()

    def trained_mask(self) -> dict[str, np.ndarray] | None:
        """table -> [rows] bool, the rows the run trained (its record), when `model.untrained_ids=missing` reads
        the others as missing (`sr_model.predict`'s `trained`); None otherwise."""
        if self.config.model.untrained_ids != "missing":
            return None
        return read_trained_rows(self.workdir, self.vocab)

    def calibration_table(self) -> dict[str, np.ndarray]:
        """The calibration as `sr_model.predict` takes it (`calibration.arrays`; the identity when none)."""
        return calibration.arrays(self.calibration, self.domains)

    def text_table(self) -> sr_model.TextTable:
        """The run's dataset's cached text features (host arrays, memory-mapped), checked against the encoder
        the run trained with."""
        return read_text_table(self.dataset(), self.run_info)

    def dataset(self) -> Dataset:
        return load_dataset(self.config.data)


def read_text_table(dataset: Dataset, run_info: dict) -> sr_model.TextTable:
    """`dataset`'s text cache made by the run's encoder; an error naming the dataset when there is none or it
    was made by other weights (`run_info`: the run's record)."""
    dataset.text_cache_info(run_info["text_encoder"], run_info["text_fingerprint"])
    return sr_model.TextTable(*dataset.text_cache(run_info["text_encoder"]))


def model_meta(vocab: Vocabulary, domains: list[str]) -> DatasetMeta:
    """The shapes-only metadata of a model with `vocab`'s tables and these domains (no dataset needed)."""
    meta = DatasetMeta(
        name="", domains=[Domain(n, "rec") for n in domains], vocab={}, sparse_fields=[], splits={}, num_texts=0
    )
    return vocab.model_meta(meta)


def _text_dim(saved: dict) -> int:
    """The text features' width, read off the saved shapes (the text projections' or the cls gate's inputs)."""
    for path, leaf in jax.tree_util.tree_leaves_with_path(saved):
        name = path_str(path)
        if name.endswith("kernel") and ("/text_proj/" in f"/{name}" or "/cls_gate/" in f"/{name}"):
            return int(leaf.shape[0])
    return 1  # a model without text aspects or cls gating: no shape depends on it


def load(workdir: str | Path, step: int | None = None) -> TrainedModel:
    """A run's parameters: `step` of its checkpoints, or by default its result (the best validated step when the
    run validated, else its latest checkpoint), on the host; a CheckpointError naming the folder when they do
    not restore or do not match the run's config."""
    workdir = result_folder(workdir)
    if not (workdir / "config.json").exists():
        raise CheckpointError(f"{workdir / 'config.json'}: missing; is {workdir} a run folder?")
    cfg, info, vocab = load_config(workdir / "config.json"), read_run_info(workdir), read_vocab(workdir)
    meta = model_meta(vocab, info["domains"])
    with ParamsReader(workdir / "checkpoints") as reader:
        latest = reader.step(-1 if step is None else step)
        saved = reader.metadata(latest)
    text_dim = _text_dim(saved)
    graphdef, abstract = sr_model.abstract(cfg.model, meta, text_dim)
    device = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), abstract)
    best_dir = workdir / "best"
    if step is None and best_dir.is_dir():
        with BestCheckpoint(best_dir) as best:
            chosen = best.best()
            params = best.restore(target) if chosen else None
        if chosen:
            return _trained(workdir, cfg, info, vocab, graphdef, params, chosen[0], "validation", meta, text_dim)
    with ParamsReader(workdir / "checkpoints") as reader:
        params = reader.restore(latest, target)
    return _trained(workdir, cfg, info, vocab, graphdef, params, latest, "latest", meta, text_dim)


def _trained(workdir, cfg, info, vocab, graphdef, params, step, chosen_by, meta, text_dim) -> TrainedModel:
    host = jax.tree.map(np.asarray, jax.device_get(params))
    fitted = calibration.read(workdir)
    return TrainedModel(workdir, cfg, info, vocab, graphdef, host, int(step), chosen_by, meta, text_dim, fitted)
