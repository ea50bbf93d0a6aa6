"""The records a run leaves beside its checkpoints, which say what its parameters mean, and read back by the
runs started from it (`sr_jax.training.pretrained`):

- `run_info.json`: the domains its per-domain parameter rows stand for (in row order), the ones it actually
  trained, the split it trained on, and the text encoder its text projection was fitted to;
- `vocab.json` (`sr_jax.data.vocabulary`): the raw key of every row of its embedding tables;
- `trained_rows.npz`: which rows of each table were trained (by it or its pretrained run);
- `item_text_map.npz`: a ridge map from an item's text features to its trained id row (`fit_text_map`);
- `reference.npz` (`sr_jax.training.alignment`): a sample of each trained domain's z, what fine-tuning
  aligns against;
- `config.json` (the exact config) and, for a run resumed with another config (`--allow-changes`),
  `changes.jsonl`: one line per change, each key with its value before and after.

A fine-tune run copies them from its pretrained run into its own `pretrained/` folder when it starts
(`snapshot_pretrained`), so it resumes and evaluates without the pretrained folder.
"""

from __future__ import annotations

import datetime
import json
import logging
import shutil
from pathlib import Path

import numpy as np

from sr_jax import io
from sr_jax.config import Config, config_changes, load_config, save_config
from sr_jax.data.store import Dataset, column_chunks
from sr_jax.data.vocabulary import VOCAB, Vocabulary
from sr_jax.training.alignment import REFERENCE
from sr_jax.training.checkpoint import CheckpointError, read_record, write_record

log = logging.getLogger("sr_jax")

CONFIG = "config.json"
CHANGES = "changes.jsonl"
RUN_INFO = "run_info.json"
TRAINED_ROWS = "trained_rows.npz"
TEXT_MAP = "item_text_map.npz"
SNAPSHOT = "pretrained"  # a fine-tune run's copy of what it needs from its pretrained run
TEXT_MAP_ITEMS = 50_000  # items the text map is fitted on (a seeded sample beyond that)
TEXT_MAP_RIDGE = 1e-2


