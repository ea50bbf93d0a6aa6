"""Which rows a run reads: its domains, the validation rows carved from its train split, the fraction of
the train split it keeps, and the batch that fits them. Pure functions of a dataset's columns and seeds, so
every cell of a grid selects the same rows."""

from __future__ import annotations

import logging

import numpy as np

from sr_jax.config import ConfigError, DataConfig
from sr_jax.data import history
from sr_jax.data.schema import DatasetMeta
from sr_jax.data.store import Dataset

log = logging.getLogger("sr_jax")

Columns = dict[str, np.ndarray]  # column name -> [rows, ...], every column the same number of rows


def run_domains(cfg: DataConfig, meta: DatasetMeta) -> tuple[str, ...]:
    """The domains a run trains and evaluates on: `data.domains` (all when empty), without those meta.json
    holds out of pretraining (`pretrain: false`) when `data.pretrain_domains_only`."""
    known = [d.name for d in meta.domains]
    if unknown := [n for n in cfg.domains if n not in known]:
        raise ConfigError(f"data.domains: unknown domain(s) {unknown}; the dataset has {known}")
    chosen = list(cfg.domains) or known
    if not cfg.pretrain_domains_only:
        return tuple(chosen)
    held_out = {d.name for d in meta.domains if not d.pretrain}
    if cfg.domains and (asked := [n for n in cfg.domains if n in held_out]):
        raise ConfigError(
            f"data.domains: {asked} are held out of pretraining in meta.json (pretrain: false); "
            "train on them by fine-tuning, or set data.pretrain_domains_only=false"
        )
    return tuple(n for n in chosen if n not in held_out)


def select_domains(dataset: Dataset, split: str, names: tuple[str, ...]) -> Columns:
    """The split's rows of the named domains (all rows when they are all the dataset's)."""
    columns = dataset.split(split)
    known = [d.name for d in dataset.meta.domains]
    if set(names) == set(known):
        return columns
    keep = np.isin(columns["domain"], [known.index(n) for n in names])
    if not keep.any():
        raise ConfigError(f"domains {list(names)}: no examples in split {split!r}")
    return {name: np.asarray(col[keep]) for name, col in columns.items()}


def history_events(dataset: Dataset, split: str, log_split: str, trained: tuple[str, ...]) -> Columns | None:
    """The events that `split`'s user histories are read from (`history.with_history`): the behaviour log (the
    `log_split`'s events) and, unless `split` is the log, its own earlier events; only in the `trained` domains
    (those the model was trained on, counting the run that reads it), so a domain held out of pretraining never
    reaches a pretraining history. None when the dataset has no timestamps (no history to read)."""
    if not dataset.meta.has_timestamp:
        return None
    names = tuple(d.name for d in dataset.meta.domains if d.name in trained)
    parts = [s for s in dict.fromkeys((log_split, split)) if s in dataset.meta.splits] if names else []
    columns = [select_domains(dataset, s, names) for s in parts]
    return {
        k: np.concatenate([np.asarray(c[k]) for c in columns] or [np.zeros(0, np.int64)]) for k in history.EVENT_KEYS
    }


VALID_FLOOR = 16  # the fewest rows a carved validation set has (at most half of the labelled rows)


def carve_validation(columns: Columns, fraction: float) -> tuple[Columns, Columns | None]:
    """(the rest, a `fraction` of the rows, at least VALID_FLOOR and at most half) of the labelled rows a run
    has, each in the original order: carved from the rows `train_subset` kept, so a run's selection never sees
    more labels than its budget (fraction 0: no carving). Where the rows have timestamps, the carve takes each
    user's latest interactions first (every user's latest, then their second latest, ...), as a test split of
    later interactions is; otherwise a seeded random part. The same rows for the same labelled rows, whatever
    train.seed."""
    if not fraction:
        return columns, None
    size = len(columns["label"])
    count = min(max(VALID_FLOOR, round(fraction * size)), size // 2)
    if count < 1:
        raise ConfigError(f"data.valid_from_train={fraction}: {size} labelled row(s) cannot also validate")
    order = np.random.default_rng(0x7A11D).permutation(size)  # ties (and rows without time) in a seeded order
    if "timestamp" in columns:
        order = order[np.argsort(_recency(columns)[order], kind="stable")]
    held = np.zeros(size, bool)
    held[order[:count]] = True
    return ({k: np.asarray(v)[~held] for k, v in columns.items()}, {k: np.asarray(v)[held] for k, v in columns.items()})


def _recency(columns: Columns) -> np.ndarray:
    """[rows] int: 0 for each user's latest interaction, 1 for the one before, ... (equal times: any order)."""
    user, time = np.asarray(columns["user_id"]), np.asarray(columns["timestamp"])
    by = np.lexsort((-time, user))  # per user, latest first
    starts = np.r_[0, np.flatnonzero(user[by][1:] != user[by][:-1]) + 1]
    rank = np.arange(len(by)) - np.repeat(starts, np.diff(np.r_[starts, len(by)]))
    out = np.empty(len(by), np.int64)
    out[by] = rank
    return out


def subset_size(size: int, fraction: float) -> int:
    if not 0 < fraction <= 1:
        raise ConfigError(f"data.train_fraction={fraction}: expected a fraction in (0, 1]")
    return max(1, round(fraction * size))


def train_subset(columns: Columns, fraction: float, seed: int) -> Columns:
    """A seeded random `fraction` of a split's rows (in their original order); the whole split at 1."""
    size = len(columns["label"])
    keep = subset_size(size, fraction)
    if keep == size:
        return columns
    rows = np.sort(np.random.default_rng([seed, 0x5EED]).permutation(size)[:keep])
    return {name: np.asarray(col[rows]) for name, col in columns.items()}


def valid_subset(columns: Columns, fraction: float, seed: int) -> Columns:
    """The same `fraction` of a dataset's own validation split as `train_subset` keeps of its train split (at
    least VALID_FLOOR rows), so a run trained on a fraction of the labels never chooses its step on more than
    that fraction of the validation labels; the whole split at 1."""
    size = len(columns["label"])
    if fraction >= 1 or size <= VALID_FLOOR:
        return columns
    return train_subset(columns, max(subset_size(size, fraction), VALID_FLOOR) / size, seed)


def clamped_batch_size(configured: int, examples: int, data_axis: int, what: str) -> int:
    """The configured batch, or, when the data are fewer, the largest multiple of the data axis that fits
    (tiny cold-start fractions): the one place a batch is clamped."""
    if examples >= configured:
        return configured
    clamped = examples // data_axis * data_axis
    if clamped == 0:
        raise ConfigError(f"{what}: {examples} examples cannot fill a batch over {data_axis} devices of the data axis")
    log.warning(
        "data.batch_size=%d is larger than the %d examples of %s: using %d", configured, examples, what, clamped
    )
    return clamped
