"""The pretrained parameters in a fine-tune model's shapes: restored by path (per-domain leaves keep the
pretrained domains' rows, tables the pretrained rows), merged into a fresh init, and the rows the pretrained
run never trained started from `finetune.new_rows_init`.

What the pretrained run never trained is *new*, and stays trainable when its level is frozen:
- a domain (held out of pretraining, or absent from its dataset): its domain-embedding row, adapter W_k,
  expert gate and tower start from a fresh init;
- a table row (a new key, or an id the pretrained data never held): it starts from
  `finetune.new_rows_init` (zero, the table's mean trained row, or for items the text map's estimate);
- a sparse or dense field: its table and projection (a dense field's vectors) start fresh.
Every other parameter is restored exactly; structure or shape differences are one `CheckpointError`
naming every offending parameter path with both shapes.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sr_jax.model.encoding import table_key
from sr_jax.sharding import ROW_SHARDED
from sr_jax.training import sparse_update
from sr_jax.training.checkpoint import CheckpointError, ParamsReader, check_compatible
from sr_jax.training.records import RUN_INFO
from sr_jax.treeutil import path_names, path_str, shapes


@dataclasses.dataclass(frozen=True)
class DomainMap:
    """source[k]: the pretrained row of fine-tune domain k, or None for a new domain; start[k]: for a new domain,
    the pretrained rows whose per-domain parameters its own start from (their mean; empty: a fresh init), empty
    for a known one (`finetune.new_domain_init`)."""

    source: tuple[int | None, ...]
    start: tuple[tuple[int, ...], ...] = ()
    silent: frozenset[str] = frozenset()  # per-domain leaves whose started new-domain rows are zero instead

    @property
    def new_domains(self) -> tuple[int, ...]:
        return tuple(k for k, s in enumerate(self.source) if s is None)

    def starting(self, k: int, rows: tuple[int, ...]) -> DomainMap:
        """The same map with new domain `k` starting from `rows`."""
        start = list(self.start or ((),) * len(self.source))
        start[k] = tuple(rows)
        return dataclasses.replace(self, start=tuple(start))


def table_paths(params: Any) -> frozenset[str]:
    """The paths of the embedding tables among `params`' leaves ("l0/id_tables/user", ...)."""
    return frozenset(
        path_str(p)
        for p, _ in jax.tree_util.tree_leaves_with_path(params)
        if path_names(p)[1:2] and path_names(p)[1] in ROW_SHARDED
    )


def new_leaf_paths(abstract_params: Any, new_fields: tuple[str, ...]) -> frozenset[str]:
    """The leaves of the fields the pretrained run lacks (columns `new_fields`): a sparse field's table and
    projection ("l0/sparse_tables/item_color", ...), a dense field's vectors ("l0/dense/item_rating")."""
    sparse = {table_key(c)[1] for c in new_fields if table_key(c)[0] == "sparse_tables"}
    dense = {table_key(c)[1] for c in new_fields if table_key(c)[0] == "dense"}

    def new(names: tuple[str, ...]) -> bool:
        if names[:2] in (("l0", "sparse_tables"), ("l0", "sparse_proj")):
            return names[2] in sparse
        return names[:2] == ("l0", "dense") and names[2] in dense

    return frozenset(path_str(p) for p, _ in jax.tree_util.tree_leaves_with_path(abstract_params) if new(path_names(p)))


def restore_pretrained(
    run_dir: str | Path, step: int, abstract_params: Any, per_domain: Any, n_pretrained: int, new_leaves: frozenset[str]
) -> Any:
    """The pretrained parameters as saved, for every leaf but `new_leaves` (which the returned tree lacks):
    per-domain leaves keep the pretrained run's domain rows, tables its rows; every other leaf takes the
    shape and sharding of `abstract_params`. Every mismatch is named at once (a CheckpointError)."""
    with ParamsReader(Path(run_dir) / "checkpoints") as reader:
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

        return reader.restore(step, jax.tree_util.tree_map_with_path(target, wanted), partial=True)


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


def merge_pretrained(pretrained: Any, fresh: Any, per_domain: Any, mapping: DomainMap) -> Any:  # noqa: C901
    """`fresh` with the pretrained leaves written in (jit-able; XLA drops the unused parts of `fresh`):
    whole leaves, but for per-domain leaves (the mapped domains' rows, and for a new domain with a start the mean
    of those rows) and tables (the pretrained rows, which alignment keeps in place). Leaves `pretrained` lacks (a
    new field's) stay fresh."""
    dst = np.array([k for k, s in enumerate(mapping.source) if s is not None], np.int32)
    src = np.array([s for s in mapping.source if s is not None], np.int32)
    started = [(k, rows) for k, rows in enumerate(mapping.start) if rows]  # new domains, from pretrained rows
    saved = {path_str(p): x for p, x in jax.tree_util.tree_leaves_with_path(pretrained)}
    tables = table_paths(fresh)

    def merge(path, new, is_domain):
        pre = saved.get(path_str(path))
        if pre is None:
            return new
        if is_domain:
            new = new.at[dst].set(pre[src])
            for k, rows in started:
                value = pre[np.asarray(rows)].astype(jnp.float32).mean(0).astype(new.dtype)
                new = new.at[k].set(jnp.zeros_like(value) if path_str(path) in mapping.silent else value)
            return new
        if path_str(path) in tables:
            return new.at[: pre.shape[0]].set(pre[: new.shape[0]])
        return pre

    return jax.tree_util.tree_map_with_path(merge, fresh, per_domain)


@dataclasses.dataclass(frozen=True)
class NewRows:
    """The table rows a fine-tune trains whatever is frozen: those its pretrained run never trained.

    mask[key], trained[key]: [table rows] bool per table (key: the table's path under params["l0"]), the new
    rows and the rows the pretrained run trained (whose mean is the `mean` init); text: for `text` init, the
    item rows that have text and their estimates ([n] int32, [n, d] float32)."""

    mask: dict[tuple[str, str], np.ndarray]
    trained: dict[tuple[str, str], np.ndarray]
    text: tuple[np.ndarray, Any] | None = None

    @property
    def any(self) -> bool:
        return any(m.any() for m in self.mask.values())


def untrained_rows(trained: dict[str, np.ndarray], table_rows: dict[tuple[str, str], int], hashed: set[str]) -> NewRows:
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
        new = rows.mask[key]
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
