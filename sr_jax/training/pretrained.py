"""What a fine-tune run takes from its pretrained run, read once before it trains (`read_start`): how its
domains map onto the pretrained rows, which table rows and leaves are new, the alignment reference, and the
pretraining examples it replays. Its dataset may be another one, with ids of its own: it reads the pretrained
tables by raw key (`vocabulary.extend`) and maps its domains onto the pretrained rows by name."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from sr_jax import model as sr_model
from sr_jax import sharding as shd
from sr_jax.config import Config, ConfigError, FinetuneConfig
from sr_jax.data import vocabulary
from sr_jax.data.schema import ID_FIELDS
from sr_jax.data.selection import Columns, select_domains
from sr_jax.data.store import Dataset
from sr_jax.text import text_identity
from sr_jax.training import alignment, records, sparse_update
from sr_jax.training.checkpoint import CheckpointError
from sr_jax.training.transfer import DomainMap, NewRows, new_leaf_paths, untrained_rows


@dataclasses.dataclass(frozen=True)
class PretrainedStart:
    """A fine-tune's pretrained start."""

    folder: Path  # where its records are read: the run's own snapshot, else the pretrained run folder
    run_info: dict  # the pretrained run's run_info.json
    domain_map: DomainMap  # fine-tune domain -> pretrained row (None: a new domain), and new domains' starts
    # new domain -> the pretrained rows of its task that could be its source: the validation data choose among
    # them (`restore.choose_sources`) when there are several, none was named and the run validates
    candidates: dict[int, tuple[int, ...]]
    trained_rows: dict[str, np.ndarray]  # table -> [model rows] bool: the rows the pretrained run trained
    new_rows: NewRows  # the table rows the pretrained run never trained
    new_leaves: frozenset[str]  # the leaves the pretrained run lacks (a new sparse field's)
    reference: sr_model.AlignmentReference | None  # what fine-tuning aligns against, replicated on the mesh
    replay: Columns | None  # the pretraining examples a fine-tune batch replays (in the model's rows)


def pretrained_tasks(run_info: dict) -> list[str | None]:
    """The task of each pretrained domain: run_info's record, or for a run from before it, the name's prefix
    (search_*, rec_*; None: unknown)."""
    if tasks := run_info.get("domain_tasks"):
        return list(tasks)
    return [next((t for t in ("search", "rec") if name.startswith(t)), None) for name in run_info["domains"]]


def domain_map(
    dataset: Dataset, run_info: dict, tune: FinetuneConfig, tower_output: str = ""
) -> tuple[DomainMap, dict[int, tuple[int, ...]]]:
    """(the map of the fine-tune's domains onto the pretrained rows, by name, with each new domain's start as
    `finetune.new_domain_init` and `domain_source` say; the source candidates the validation data choose among).
    `tower_output`: the path of the towers' output kernel, which `match` starts at zero.
    A new domain's candidates are the trained pretrained domains of its task (all of them when none has it);
    before the validation data choose, it starts from the one with the most pretraining examples."""
    rows = {name: k for k, name in enumerate(run_info["domains"])}
    trained = [rows[n] for n in run_info["trained_domains"]]
    tasks, examples = pretrained_tasks(run_info), run_info.get("domain_examples") or [0] * len(rows)
    named = {new.strip(): old.strip() for new, old in (pair.split("=", 1) for pair in tune.domain_source)}
    names = [d.name for d in dataset.meta.domains]
    new = {k for k, n in enumerate(names) if n not in run_info["trained_domains"]}
    for new_name, old in named.items():
        if new_name not in [names[k] for k in new]:
            raise ConfigError(
                f"finetune.domain_source={new_name}={old}: {new_name!r} is not a new domain of {dataset.root} "
                f"(its new domains: {[names[k] for k in sorted(new)]})"
            )
        if old not in run_info["trained_domains"]:
            raise ConfigError(
                f"finetune.domain_source={new_name}={old}: the pretrained run trained no domain {old!r} (it trained "
                f"{run_info['trained_domains']})"
            )
    mapping = DomainMap(tuple(None if k in new else rows[n] for k, n in enumerate(names)))
    candidates = {}
    for k in sorted(new):
        task = dataset.meta.domains[k].task
        same = tuple(r for r in trained if tasks[r] == task) or tuple(trained)
        if tune.new_domain_init == "fresh" or not same:
            continue
        if tune.new_domain_init == "mean":
            mapping = mapping.starting(k, same)
        elif names[k] in named:
            mapping = mapping.starting(k, (rows[named[names[k]]],))
        else:
            mapping = mapping.starting(k, (max(same, key=lambda r: (examples[r], -r)),))
            if len(same) > 1:
                candidates[k] = same
    if tune.new_domain_init == "match":
        mapping = dataclasses.replace(mapping, silent=frozenset({tower_output}))
    return mapping, candidates