def write_config(workdir: Path, cfg: Config) -> None:
    """Saves the run's config; where it replaces another (a resume with --allow-changes), first appends what
    changed to changes.jsonl, so the folder says how its records came to be."""
    path = workdir / CONFIG
    if path.exists() and (changes := config_changes(load_config(path), cfg)):
        line = {"time": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"), "changed": changes}
        with open(workdir / CHANGES, "a") as f:
            f.write(json.dumps(line) + "\n")
        log.warning("%s: resumed with a changed config (%s): recorded in %s", workdir, ", ".join(changes), CHANGES)
    save_config(cfg, path)


def write_run_info(
    workdir: Path,
    dataset: Dataset,
    train_split: str,
    train_domains: np.ndarray,
    text: tuple[str, str],
    pretrained: dict | None,
    row_layout: tuple[int, str],
) -> dict:
    """Records what the run's parameters mean. `train_domains`: the domain column of the train data;
    `row_layout`: (model.table_row_multiple, model.row_layout), where its tables store their rows."""
    names = [d.name for d in dataset.meta.domains]
    trained = {names[k] for k in np.unique(train_domains)}
    examples = np.bincount(np.asarray(train_domains, np.int64), minlength=len(names))
    if pretrained is not None:
        trained |= set(pretrained["trained_domains"]) & set(names)
    info = {
        "dataset": dataset.meta.name,
        "domains": names,
        "domain_tasks": [d.task for d in dataset.meta.domains],
        "domain_examples": [int(n) for n in examples],  # this run's training examples per domain
        "trained_domains": [n for n in names if n in trained],
        "train_split": train_split,
        "text_encoder": text[0],
        "text_fingerprint": text[1],
        "pretrained": pretrained,  # the pretrained run's record, for provenance
        "row_layout": list(row_layout),
    }
    (workdir / RUN_INFO).write_text(json.dumps(info, indent=2) + "\n")
    return info


def row_layout(run_info: dict) -> tuple[int, str]:
    """(table row multiple, row layout) of a run's tables (sr_jax/model/rows.py); runs recorded before the option
    stored rows in row order."""
    multiple, layout = run_info.get("row_layout", (1, "contiguous"))
    return int(multiple), layout


def read_run_info(run_dir: str | Path) -> dict:
    path = Path(run_dir) / RUN_INFO
    if not path.exists():
        raise CheckpointError(f"{path}: missing; is {run_dir} a run folder of train.pretrain or train.finetune?")
    return json.loads(path.read_text())


STRATEGY = "strategy.json"  # a strategy selection's choice (train.finetune): which candidate run is its result


def result_folder(folder: str | Path) -> Path:
    """The run folder whose parameters are `folder`'s result: `folder` itself, or for a strategy selection
    (`train.finetune --strategy auto`, or a default fine-tune that also trained scratch) the candidate run it
    kept; a CheckpointError naming the folder for a selection that has not chosen yet."""
    folder = Path(folder).absolute()
    if io.kind_of(folder) != io.SELECTION:
        return folder
    if not (folder / STRATEGY).exists():
        raise CheckpointError(f"{folder}: a strategy selection that has not chosen yet; run its command to finish it")
    return Path(json.loads((folder / STRATEGY).read_text())["run"])


def pretrained_folder(workdir: Path, pretrained_dir: str | Path) -> Path:
    """Where this run reads its pretrained run's records: its own snapshot once it has one, else the
    pretrained folder itself."""
    own = workdir / SNAPSHOT
    return own if (own / RUN_INFO).exists() else Path(pretrained_dir)


def snapshot_pretrained(workdir: Path, pretrained_dir: str | Path) -> None:
    """Copies the pretrained run's records (run_info, trained items, alignment reference) into
    `workdir/pretrained/`, once, so the fine-tune run no longer needs the pretrained folder."""
    if (workdir / SNAPSHOT / RUN_INFO).exists():
        return
    src = Path(pretrained_dir)
    with io.atomic_dir(workdir / SNAPSHOT, io.SNAPSHOT) as tmp:
        for name in (RUN_INFO, VOCAB, TRAINED_ROWS, TEXT_MAP, REFERENCE):
            if (src / name).exists():
                shutil.copy(src / name, tmp / name)


def write_trained_rows(workdir: Path, trained: dict[str, np.ndarray]) -> None:
    """`trained`: table column (user_id, item.brand, ...) -> [rows] bool, the rows trained so far."""
    write_record(workdir / TRAINED_ROWS, **{table: np.asarray(rows, bool) for table, rows in trained.items()})


def read_trained_rows(run_dir: Path, vocab: Vocabulary) -> dict[str, np.ndarray]:
    """table -> [rows of `vocab`] bool: the rows a run trained (its record, padded with False to the rows
    `vocab` adds; a table the run lacked is all False)."""
    path = Path(run_dir) / TRAINED_ROWS
    saved = read_record(path, "written by every run since keys travel with runs (re-run it)")
    out = {}
    for table in vocab.keys:
        rows = np.zeros(vocab.rows(table), bool)
        if table in saved:
            if len(saved[table]) > len(rows):
                raise CheckpointError(f"{path}: table {table} has {len(saved[table])} rows, the run's {len(rows)}")
            rows[: len(saved[table])] = saved[table]
        out[table] = rows
    return out


def rows_in(columns: dict[str, np.ndarray], vocab: Vocabulary) -> dict[str, np.ndarray]:
    """table -> [rows] bool: the rows `columns` read (row 0, missing, never)."""
    out = {}
    for table in vocab.keys:
        rows = np.zeros(vocab.rows(table), bool)
        for _, ids in column_chunks(columns[table]):  # one pass, in chunks: no copy of the split
            rows[ids.reshape(-1)] = True
        rows[0] = False
        out[table] = rows
    return out


def fit_text_map(texts: np.ndarray, rows: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A ridge regression from items' text features [n, t] to their trained id rows [n, d], on up to
    TEXT_MAP_ITEMS items (seeded) -> (kernel [t, d], bias [d]): how fine-tuning estimates a new item's row
    from its text."""
    if len(texts) > TEXT_MAP_ITEMS:
        pick = np.random.default_rng([seed, 0x7E47]).permutation(len(texts))[:TEXT_MAP_ITEMS]
        texts, rows = texts[pick], rows[pick]
    x = np.asarray(texts, np.float64)
    y = np.asarray(rows, np.float64)
    x_mean, y_mean = x.mean(0), y.mean(0)
    xc = x - x_mean
    kernel = np.linalg.solve(xc.T @ xc + TEXT_MAP_RIDGE * len(x) * np.eye(x.shape[1]), xc.T @ (y - y_mean))
    return kernel.astype(np.float32), (y_mean - x_mean @ kernel).astype(np.float32)


def write_text_map(workdir: Path, kernel: np.ndarray, bias: np.ndarray) -> None:
    write_record(workdir / TEXT_MAP, kernel=kernel, bias=bias)


def read_text_map(run_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    saved = read_record(
        Path(run_dir) / TEXT_MAP,
        "the pretrained run fitted no text map (it trained no item with text): set finetune.new_rows_init=mean",
    )
    return saved["kernel"], saved["bias"]
