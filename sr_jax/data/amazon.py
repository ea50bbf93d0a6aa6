"""Amazon Industrial & Scientific (the RecBole-style files: Scientific.{train,valid,test}.inter, .text,
.item2index, .user2index) -> the store: a recommendation domain and a product-search domain
(`python -m train.prepare amazon --src DIR --out DIR`).

- Every interaction row (user, target item) is one positive. With probability SEARCH_SHARE (seeded),
  and when the item has a category path, it becomes a search impression whose query is built from the
  item's category path as product-search papers do (Ai et al., SIGIR 2017): the path's words after
  the root "Industrial & Scientific", lower-cased, without duplicates, punctuation and stop words
  ("abrasive finishing products manual sanding rolls"). Otherwise it is a recommendation impression.
- Each positive gets NEGATIVES non-clicks in its domain, drawn uniformly (seeded) among items not in
  the user's history. For search they are drawn from the query's top-level category (items whose
  query shares its first word) but never share the query: random items would not match the query's
  words at all, which would make search trivial.
- Splits follow the files (train, valid, test: RecBole's leave-one-out); items of test never shown in
  train are the cold items. Items text is the file's text (title. category path. brand);
  `item.brand` is a sparse field.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa

from sr_jax.data.importer import from_arrow
from sr_jax.data.store import Dataset, DatasetError

ROOT = "Industrial & Scientific"
SEARCH_SHARE = 0.3
NEGATIVES = 4
STOP_WORDS = frozenset("and or the of for with to in on by a an &".split())
SPLITS = ("train", "valid", "test")


def _lines(file: Path, fields: int, header: bool = True) -> list[list[str]]:
    """Tab-separated rows (after the header, if any), each with `fields` fields (else a DatasetError)."""
    if not file.exists():
        raise DatasetError(file, None, None, "missing (is --src the amazon-scientific folder?)")
    rows = []
    with open(file, encoding="utf-8") as f:
        if header:
            next(f, None)
        for row, line in enumerate(f):
            parts = line.rstrip("\n").split("\t")
            if len(parts) != fields:
                raise DatasetError(file, None, row, f"{len(parts)} tab-separated fields, expected {fields}")
            rows.append(parts)
    return rows


def category_query(text: str) -> str | None:
    """The query of an item from the category path in its text, or None when the text has no path."""
    start = text.find(ROOT)
    if start < 0:
        return None
    path = text[start + len(ROOT) :].split(". ")[0]
    words = []
    for word in re.findall(r"[a-z0-9]+", path.lower()):
        if word not in STOP_WORDS and word not in words:
            words.append(word)
    return " ".join(words) or None


def convert(src: str | Path, out: str | Path, overwrite: bool = False, seed: int = 0) -> Dataset:
    src = Path(src)
    item_asin = {}
    for row, (asin, index) in enumerate(_lines(src / "Scientific.item2index", 2, header=False)):
        if not index.isdigit():
            raise DatasetError(src / "Scientific.item2index", "index", row, f"{index!r} is not an integer")
        item_asin[int(index)] = asin
    text_of = {asin: text.strip() for asin, text in _lines(src / "Scientific.text", 2)}
    query_of = {asin: category_query(text) for asin, text in text_of.items()}

    interactions = {}
    for split in SPLITS:
        file = src / f"Scientific.{split}.inter"
        rows = _lines(file, 3)
        users, targets, histories = [], [], []
        for row, (user, history, target) in enumerate(rows):
            ids = history.split() + [target]
            if not all(i.isdigit() and int(i) in item_asin for i in ids) or not user.isdigit():
                raise DatasetError(file, None, row, f"an id of ({user!r}, {target!r}) is not in the index files")
            users.append(int(user))
            targets.append(int(target))
            histories.append({int(i) for i in ids})
        interactions[split] = (users, targets, histories)

    rng = np.random.default_rng(seed)
    n_items = len(item_asin)
    top_level: dict[str, list[int]] = {}
    for index, asin in item_asin.items():
        if query_of.get(asin):
            top_level.setdefault(query_of[asin].split()[0], []).append(index)
    items_with = Counter(query_of[item_asin[i]] for pool in top_level.values() for i in pool)
    columns = {k: [] for k in ("split", "domain", "user_id", "query_id", "item_id", "label")}
    for split in SPLITS:
        for user, target, seen in zip(*interactions[split]):
            query = query_of.get(item_asin[target])
            search = query is not None and rng.random() < SEARCH_SHARE
            pool = top_level[query.split()[0]] if search else None
            if pool is not None and len(pool) - items_with[query] < 2 * NEGATIVES:
                pool = None  # a top-level category with too few other items: draw from all
            negatives = []
            while len(negatives) < NEGATIVES:
                candidate = int(pool[rng.integers(len(pool))] if pool is not None else rng.integers(n_items))
                if candidate not in seen and not (search and query_of.get(item_asin[candidate]) == query):
                    negatives.append(candidate)
            for item, label in zip([target, *negatives], [1] + [0] * NEGATIVES):
                columns["split"].append(split)
                columns["domain"].append("search_scientific" if search else "rec_scientific")
                columns["user_id"].append(str(user))
                columns["query_id"].append(query if search else None)
                columns["item_id"].append(item_asin[item])
                columns["label"].append(str(label))

    queries = sorted({q for q in query_of.values() if q is not None})
    asins = sorted(item_asin.values())
    tables = {
        "domains": pa.table({"name": ["rec_scientific", "search_scientific"], "task": ["rec", "search"]}),
        "impressions": pa.table(columns),
        "items": pa.table(
            {
                "item_id": asins,
                "text": [text_of.get(a) for a in asins],
                "item.brand": [_brand(text_of.get(a)) for a in asins],
            }
        ),
        "queries": pa.table({"query_id": queries, "text": queries}),
    }
    description = (
        f"Amazon Industrial & Scientific from {src.absolute()}: {SEARCH_SHARE} of interactions as category-path "
        f"searches, {NEGATIVES} sampled negatives per positive (seed {seed})"
    )
    return from_arrow(tables, out, "amazon-scientific", description, overwrite=overwrite)


def _brand(text: str | None) -> str | None:
    """The last sentence of the item text ("... Sanding Rolls. PORTER-CABLE."), when it is short."""
    if not text:
        return None
    last = text.rstrip(". ").split(". ")[-1].strip()
    return last if 0 < len(last) <= 40 and last != text.rstrip(". ") else None