def check_text_encoder(run_info: dict, text: tuple[str, str], run_dir: str | Path) -> None:
    """The text projection was fitted to one encoder's features: fine-tuning on another's is an error."""
    if (run_info["text_encoder"], run_info["text_fingerprint"]) != tuple(text):
        raise CheckpointError(
            f"{Path(run_dir) / records.RUN_INFO}: pretrained with text encoder {run_info['text_encoder']!r} "
            f"({run_info['text_fingerprint']}), but this run uses {text[0]!r} ({text[1]})"
        )


def item_texts(dataset: Dataset, row_map: vocabulary.RowMap) -> np.ndarray:
    """[model item rows] int32: each item's row of the text table (-1: none), from every split."""
    out = np.full(row_map.vocab.rows("item_id"), -1, np.int32)
    rows = row_map.rows.get("item_id")
    for split in dataset.meta.splits:
        columns = dataset.split(split)
        ids = np.asarray(columns["item_id"])
        out[ids if rows is None else rows[ids]] = columns["item_text"]
    return out


def _with_text_estimates(
    new_rows: NewRows, folder: Path, dataset: Dataset, row_map: vocabulary.RowMap, pooled: np.ndarray, dim: int
) -> NewRows:
    """`new_rows` with the text map's estimate of every new item row that has a text."""
    kernel, bias = records.read_text_map(folder)
    if kernel.shape != (pooled.shape[1], dim):
        raise CheckpointError(
            f"{folder / records.TEXT_MAP}: maps {kernel.shape[0]}-wide text features to {kernel.shape[1]}-wide rows; "
            f"this run has {pooled.shape[1]}-wide features and {dim}-wide rows"
        )
    texts = item_texts(dataset, row_map)
    new = new_rows.mask[("id_tables", "item")][: len(texts)]
    index = np.flatnonzero(new & (texts >= 0)).astype(np.int32)
    estimate = np.asarray(pooled[texts[index]], np.float32) @ kernel + bias
    return dataclasses.replace(new_rows, text=(index, estimate))


def _replay(cfg: Config, dataset: Dataset, run_info: dict, size: int, row_map: vocabulary.RowMap) -> Columns | None:
    """The pretraining examples a fine-tune batch replays (its train split, trained domains)."""
    if not size:
        return None
    if run_info["dataset"] != dataset.meta.name:
        raise ValueError(
            f"finetune.replay_fraction={cfg.finetune.replay_fraction}: the pretrained run trained on dataset "
            f"{run_info['dataset']!r}, this run's is {dataset.meta.name!r}; replay needs the pretraining data"
        )
    return row_map.remap(select_domains(dataset, run_info["train_split"], tuple(run_info["trained_domains"])))


def read_start(
    cfg: Config,
    folder: Path,
    run_info: dict,
    dataset: Dataset,
    row_map: vocabulary.RowMap,
    abstract_params: Any,
    pooled: np.ndarray,
    replay_size: int,
    mesh: Mesh,
) -> PretrainedStart:
    """The domain map, new rows, new leaves, alignment reference and replay of a fine-tune whose pretrained
    run's records are in `folder` (`records.pretrained_folder`; `run_info`: its run_info.json)."""
    if cfg.model.use_text:
        check_text_encoder(run_info, text_identity(cfg.data.text_encoder), cfg.finetune.pretrained)
    trained = records.read_trained_rows(folder, row_map.vocab)
    table_rows = {key: t.shape[0] for key, t in sparse_update.tables(abstract_params).items()}
    new_rows = untrained_rows(trained, table_rows, set(ID_FIELDS) if cfg.model.id_buckets else set())
    if cfg.finetune.new_rows_init == "text" and cfg.model.use_text:
        new_rows = _with_text_estimates(new_rows, folder, dataset, row_map, pooled, cfg.model.dim)
    mapping, candidates = domain_map(dataset, run_info, cfg.finetune, sr_model.tower_output(cfg.model))
    reference = None
    if cfg.finetune.align_reference and cfg.model.regularizer != "none":
        reference = jax.device_put(alignment.read_reference(folder, cfg.model), shd.replicated(mesh))
    return PretrainedStart(
        folder=folder,
        run_info=run_info,
        domain_map=mapping,
        candidates=candidates,
        trained_rows=trained,
        new_rows=new_rows,
        new_leaves=new_leaf_paths(abstract_params, row_map.new_fields),
        reference=reference,
        replay=_replay(cfg, dataset, run_info, replay_size, row_map),
    )
