"""Amazon review data in RecBole's atomic-file layout (`NAME.{train,valid,test}.inter`, `NAME.text`,
`NAME.item2index`, `NAME.user2index`; NAME from the folder's `.item2index` file, e.g. `Scientific`) -> the
store: a recommendation domain and a product-search domain (`python -m train.prepare amazon --src DIR
--out DIR [--categories ... | --exclude-categories ...]`).

- Every interaction row (user, target item) is one positive; its timestamp is its position in the user's
  sequence (the history before it is its `item_id_list`), so later rows never precede earlier ones. With
  probability SEARCH_SHARE (seeded), and when the item's text holds a category path (the words after
  the category's root, "Industrial & Scientific" for Scientific: `--root` for others), it becomes a
  search impression whose query is built from that path as product-search papers do (Ai et al., SIGIR
  2017): lower-cased, without duplicates, punctuation and stop words ("abrasive finishing products
  manual sanding rolls"). Otherwise it is a recommendation impression.
- Each positive gets NEGATIVES non-clicks from `sr_jax.data.negatives` (seeded, uniform, never an item the
  user clicked): for search, from the query's top-level category (items whose query shares its first
  word) and never an item of the query's own path: random items would not match the query's words at
  all, which would make search trivial.
- `--categories` / `--exclude-categories` keep the items of some top-level categories (the first word of
  their path) or all but them, before sampling: a sub-category tree prepared apart from the rest is a new
  domain with items (and partly users) of its own.
- `--users K/N` keeps the users whose index is K modulo N: two datasets of other categories *and* other users
  share nothing but texts and field values (the nothing-shared cold-start case, docs/COLD_START.md).
- Splits follow the files (train, valid, test: RecBole's leave-one-out); items of test never shown in
  train are the cold items. Items text is the file's text (title. category path. brand);
  `item.brand` is a sparse field.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pyarrow as pa

from sr_jax.data import negatives as negative_sampling
from sr_jax.data.importer import from_arrow
from sr_jax.data.store import Dataset, DatasetError

# The category root of RecBole's Amazon 2018 short names (the text's path starts with it).
ROOTS = {
    "Scientific": "Industrial & Scientific",
    "Office": "Office Products",
    "Arts": "Arts, Crafts & Sewing",
    "Instruments": "Musical Instruments",
    "Pantry": "Prime Pantry",
    "Tools": "Tools & Home Improvement",
    "Food": "Grocery & Gourmet Food",
}
SEARCH_SHARE = 0.3
NEGATIVES = 4
STOP_WORDS = frozenset("and or the of for with to in on by a an &".split())
SPLITS = ("train", "valid", "test")


def _lines(file: Path, fields: int, header: bool = True) -> list[list[str]]:
    """Tab-separated rows (after the header, if any), each with `fields` fields (else a DatasetError)."""
    if not file.exists():
        raise DatasetError(file, None, None, "missing (is --src a folder of RecBole atomic files?)")
    rows = []
    with open(file, encoding="utf-8-sig") as f:  # -sig: a byte-order mark is not part of the first field
        if header:
            next(f, None)
        for row, line in enumerate(f):
            parts = line.rstrip("\n").split("\t")
            if len(parts) != fields:
                raise DatasetError(file, None, row, f"{len(parts)} tab-separated fields, expected {fields}")
            rows.append(parts)
    return rows


def category_query(text: str, root: str) -> str | None:
    """The query of an item from the category path in its text, or None when the text has no path."""
    start = text.find(root)
    if start < 0:
        return None
    path = text[start + len(root) :].split(". ")[0]
    words = []
    for word in re.findall(r"[a-z0-9]+", path.lower()):
        if word not in STOP_WORDS and word not in words:
            words.append(word)
    return " ".join(words) or None


def dataset_name(src: Path) -> str:
    """NAME of the folder's NAME.item2index (exactly one)."""
    found = sorted(src.glob("*.item2index"))
    if len(found) != 1:
        raise DatasetError(
            src, None, None, f"expected one NAME.item2index file in RecBole's layout, found {[f.name for f in found]}"
        )
    return found[0].name[: -len(".item2index")]


