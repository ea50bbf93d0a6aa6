"""Fine-tuning from a pretrained run: the cold-start protocols and their schedule, which domains are new,
what a run records for the runs started from it, and the pretrained parameters in the fine-tune
model's shapes.

Every run writes, beside its checkpoints:
- `run_info.json`: the domains its per-domain parameter rows stand for (in row order), the ones it
  actually trained, the split it trained on, and the text encoder its text projection was fitted to;
- `vocab.json` (`sr_jax.data.vocabulary`): the raw key of every row of its embedding tables;
- `trained_rows.npz`: which rows of each table were trained (by it or its pretrained run);
- `item_text_map.npz`: a ridge map from an item's text features to its trained id row (`fit_text_map`);
- `reference.npz` (`sr_jax.training.alignment`): a sample of each trained domain's z, what fine-tuning
  aligns against.
A fine-tune run copies these from its pretrained run into its own `pretrained/` folder when it starts,
so it resumes and evaluates without the pretrained folder. Its dataset may be another one, with ids of
its own: it reads the pretrained tables by raw key (`vocabulary.align`: known keys keep their rows, new
keys get rows after them, sparse fields match by name) and maps its domains onto the pretrained rows by
name. What the pretrained run never trained is *new*, and stays trainable when its level is frozen:
- a domain (held out of pretraining, or absent from its dataset): its domain-embedding row, adapter W_k,
  expert gate and tower start from a fresh init;
- a table row (a new key, or an id the pretrained data never held): it starts from
  `finetune.new_rows_init` (zero, the table's mean trained row, or for items the text map's estimate);
- a sparse field: its table and projection start fresh.
Every other parameter is restored exactly; structure or shape differences are one `CheckpointError`
naming every offending parameter path with both shapes.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sr_jax.config import Config, FinetuneConfig, TrainConfig
from sr_jax.data.store import Dataset, column_chunks
from sr_jax.data.vocabulary import VOCAB, Vocabulary
from sr_jax.io import atomic_dir
from sr_jax.training.alignment import REFERENCE
from sr_jax.training import sparse_update
from sr_jax.training.checkpoint import CheckpointError, ParamsReader, check_compatible, read_record, write_record
from sr_jax.sharding import ROW_SHARDED
from sr_jax.model.encoding import table_key
from sr_jax.treeutil import path_names, path_str, shapes

RUN_INFO = "run_info.json"
TRAINED_ROWS = "trained_rows.npz"
TEXT_MAP = "item_text_map.npz"
SNAPSHOT = "pretrained"  # a fine-tune run's copy of what it needs from its pretrained run
TEXT_MAP_ITEMS = 50_000  # items the text map is fitted on (a seeded sample beyond that)
TEXT_MAP_RIDGE = 1e-2

# protocol -> (train split, eval split) in the embedded dataset (docs/DESIGN.md, "Cold start"); a dataset
# prepared apart for the new domain or items names its own (`protocol_splits`)
PROTOCOLS = {
    "new-domain": ("heldout_train", "heldout_test"),  # a domain held out of pretraining
    "cold-items": ("cold_train", "cold_test"),  # new items in the known domains
}
OWN_SPLITS = ("train", "test")  # a separately prepared dataset's splits, when it has no protocol's names


def protocol_splits(splits: Sequence[str], protocol: str, train: str = "", evaluate: str = "") -> tuple[str, str]:
    """The (train, eval) splits of `protocol` in a dataset with `splits`: those given, else the protocol's names
    when the dataset has them (the embedded dataset), else its `train` and `test` (a dataset prepared apart)."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown cold-start protocol {protocol!r}; expected one of {sorted(PROTOCOLS)}")
    for default in (PROTOCOLS[protocol], OWN_SPLITS):
        if set(default) <= set(splits):
            train, evaluate = train or default[0], evaluate or default[1]
            break
    missing = [s for s in (train, evaluate) if s not in splits]
    if not (train and evaluate) or missing:
        raise ValueError(
            f"protocol {protocol}: the dataset has splits {sorted(splits)}, not "
            f"{missing or list(PROTOCOLS[protocol])}; "
            "name the cold training and evaluation splits with --train-split and --eval-split"
        )
    return train, evaluate


