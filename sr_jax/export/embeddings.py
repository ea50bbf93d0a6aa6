"""Item and query vectors for a retrieval index: the two-tower view of the model.

The model fuses each side's aspects (id, text, sparse fields) into one vector per side by domain gating
(`sr_model.sides`); a side's vector depends on that side's features and the domain only. So per domain there
is an item tower (item -> h_item [d]) and a user/query tower (user, query -> h_user, h_query [d]), and the
network above them (Domain Adaptive Layer, experts, the domain's gate and tower) scores their concatenation.

What the vectors mean, and what they do not:
- `vector` of an item and `user_vector`/`query_vector` of a query are exactly what that network reads
  (`sr_model.from_sides` of them gives the model's logit, bit for bit).
- Their dot product means nothing: the model never takes one, and h_item . h_query ranks items by an
  unrelated quantity.
- `retrieval_vector` r of a query is the gradient of the logit with respect to h_item at the domain's mean
  item vector h_bar: r . h_item ranks items by the first-order Taylor expansion of the model's logit around
  h_bar. It is exact for a model linear in h_item and an approximation otherwise; `recall_at_k` measures how
  much of the model's own top k it finds (retrieval.json), so an index built on it can be judged before use.
- With the content match (`model.content_match`), an item's `match_vector` is its text's unit vector and a
  query's `match_vector` the user and query's side of the match: their dot product is the match's share of the
  logit, exactly; an index ranks by r . h_item + m_query . m_item (one dot product of the concatenations).

Files (Parquet, vectors as fixed-size float32 lists): items.parquet (domain, item_key, item_row, vector,
id_vector = the item's id-table row, text_vector = its raw text features, null without text, match_vector) and
queries.parquet (domain, user_key, query_key, user_vector, query_vector, retrieval_vector, match_vector,
query_text_vector), with embeddings.json saying the widths and the model they came from (match_vector: one zero
without the content match).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from flax import nnx
from tqdm import tqdm

from sr_jax import model as sr_model
from sr_jax.data import history
from sr_jax.data.pipeline import map_batches
from sr_jax.data.store import Dataset
from sr_jax.export.scoring import device_text_table, model_columns, raw_keys, run_scorer, text_table
from sr_jax.export.trained import TrainedModel
from sr_jax.model.match import TEXTS
from sr_jax import io

ITEM_SIDE = ("item_id", "item_text")
QUERY_SIDE = ("user_id", "query_id", "query_text", history.COLUMN)


def _side_columns(model: TrainedModel, side: str) -> list[str]:
    fixed = ITEM_SIDE if side == "item" else QUERY_SIDE
    meta = model.model_meta
    fields = [*meta.sparse_fields, *meta.dense_fields]
    return [*fixed, *(f.column for f in fields if (f.side == "item") == (side == "item"))]


def _blank(model: TrainedModel, columns: dict[str, np.ndarray], n: int) -> dict[str, np.ndarray]:
    """A batch of n examples with every feature missing (ids 0, text rows -1, dense NaN), then `columns`."""
    out = {"domain": np.zeros(n, np.int32)}
    for name in ("user_id", "query_id", "item_id"):
        out[name] = np.zeros(n, np.int32)
    for name in ("query_text", "item_text"):
        out[name] = np.full(n, -1, np.int32)
    for f in model.model_meta.sparse_fields:
        out[f.column] = np.zeros((n, f.max_len) if f.max_len > 1 else (n,), np.int32)
    for f in model.model_meta.dense_fields:
        out[f.column] = np.full(n, np.nan, np.float32)
    if model.config.model.user_history > 0:
        out[history.COLUMN] = np.full((n, model.config.model.user_history), -1, np.int32)
    out.update(columns)
    return out


def _unique_rows(columns: dict[str, np.ndarray], names: list[str]) -> np.ndarray:
    """Indices of the first row of each distinct combination of `names` (and domain), in order."""
    stacked = np.concatenate(
        [np.asarray(columns[n]).reshape(len(columns["domain"]), -1) for n in ["domain", *names] if n in columns], 1
    )
    _, first = np.unique(stacked, axis=0, return_index=True)
    return np.sort(first)


class Towers:
    """The model's side vectors, batched and compiled once: sides(batch) and the retrieval gradient."""

    def __init__(self, model: TrainedModel, text: sr_model.TextTable, batch_size: int):
        self.model, self.batch_size = model, batch_size
        table = device_text_table(text)
        params = jax.device_put(model.params)
        g = model.graphdef
        self._sides = jax.jit(lambda b: sr_model.sides(g, params, b, table))
        # the network's logit alone: the content match's side vectors at zero (its share is m_query . m_item)
        self.matches = model.config.model.content_match and model.config.model.use_text
        silent = {t: jnp.zeros((1, model.text_dim), jnp.float32) for t in TEXTS} if self.matches else {}

        def network(fused, domain):
            texts = {t: jnp.broadcast_to(v, (domain.shape[0], v.shape[1])) for t, v in silent.items()}
            return sr_model.from_sides(g, params, {**fused, **texts}, domain)

        self._logits = jax.jit(network)
        self._gradient = jax.jit(  # d logit / d h_item, one row per example
            lambda user, query, item, domain: jax.grad(
                lambda i: network({"user": user, "query": query, "item": i}, domain).sum()
            )(item)
        )
        if self.matches:
            head = nnx.merge(g, params).l2.match
            self._query_side = jax.jit(lambda texts, d: head.query_side(texts, d))

    def sides(self, columns: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return map_batches(self._sides, columns, self.batch_size)

    def logits(self, fused: dict[str, np.ndarray], domain: np.ndarray) -> np.ndarray:
        """The network's logits (without the content match's share) of side vectors."""
        sides = {k: jnp.asarray(fused[k]) for k in ("user", "query", "item")}
        return np.asarray(self._logits(sides, jnp.asarray(domain)))

    def match_vectors(self, fused: dict[str, np.ndarray], domain: np.ndarray) -> np.ndarray:
        """The user and query's side of the content match [B, t] (zeros [B, 1] without it)."""
        if not self.matches:
            return np.zeros((len(domain), 1), np.float32)
        texts = {k: jnp.asarray(fused[k]) for k in TEXTS}
        return np.asarray(self._query_side(texts, jnp.asarray(domain)))

    def gradient(self, user: np.ndarray, query: np.ndarray, item: np.ndarray, domain: np.ndarray) -> np.ndarray:
        return np.asarray(self._gradient(user, query, item, domain))


def _vectors(a: np.ndarray) -> pa.Array:
    a = np.ascontiguousarray(a, np.float32)
    return pa.FixedSizeListArray.from_arrays(pa.array(a.reshape(-1)), a.shape[1])


def embed(
    model: TrainedModel,
    dataset: Dataset,
    split: str,
    out: str | Path,
    batch_size: int = 4096,
    recall_k: int = 10,
    recall_queries: int = 200,
    overwrite: bool = False,
) -> dict:
    """Writes items.parquet (every item of each domain, from all splits), queries.parquet (each distinct user and
    query of `split`, per domain), embeddings.json and retrieval.json (`recall_at_k` on them) to `out`,
    atomically; an existing folder is replaced only if it holds embeddings, or with `overwrite` (`io.claim`)."""
    if model.config.model.user_history > 0 and model.config.model.history_pooling == "attention":
        raise ValueError(
            f"{model.workdir}: model.history_pooling=attention makes the user's vector depend on the candidate "
            "item (target attention), so there is no user vector to embed apart; score pairs with train.predict"
        )
    io.claim(out, io.EMBEDDINGS, overwrite, inputs=(model.workdir, dataset.root))
    started = time.perf_counter()
    scorer = run_scorer(model, batch_size)
    text = text_table(scorer, dataset)
    towers = Towers(model, text, batch_size)
    item_tables, mean_item, keys = [], {}, dataset.keys()
    # every split's item-side columns, in the model's rows, and the dataset's own item ids (for their keys)
    splits = [model_columns(scorer, dataset, s) for s in dataset.meta.splits]
    merged = {
        c: np.concatenate([np.asarray(cols[c]) for cols in splits]) for c in ["domain", *_side_columns(model, "item")]
    }
    raw_item_ids = np.concatenate([np.asarray(dataset.split(s)["item_id"]) for s in dataset.meta.splits])
    keep = _unique_rows({"domain": merged["domain"], "item": raw_item_ids}, ["item"])
    keep = keep[raw_item_ids[keep] > 0]
    pooled = np.asarray(text.pooled)
    item_table = np.asarray(model.params["l0"]["id_tables"]["item"])

    def stored_rows(columns: dict[str, np.ndarray]) -> np.ndarray:  # where the model reads each item's id row
        return np.asarray(sr_model.table_rows(model.graphdef, model.params, columns)[("id_tables", "item")])

    for k in tqdm(sorted(set(merged["domain"][keep].tolist())), desc="items", unit="domain"):
        rows = keep[merged["domain"][keep] == k]
        columns = _blank(model, {c: merged[c][rows] for c in merged}, len(rows))
        sides = towers.sides(columns)
        fused = sides["item"]
        mean_item[k] = fused.mean(0)
        texts = columns["item_text"]
        text_vectors = _vectors(
            pooled[np.maximum(texts, 0)] if model.config.model.use_text else np.zeros((len(rows), 1))
        )
        item_tables.append(
            pa.table(
                {
                    "domain": pa.array([model.domains[k]] * len(rows)),
                    "item_key": raw_keys(keys, "item_id", raw_item_ids[rows]),
                    "item_row": pa.array(columns["item_id"]),
                    "vector": _vectors(fused),
                    "id_vector": _vectors(item_table[stored_rows(columns)]),
                    "text_vector": pa.array(text_vectors, mask=texts < 0),
                    "match_vector": _vectors(sides["item_text"] if towers.matches else np.zeros((len(rows), 1))),
                }
            )
        )
    columns = model_columns(scorer, dataset, split)
    raw = dataset.split(split)
    query_names = [c for c in _side_columns(model, "query") if c in columns]
    first = _unique_rows(columns, query_names)
    query_tables = []
    for k in tqdm(sorted(set(np.asarray(columns["domain"])[first].tolist())), desc="queries", unit="domain"):
        if k not in mean_item:
            continue
        rows = first[np.asarray(columns["domain"])[first] == k]
        batch = _blank(model, {c: np.asarray(columns[c])[rows] for c in ["domain", *query_names]}, len(rows))
        fused = towers.sides(batch)
        anchor = np.broadcast_to(mean_item[k], fused["item"].shape).copy()
        gradient = np.concatenate(
            [
                towers.gradient(
                    fused["user"][i : i + batch_size],
                    fused["query"][i : i + batch_size],
                    anchor[i : i + batch_size],
                    batch["domain"][i : i + batch_size],
                )
                for i in range(0, len(rows), batch_size)
            ]
        )
        texts = batch["query_text"]
        query_tables.append(
            pa.table(
                {
                    "domain": pa.array([model.domains[k]] * len(rows)),
                    "user_key": raw_keys(keys, "user_id", np.asarray(raw["user_id"])[rows]),
                    "query_key": raw_keys(keys, "query_id", np.asarray(raw["query_id"])[rows]),
                    "user_vector": _vectors(fused["user"]),
                    "query_vector": _vectors(fused["query"]),
                    "retrieval_vector": _vectors(gradient),
                    "match_vector": _vectors(towers.match_vectors(fused, batch["domain"])),
                    "query_text_vector": pa.array(
                        _vectors(
                            pooled[np.maximum(texts, 0)] if model.config.model.use_text else np.zeros((len(rows), 1))
                        ),
                        mask=texts < 0,
                    ),
                }
            )
        )
    items, queries = pa.concat_tables(item_tables), pa.concat_tables(query_tables)
    recall = recall_at_k(towers, items, queries, model.domains, recall_k, recall_queries)
    info = {
        "model": str(model.workdir),
        "fingerprint": model.fingerprint,
        "step": model.step,
        "dataset": str(dataset.root),
        "split": split,
        "dim": model.config.model.dim,
        "text_dim": model.text_dim,
        "items": items.num_rows,
        "queries": queries.num_rows,
        "seconds": round(time.perf_counter() - started, 2),
        "meaning": __doc__.split("What the vectors mean, and what they do not:")[1].split("Files")[0].strip(),
    }
    with io.atomic_dir(Path(out), io.EMBEDDINGS, overwrite=overwrite, inputs=(model.workdir, dataset.root)) as tmp:
        tmp.chmod(0o755)
        pq.write_table(items, tmp / "items.parquet")
        pq.write_table(queries, tmp / "queries.parquet")
        (tmp / "embeddings.json").write_text(json.dumps(info, indent=2) + "\n")
        (tmp / "retrieval.json").write_text(json.dumps(recall, indent=2) + "\n")
    return {**info, "retrieval": recall}


def matrix(column: pa.ChunkedArray) -> np.ndarray:
    """A fixed-size-list column -> [rows, width] float32."""
    flat = column.combine_chunks()
    return flat.flatten().to_numpy().reshape(len(flat), flat.type.list_size)


def recall_at_k(
    towers: Towers, items: pa.Table, queries: pa.Table, domains: list[str], k: int, per_domain: int
) -> dict:
    """Per domain, over up to `per_domain` queries: the mean share of the model's own top k items (its logits for
    every item of the domain) that the top k by dot product finds, for the retrieval vector and, as a contrast,
    for the raw fused vectors (item . (user + query))."""
    out = {}
    for name in domains:
        its, qs = (
            items.filter(pc.equal(items["domain"], name)),
            queries.filter(pc.equal(queries["domain"], name)),
        )
        if its.num_rows <= k or not qs.num_rows:
            continue
        item_vectors, item_match = matrix(its["vector"]), matrix(its["match_vector"])
        picked = np.random.default_rng(0).permutation(qs.num_rows)[:per_domain]
        user, query, retrieval, match = (
            matrix(qs[c])[picked] for c in ("user_vector", "query_vector", "retrieval_vector", "match_vector")
        )
        domain = np.full(its.num_rows, domains.index(name), np.int32)
        found = {"retrieval_vector": [], "fused_dot": []}
        for u, q, r, m in zip(user, query, retrieval, match):
            n = its.num_rows
            logits = (
                towers.logits(
                    {
                        "user": np.broadcast_to(u, (n, len(u))),
                        "query": np.broadcast_to(q, (n, len(q))),
                        "item": item_vectors,
                    },
                    domain,
                )
                + item_match @ m
            )  # the model's logit: the network's and the content match's share
            truth = set(np.argsort(-logits, kind="stable")[:k].tolist())
            scores = {"retrieval_vector": item_vectors @ r + item_match @ m, "fused_dot": item_vectors @ (u + q)}
            for method, score in scores.items():
                top = np.argsort(-score, kind="stable")[:k]
                found[method].append(len(truth & set(top.tolist())) / k)
        out[name] = {
            "items": its.num_rows,
            "queries": len(picked),
            **{f"recall@{k}/{m}": float(np.mean(v)) for m, v in found.items()},
        }
    return out
