"""Batch scoring of a dataset split to Parquet, from a run folder or an exported artifact.

    predict(scorer_of("runs/pretrain"), "data/amazon", "test", "scores.parquet")

The output has one row per example, in the split's order: `row` (its index in the split), `domain`, the raw
keys `user_key`, `query_key`, `item_key` (null where the id is missing), `score` (the click probability) and
`label`. The dataset is read through the model's vocabulary by key (`vocabulary.lookup`: a key the model never
had reads as missing), its text rows through its own text cache, which must come from the model's encoder.

Scoring streams: every `part_rows` examples are written to `OUT.parts/` as one Parquet file, atomically; a
killed job run again keeps the finished parts and scores the rest; the parts are joined into OUT at the end.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from sr_jax import io
from sr_jax import model as sr_model
from sr_jax import sharding as shd
from sr_jax.data import history, vocabulary
from sr_jax.data.selection import history_events
from sr_jax.data.pipeline import map_batches
from sr_jax.data.store import Dataset, open_dataset
from sr_jax.export.trained import TrainedModel, read_text_table

log = logging.getLogger("sr_jax")
PREDICTIONS = "predictions"  # the kind of Parquet file `predict` writes (io.claim)
SCORES = ("logit", "probability")  # what a scorer returns per example: rank by the logit; the probability is
# the calibrated one where the model is calibrated (calibration.json)


@dataclasses.dataclass(frozen=True)
class Scorer:
    """What scoring needs of a model, whether it comes from a run or from an exported artifact."""

    source: str  # the run or artifact folder
    fingerprint: str  # the training run's (and, for a run, its chosen step)
    vocab: vocabulary.Vocabulary
    domains: list[str]
    trained_domains: tuple[str, ...]  # those it was trained on, and
    log_split: str  # its train split: the user history's log (`selection.history_events`)
    text_encoder: tuple[str, str]  # (name, fingerprint) of the encoder its text features came from
    uses_text: bool
    history: int  # model.user_history
    batch_size: int
    # text table -> (batch of the model's features [batch_size, ...] -> {"logit", "probability"} [batch_size])
    bind: Callable[[sr_model.TextTable], Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]]


def run_scorer(model: TrainedModel, batch_size: int | None = None) -> Scorer:
    """Scores with the run's parameters under jit (the trainer's prediction: equal scores at equal batch sizes)."""

    def bind(text: sr_model.TextTable):
        table = device_text_table(text)
        params = jax.device_put(model.params)
        trained = jax.device_put(model.trained_mask())
        calibrated = jax.device_put(model.calibration_table())

        def predict(p, b, t, c):
            out = sr_model.predict(model.graphdef, p, b, table, t, c)  # one forward pass for both scores
            return {k: out[k] for k in SCORES}

        predict = jax.jit(predict)
        return lambda batch: {k: np.asarray(v) for k, v in predict(params, batch, trained, calibrated).items()}

    info, cfg = model.run_info, model.config
    return Scorer(
        source=str(model.workdir),
        fingerprint=model.fingerprint,
        vocab=model.vocab,
        domains=model.domains,
        trained_domains=tuple(info["trained_domains"]),
        log_split=info["train_split"],
        text_encoder=(info["text_encoder"], info["text_fingerprint"]),
        uses_text=cfg.model.use_text,
        history=cfg.model.user_history,
        batch_size=batch_size or cfg.data.eval_batch_size,
        bind=bind,
    )


def artifact_scorer(folder: str | Path, batch_size: int = 4096) -> Scorer:
    """Scores with an exported artifact, through its own `serve.py` (what a serving system runs)."""
    folder = Path(folder)
    spec = importlib.util.spec_from_file_location(f"sr_serve_{abs(hash(str(folder)))}", folder / "serve.py")
    serve = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(serve)
    served = serve.load(folder)
    manifest = served.manifest
    names = {f["name"] for f in manifest["features"]}

    def bind(text: sr_model.TextTable):
        table = {c: np.asarray(getattr(text, c)) for c in manifest["text"]["columns"]}
        return lambda batch: served({k: v for k, v in batch.items() if k in names}, table)

    return Scorer(
        source=str(folder),
        fingerprint=manifest["run"]["fingerprint"],
        vocab=vocabulary.read(folder),
        domains=served.domains,
        trained_domains=tuple(manifest["run"].get("trained_domains", served.domains)),  # older artifacts: all
        log_split=manifest["run"].get("train_split", "train"),
        text_encoder=(manifest["text"]["encoder"], manifest["text"]["fingerprint"]),
        uses_text=manifest["run"]["model"]["use_text"],
        history=manifest["run"]["model"]["user_history"],
        batch_size=batch_size,
        bind=bind,
    )


def model_columns(scorer: Scorer, dataset: Dataset, split: str) -> dict[str, np.ndarray]:
    """The split's columns in the model's rows and domains (memory-mapped where nothing changes)."""
    columns = dataset.split(split)
    known = {n: k for k, n in enumerate(scorer.domains)}
    names = [d.name for d in dataset.meta.domains]
    if unknown := [n for n in names if n not in known]:
        present = set(np.unique(np.asarray(columns["domain"])).tolist())
        if unknown := [n for n in unknown if names.index(n) in present]:
            raise ValueError(
                f"{dataset.root}: split {split!r} has domain(s) {unknown} that the model {scorer.source} lacks "
                f"(it has {scorer.domains}); fine-tune it on them first (train.finetune)"
            )
    out = vocabulary.lookup(scorer.vocab, vocabulary.of_dataset(dataset)).remap(columns)
    to_model = np.array([known.get(n, 0) for n in names], np.int32)
    out["domain"] = to_model[np.asarray(columns["domain"])]
    if scorer.history > 0:  # the user's earlier clicks, read as training and evaluation read them
        events = history_events(dataset, split, scorer.log_split, scorer.trained_domains)
        out[history.COLUMN] = history.with_history(columns, events, scorer.history)[history.COLUMN]
    return out


def device_text_table(text: sr_model.TextTable) -> sr_model.TextTable:
    """A host text table on this process's default device (`sharding.text_table` on a one-device mesh)."""
    return sr_model.TextTable(*shd.text_table(shd.single_device_mesh(), text.pooled, text.summary, keep_summary=True))