def finetune_config(
    pretrained: Config,
    protocol: str = "new-domain",
    splits: tuple[str, str] | None = None,
    data_path: str | None = None,
) -> Config:
    """A fine-tune run of `protocol` from a pretrained run's config: its model (so the architecture matches),
    its data settings on `data_path` (default: its dataset), the (train, eval) `splits` (default: the
    protocol's in the embedded dataset), and fine-tuning's own schedule, with levels L0 and L1 frozen (the
    paper's best split). It validates on a fixed tenth of the cold train split that it never trains on
    (the cold data have no validation split of their own) every 20 steps, stops after 3 validations without
    a gain and keeps the best step."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown cold-start protocol {protocol!r}; expected one of {sorted(PROTOCOLS)}")
    train_split, eval_split = splits or PROTOCOLS[protocol]
    data = dataclasses.replace(
        pretrained.data,
        path=pretrained.data.path if data_path is None else data_path,
        train_split=train_split,
        eval_split=eval_split,
        batch_size=256,
        pretrain_domains_only=False,
        domains=(),
        valid_split="",
        valid_from_train=0.1,
    )
    return dataclasses.replace(
        pretrained,
        data=data,
        train=TrainConfig(
            seed=pretrained.train.seed,
            epochs=5.0,
            min_steps=100,
            learning_rate=2e-3,
            warmup_steps=20,
            log_every=20,
            checkpoint_every=100,
            eval_every=20,
            early_stopping_patience=3,
        ),
        finetune=FinetuneConfig(freeze=("l0", "l1"), protocol=protocol),
    )


def write_run_info(
    workdir: Path,
    dataset: Dataset,
    train_split: str,
    train_domains: np.ndarray,
    text: tuple[str, str],
    pretrained: dict | None,
) -> dict:
    """Records what the run's parameters mean. `train_domains`: the domain column of the train data."""
    names = [d.name for d in dataset.meta.domains]
    trained = {names[k] for k in np.unique(train_domains)}
    if pretrained is not None:
        trained |= set(pretrained["trained_domains"]) & set(names)
    info = {
        "dataset": dataset.meta.name,
        "domains": names,
        "trained_domains": [n for n in names if n in trained],
        "train_split": train_split,
        "text_encoder": text[0],
        "text_fingerprint": text[1],
        "pretrained": pretrained,  # the pretrained run's record, for provenance
    }
    (workdir / RUN_INFO).write_text(json.dumps(info, indent=2) + "\n")
    return info


def read_run_info(run_dir: str | Path) -> dict:
    path = Path(run_dir) / RUN_INFO
    if not path.exists():
        raise CheckpointError(f"{path}: missing; is {run_dir} a run folder of train.pretrain or train.finetune?")
    return json.loads(path.read_text())


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
    with atomic_dir(workdir / SNAPSHOT) as tmp:
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


@dataclasses.dataclass(frozen=True)
class DomainMap:
    """source[k]: the pretrained row of fine-tune domain k, or None for a new domain."""

    source: tuple[int | None, ...]

    @property
    def new_domains(self) -> tuple[int, ...]:
        return tuple(k for k, s in enumerate(self.source) if s is None)


def domain_map(dataset: Dataset, pretrained: dict) -> DomainMap:
    rows = {name: k for k, name in enumerate(pretrained["domains"])}
    trained = set(pretrained["trained_domains"])
    return DomainMap(tuple(rows[d.name] if d.name in trained else None for d in dataset.meta.domains))


def check_text_encoder(pretrained: dict, text: tuple[str, str], run_dir: str | Path) -> None:
    """The text projection was fitted to one encoder's features: fine-tuning on another's is an error."""
    if (pretrained["text_encoder"], pretrained["text_fingerprint"]) != tuple(text):
        raise CheckpointError(
            f"{Path(run_dir) / RUN_INFO}: pretrained with text encoder {pretrained['text_encoder']!r} "
            f"({pretrained['text_fingerprint']}), but this run uses {text[0]!r} ({text[1]})"
        )


def table_paths(params: Any) -> frozenset[str]:
    """The paths of the embedding tables among `params`' leaves ("l0/id_tables/user", ...)."""
    return frozenset(
        path_str(p)
        for p, _ in jax.tree_util.tree_leaves_with_path(params)
        if path_names(p)[1:2] and path_names(p)[1] in ROW_SHARDED
    )


def new_leaf_paths(abstract_params: Any, new_fields: tuple[str, ...]) -> frozenset[str]:
    """The leaves of the sparse fields the pretrained run lacks (columns `new_fields`): their tables and
    projections ("l0/sparse_tables/item_color", ...)."""
    names = {table_key(column)[1] for column in new_fields}
    return frozenset(
        path_str(p)
        for p, _ in jax.tree_util.tree_leaves_with_path(abstract_params)
        if path_names(p)[:2] in (("l0", "sparse_tables"), ("l0", "sparse_proj")) and path_names(p)[2] in names
    )