def convert(
    src: str | Path,
    out: str | Path,
    overwrite: bool = False,
    key_prefix: str = "",
    seed: int = 0,
    root: str | None = None,
    categories: tuple[str, ...] = (),
    exclude_categories: tuple[str, ...] = (),
    users: str = "",
) -> Dataset:
    src = Path(src)
    name = dataset_name(src)
    root = root or ROOTS.get(name)
    if root is None:
        raise DatasetError(src / f"{name}.text", None, None, f"no known category root for {name!r}: pass --root")
    item_asin = {}
    for row, (asin, index) in enumerate(_lines(src / f"{name}.item2index", 2, header=False)):
        if not index.isdigit():
            raise DatasetError(src / f"{name}.item2index", "index", row, f"{index!r} is not an integer")
        item_asin[int(index)] = asin
    text_of = {asin: text.strip() for asin, text in _lines(src / f"{name}.text", 2)}
    query_of = {asin: category_query(text, root) for asin, text in text_of.items()}
    top_of = {asin: q.split()[0] for asin, q in query_of.items() if q}
    if categories and exclude_categories:
        raise ValueError("pass --categories or --exclude-categories, not both")
    known = set(top_of.values())
    if unknown := sorted((set(categories) | set(exclude_categories)) - known):
        raise ValueError(f"unknown top-level categories {unknown}; the data has {sorted(known)}")

    group, groups = _user_group(users)

    def kept(asin: str) -> bool:
        if categories:
            return top_of.get(asin) in categories
        return top_of.get(asin) not in exclude_categories

    rng = np.random.default_rng(seed)
    positives = {k: [] for k in ("split", "domain", "user_id", "query_id", "item_id", "timestamp")}
    for split in SPLITS:
        file = src / f"{name}.{split}.inter"
        for row, (user, history, target) in enumerate(_lines(file, 3)):
            ids = history.split() + [target]
            if not all(i.isdigit() and int(i) in item_asin for i in ids) or not user.isdigit():
                raise DatasetError(file, None, row, f"an id of ({user!r}, {target!r}) is not in the index files")
            asin = item_asin[int(target)]
            query = query_of.get(asin)
            search = query is not None and rng.random() < SEARCH_SHARE
            if not kept(asin) or int(user) % groups != group:
                continue
            positives["split"].append(split)
            positives["domain"].append(f"search_{name.lower()}" if search else f"rec_{name.lower()}")
            positives["user_id"].append(user)
            positives["query_id"].append(query if search else None)
            positives["item_id"].append(asin)
            positives["timestamp"].append(str(len(ids) - 1))
    if not positives["item_id"]:
        raise ValueError(f"{src}: no interaction left after the category selection")
    columns = {k: np.array(v, dtype=object) for k, v in positives.items()}
    asins = sorted(a for a in item_asin.values() if kept(a))
    impressions = _with_negatives(columns, asins, query_of, top_of, seed)

    queries = sorted({q for q in impressions["query_id"] if q is not None})
    domains = [f"rec_{name.lower()}", f"search_{name.lower()}"]
    tables = {
        "domains": pa.table({"name": domains, "task": ["rec", "search"]}),
        "impressions": pa.table({k: list(v) for k, v in impressions.items()}),
        "items": pa.table(
            {
                "item_id": asins,
                "text": [text_of.get(a) for a in asins],
                "item.brand": [_brand(text_of.get(a)) for a in asins],
            }
        ),
        "queries": pa.table({"query_id": queries, "text": queries}),
    }
    selection = (
        f", top-level categories {list(categories)}" if categories
        else f", without top-level categories {list(exclude_categories)}" if exclude_categories else ""
    )  # fmt: skip
    selection += f", users {group} modulo {groups}" if users else ""
    description = (
        f"Amazon {root} from {src.absolute()}{selection}: {SEARCH_SHARE} of interactions as category-path "
        f"searches, {NEGATIVES} sampled negatives per positive (seed {seed})"
    )
    suffix = "".join(f"-{c}" for c in categories) + "".join(f"-no-{c}" for c in exclude_categories)
    suffix += f"-users-{group}-of-{groups}" if users else ""
    name = f"amazon-{name.lower()}{suffix}"
    return from_arrow(
        tables, out, name, description, overwrite=overwrite, key_prefix=key_prefix, negatives_per_click=NEGATIVES
    )


def _user_group(users: str) -> tuple[int, int]:
    """ "K/N" -> (K, N), the users kept ("" -> all: (0, 1))."""
    if not users:
        return 0, 1
    try:
        group, groups = (int(x) for x in users.split("/"))
    except ValueError:
        group, groups = -1, 0
    if not 0 <= group < groups:
        raise ValueError(f"--users {users!r}: expected K/N with 0 <= K < N, e.g. 0/2")
    return group, groups


def _with_negatives(columns: dict, asins: list[str], query_of: dict, top_of: dict, seed: int) -> dict:
    """Each positive followed by its NEGATIVES: recommendation from all items, search from the query's top-level
    category, never an item of the query's own path (`negatives.sample`'s `matches`)."""
    search = np.array([q is not None for q in columns["query_id"]])
    matches: dict[str, list[str]] = {}
    for asin in asins:
        if query_of.get(asin):
            matches.setdefault(query_of[asin], []).append(asin)
    parts = []
    for part, group in ((~search, None), (search, top_of)):
        if not part.any():
            continue
        chosen = {k: v[part] for k, v in columns.items()}
        drawn = negative_sampling.sample(
            chosen["user_id"],
            chosen["item_id"],
            chosen["query_id"],
            NEGATIVES,
            seed + int(group is not None),
            pool=np.array(asins, dtype=object),
            group_of=group,
            matches=matches,
            clicks=(columns["user_id"], columns["item_id"]),
        )
        parts.append(negative_sampling.expand(chosen, drawn))
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def _brand(text: str | None) -> str | None:
    """The last sentence of the item text ("... Sanding Rolls. PORTER-CABLE."), when it is short."""
    if not text:
        return None
    last = text.rstrip(". ").split(". ")[-1].strip()
    return last if 0 < len(last) <= 40 and last != text.rstrip(". ") else None