def text_table(scorer: Scorer, dataset: Dataset) -> sr_model.TextTable:
    """The dataset's text cache from the model's encoder (a 1-row stand-in for a model without text)."""
    if not scorer.uses_text:
        zero = np.zeros((1, 1), np.float32)
        return sr_model.TextTable(zero, zero)
    name, fingerprint = scorer.text_encoder
    return read_text_table(dataset, {"text_encoder": name, "text_fingerprint": fingerprint})


def raw_keys(keys: dict[str, list[str]], table: str, ids: np.ndarray) -> pa.Array:
    """The raw key of each id of `table` (`keys`: the dataset's `keys()`, read once; null for 0, missing)."""
    return pa.array(np.array([None, *keys[table]], dtype=object)[ids], pa.string())


def predict(
    scorer: Scorer,
    data: str | Path,
    split: str,
    out: str | Path,
    part_rows: int = 262_144,
    overwrite: bool = False,
) -> dict:
    """Scores `split` of the dataset at `data` into the Parquet file `out`; -> a summary (rows, seconds,
    examples/s, parts reused). Resumes a killed job of the same scorer, data, split and batch size. An existing
    `out` is replaced only if it holds predictions, or with `overwrite` (`io.claim`)."""
    out = io.claim(out, PREDICTIONS, overwrite, inputs=(data,))
    dataset = open_dataset(data)
    columns = model_columns(scorer, dataset, split)
    raw = dataset.split(split)
    size = len(columns["label"])
    part_rows = max(scorer.batch_size, part_rows // scorer.batch_size * scorer.batch_size)
    parts = out.with_name(out.name + ".parts")
    job = {
        "source": scorer.source,
        "fingerprint": scorer.fingerprint,
        "data": str(Path(data).absolute()),
        "split": split,
        "rows": size,
        "batch_size": scorer.batch_size,
        "part_rows": part_rows,
    }
    _start_parts(parts, job, overwrite)
    score = scorer.bind(text_table(scorer, dataset))
    names, keys = [d.name for d in dataset.meta.domains], dataset.keys()
    starts = list(range(0, size, part_rows))
    reused = sum((parts / _part_name(i)).exists() for i in range(len(starts)))
    started, scored = time.perf_counter(), 0
    with tqdm(total=size, desc=f"score {split}", unit="ex", unit_scale=True, dynamic_ncols=True) as bar:
        for i, start in enumerate(starts):
            stop = min(start + part_rows, size)
            if (parts / _part_name(i)).exists():
                bar.update(stop - start)
                continue
            chunk = {k: v[start:stop] for k, v in columns.items()}
            scores = map_batches(score, chunk, scorer.batch_size)
            domain = np.asarray(raw["domain"][start:stop])
            table = pa.table(
                {
                    "row": pa.array(np.arange(start, stop, dtype=np.int64)),
                    "domain": pa.DictionaryArray.from_arrays(pa.array(domain, pa.int32()), pa.array(names)),
                    "user_key": raw_keys(keys, "user_id", np.asarray(raw["user_id"][start:stop])),
                    "query_key": raw_keys(keys, "query_id", np.asarray(raw["query_id"][start:stop])),
                    "item_key": raw_keys(keys, "item_id", np.asarray(raw["item_id"][start:stop])),
                    "score": pa.array(scores["probability"].astype(np.float32)),
                    "logit": pa.array(scores["logit"].astype(np.float32)),  # what to rank by
                    "label": pa.array(np.asarray(raw["label"][start:stop]).astype(np.int8)),
                }
            )
            with io.atomic_file(parts / _part_name(i)) as tmp:
                pq.write_table(table, tmp)
            scored += stop - start
            bar.update(stop - start)
            bar.set_postfix(ex_s=f"{scored / (time.perf_counter() - started):,.0f}")
    seconds = time.perf_counter() - started
    schema = pq.read_schema(parts / _part_name(0))
    with io.atomic_file(out) as tmp:
        with pq.ParquetWriter(tmp, schema.with_metadata({io.KIND_KEY: PREDICTIONS})) as writer:
            for i in range(len(starts)):
                writer.write_table(pq.read_table(parts / _part_name(i)))
    shutil.rmtree(parts)
    return {**job, "out": str(out), "parts_reused": reused, "seconds": seconds, "examples_per_s": scored / seconds}


def _part_name(i: int) -> str:
    return f"part-{i:05d}.parquet"


def _start_parts(parts: Path, job: dict, overwrite: bool) -> None:
    """The parts folder of this job: kept when it holds a killed run of the same job, else started empty (the
    parts of another job only with `overwrite`; a folder that holds no job's parts never without it)."""
    io.claim(parts, io.SCORE_PARTS, overwrite)
    record = parts / "job.json"
    before = _read_job(record)
    if before == job:
        return
    if before is not None and not overwrite:
        changed = sorted(k for k in job if before.get(k) != job[k])
        raise ValueError(
            f"{parts}: holds the parts of another scoring job (differs in {changed}); pass --overwrite to start again"
        )
    if parts.exists():
        shutil.rmtree(parts)
    io.mark(parts, io.SCORE_PARTS)
    with io.atomic_file(record) as tmp:  # a job file is whole or absent: a kill while writing it loses nothing
        tmp.write_text(json.dumps(job, indent=2) + "\n")


def _read_job(record: Path) -> dict | None:
    """The job a parts folder holds; None when there is none, or it was never completed (a job file is written
    atomically, so only a foreign file can be unreadable: it is started anew, with a warning)."""
    if not record.exists():
        return None
    try:
        return json.loads(record.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        log.warning("%s: unreadable job record; starting the job again", record)
        return None