def restore_pretrained(
    run_dir: str | Path, step: int, abstract_params: Any, per_domain: Any, n_pretrained: int, new_leaves: frozenset[str]
) -> Any:
    """The pretrained parameters as saved, for every leaf but `new_leaves` (which the returned tree lacks):
    per-domain leaves keep the pretrained run's domain rows, tables its rows; every other leaf takes the
    shape and sharding of `abstract_params`. Every mismatch is named at once (a CheckpointError)."""
    reader = ParamsReader(Path(run_dir) / "checkpoints")
    try:
        step = reader.step(step)
        saved = reader.metadata(step)
        domain_paths = {path_str(p) for p, d in jax.tree_util.tree_leaves_with_path(per_domain) if d}
        free = domain_paths | table_paths(abstract_params)
        wanted = drop(abstract_params, new_leaves)
        check_compatible(
            reader.directory / str(step) / "state",
            {"params": saved},
            {"params": wanted},
            frozenset("params/" + p for p in free),
        )
        saved_shapes = shapes(saved)  # by path: orbax metadata spells list indices as strings

        def target(path, want):
            key = path_str(path)
            if key not in free:
                return want
            rows = saved_shapes[key][0]
            if key in domain_paths and rows != n_pretrained:
                raise CheckpointError(
                    f"{reader.directory / str(step)}: parameter params/{key} has {rows} domain rows, "
                    f"but {RUN_INFO} lists {n_pretrained} domains"
                )
            return jax.ShapeDtypeStruct((rows, *want.shape[1:]), want.dtype, sharding=want.sharding)

        return reader.restore(step, jax.tree_util.tree_map_with_path(target, wanted))
    finally:
        reader.close()


def drop(tree: dict, paths: frozenset[str], prefix: str = "") -> dict:
    """A nested dict without the leaves at `paths` (and without the dicts that leaves empty)."""
    out = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            if kept := drop(value, paths, path + "/"):
                out[key] = kept
        elif path not in paths:
            out[key] = value
    return out


def merge_pretrained(pretrained: Any, fresh: Any, per_domain: Any, mapping: DomainMap) -> Any:
    """`fresh` with the pretrained leaves written in (jit-able; XLA drops the unused parts of `fresh`):
    whole leaves, but for per-domain leaves (the mapped domains' rows) and tables (the pretrained rows,
    which alignment keeps in place). Leaves `pretrained` lacks (a new field's) stay fresh."""
    dst = np.array([k for k, s in enumerate(mapping.source) if s is not None], np.int32)
    src = np.array([s for s in mapping.source if s is not None], np.int32)
    saved = {path_str(p): x for p, x in jax.tree_util.tree_leaves_with_path(pretrained)}
    tables = table_paths(fresh)

    def merge(path, new, is_domain):
        pre = saved.get(path_str(path))
        if pre is None:
            return new
        if is_domain:
            return new.at[dst].set(pre[src])
        if path_str(path) in tables:
            return new.at[: pre.shape[0]].set(pre[: new.shape[0]])
        return pre

    return jax.tree_util.tree_map_with_path(merge, fresh, per_domain)


@dataclasses.dataclass(frozen=True)
class NewRows:
    """The table rows a fine-tune trains whatever is frozen: those its pretrained run never trained.

    new[key], trained[key]: [table rows] bool per table (key: the table's path under params["l0"]), the new
    rows and the rows the pretrained run trained (whose mean is the `mean` init); text: for `text` init, the
    item rows that have text and their estimates ([n] int32, [n, d] float32)."""

    new: dict[tuple[str, str], np.ndarray]
    trained: dict[tuple[str, str], np.ndarray]
    text: tuple[np.ndarray, Any] | None = None

    @property
    def any(self) -> bool:
        return any(m.any() for m in self.new.values())


def new_rows(trained: dict[str, np.ndarray], table_rows: dict[tuple[str, str], int], hashed: set[str]) -> NewRows:
    """From the pretrained run's trained rows per table column: every other row but 0 (missing) and the
    padding is new. A hashed table (`model.id_buckets`) shares its rows among ids: none is new."""
    new, done = {}, {}
    for column, rows in trained.items():
        key = table_key(column)
        padded = np.zeros(table_rows[key], bool)
        padded[: len(rows)] = rows if column not in hashed else True
        done[key] = padded
        fresh = np.zeros(table_rows[key], bool)
        if column not in hashed:
            fresh[1 : len(rows)] = ~rows[1:]
        new[key] = fresh
    return NewRows(new, done)


def init_new_rows(params: Any, rows: NewRows, how: str) -> Any:
    """`params` with every table's new rows set to `how`'s value (jit-able): zero; mean, the mean of the
    rows the pretrained run trained (zero if none); text, for items with text the text map's estimate, for
    the other new rows the mean."""
    started = {}
    for key, table in sparse_update.tables(params).items():
        new = rows.new[key]
        if not new.any():
            continue
        if how == "zero":
            value = jnp.zeros((1, table.shape[1]), table.dtype)
        else:
            trained = jnp.asarray(rows.trained[key])[:, None]
            value = (table * trained).sum(0, keepdims=True) / jnp.maximum(trained.sum(), 1)
        table = jnp.where(jnp.asarray(new)[:, None], value, table)
        if how == "text" and key == ("id_tables", "item") and rows.text is not None:
            index, estimate = rows.text
            table = table.at[index].set(estimate.astype(table.dtype))
        started[key] = table
    return sparse_update.with_tables(params, started)
