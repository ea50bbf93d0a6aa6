"""MovieLens ml-latest-small -> the store: four recommendation domains from genre groups and a search
domain from the free-text tags (`python -m train.prepare movielens --src DIR --out DIR`).

- Recommendation (user -> movie): a rating of 4 or more is a click (1), 2.5 or less a non-click (0);
  3 and 3.5 are dropped as ambiguous. A movie's domain is the genre group (GROUPS) holding most of its
  genres, the earlier group on a tie or with no genre.
- Search (`search_tags`): every tag application (user, movie, tag) is a query, the lower-cased tag,
  with the tagged movie as a click and NEGATIVES non-clicks: movies drawn uniformly, with a seeded
  generator, among those never given that tag; they share the tag's user and timestamp.
- Items: text "Title (year). Genre, Genre"; sparse fields `item.genres` (multi-valued) and `item.decade`.
- Splits by time: `test` holds every impression at or after the TEST_QUANTILE quantile of the
  timestamps, `valid` those from the VALID_QUANTILE quantile up to it (the last part of the training
  period, for validation during training and tuning), `train` the rest. A movie first seen after the
  train period never appears in train: the cold items.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv

from sr_jax.data.importer import from_arrow, keep_domains
from sr_jax.data.store import Dataset, DatasetError

GROUPS = {
    "rec_action": ("Action", "Adventure", "Sci-Fi", "Thriller", "War", "Western", "Crime"),
    "rec_comedy": ("Comedy", "Romance", "Musical"),
    "rec_drama": ("Drama", "Mystery", "Film-Noir", "Horror"),
    "rec_family": ("Animation", "Children", "Fantasy", "Documentary", "IMAX"),
}
SEARCH = "search_tags"
NEGATIVES = 4
VALID_QUANTILE = 0.7
TEST_QUANTILE = 0.8


def _read(file: Path, columns: dict[str, type]) -> dict[str, np.ndarray]:
    """The named columns of a CSV file as numpy arrays of the given types; errors name file, column, row."""
    if not file.exists():
        raise DatasetError(file, None, None, "missing (is --src a MovieLens ml-latest-small folder?)")
    table = pa_csv.read_csv(
        file, convert_options=pa_csv.ConvertOptions(column_types=dict.fromkeys(columns, pa.string()))
    )
    out = {}
    for name, kind in columns.items():
        if name not in table.column_names:
            raise DatasetError(file, name, None, f"missing column (the file has {table.column_names})")
        values = np.asarray(table[name].to_pylist(), dtype=object)
        if kind is str:
            out[name] = values.astype(str)
            continue
        try:
            out[name] = np.array([kind(v) for v in values])
        except (TypeError, ValueError):
            row = next(i for i, v in enumerate(values) if not _parses(v, kind))
            raise DatasetError(file, name, row, f"{values[row]!r} is not a {kind.__name__}") from None
    return out


def _parses(value, kind) -> bool:
    try:
        kind(value)
        return True
    except (TypeError, ValueError):
        return False


def _group(genres: str) -> str:
    names = list(GROUPS)
    counts = [sum(g in GROUPS[n] for g in genres.split("|")) for n in names]
    return names[int(np.argmax(counts))]


def convert(
    src: str | Path,
    out: str | Path,
    overwrite: bool = False,
    key_prefix: str = "",
    seed: int = 0,
    domains: tuple[str, ...] = (),
    exclude_domains: tuple[str, ...] = (),
) -> Dataset:
    """`domains` / `exclude_domains`: keep only these domains (or all but them) and the movies, users and
    queries they use: a genre group prepared apart from the others (`importer.keep_domains`)."""
    src = Path(src)
    movies = _read(src / "movies.csv", {"movieId": int, "title": str, "genres": str})
    ratings = _read(src / "ratings.csv", {"userId": int, "movieId": int, "rating": float, "timestamp": int})
    tags = _read(src / "tags.csv", {"userId": int, "movieId": int, "tag": str, "timestamp": int})
    known = set(movies["movieId"].tolist())
    for file, table in (("ratings.csv", ratings), ("tags.csv", tags)):
        unknown = ~np.isin(table["movieId"], list(known))
        if unknown.any():
            row = int(np.flatnonzero(unknown)[0])
            raise DatasetError(src / file, "movieId", row, f"movie {table['movieId'][row]} is not in movies.csv")

    # recommendation impressions
    rating = ratings["rating"]
    keep = (rating >= 4) | (rating <= 2.5)
    group_of = {m: _group(g) for m, g in zip(movies["movieId"], movies["genres"])}
    rec = {
        "domain": np.array([group_of[m] for m in ratings["movieId"][keep]], dtype=object),
        "user_id": ratings["userId"][keep],
        "query_id": np.full(keep.sum(), None, dtype=object),
        "item_id": ratings["movieId"][keep],
        "label": (rating[keep] >= 4).astype(np.int8),
        "timestamp": ratings["timestamp"][keep],
    }

    # search impressions: one click and NEGATIVES sampled non-clicks per tag application
    rng = np.random.default_rng(seed)
    query = np.array([t.strip().lower() for t in tags["tag"]], dtype=object)
    tagged: dict[str, set] = {}
    for q, m in zip(query, tags["movieId"]):
        tagged.setdefault(q, set()).add(int(m))
    all_movies = movies["movieId"]
    items, labels = [], []
    for q, m in zip(query, tags["movieId"]):
        negatives = []
        while len(negatives) < NEGATIVES:
            candidate = int(all_movies[rng.integers(len(all_movies))])
            if candidate not in tagged[q]:
                negatives.append(candidate)
        items.append([int(m), *negatives])
        labels.append([1] + [0] * NEGATIVES)
    per = NEGATIVES + 1
    search = {
        "domain": np.full(len(query) * per, SEARCH, dtype=object),
        "user_id": np.repeat(tags["userId"], per),
        "query_id": np.repeat(query, per),
        "item_id": np.array(items, dtype=np.int64).reshape(-1),
        "label": np.array(labels, dtype=np.int8).reshape(-1),
        "timestamp": np.repeat(tags["timestamp"], per),
    }

    impressions = {k: np.concatenate([rec[k], search[k]]) for k in rec}
    valid_cut, test_cut = np.quantile(impressions["timestamp"], [VALID_QUANTILE, TEST_QUANTILE])
    time = impressions["timestamp"]
    impressions["split"] = np.select([time >= test_cut, time >= valid_cut], ["test", "valid"], "train").astype(object)

    decade = [re.search(r"\((\d{3})\d\)\s*$", t) for t in movies["title"]]
    genres_text = [", ".join(g.split("|")) if g != "(no genres listed)" else "" for g in movies["genres"]]
    tables = {
        "domains": pa.table({"name": [*GROUPS, SEARCH], "task": ["rec"] * len(GROUPS) + ["search"]}),
        "impressions": pa.table({k: [None if x is None else str(x) for x in v] for k, v in impressions.items()}),
        "items": pa.table(
            {
                "item_id": [str(m) for m in movies["movieId"]],
                "text": [f"{t}. {g}".rstrip(". ") for t, g in zip(movies["title"], genres_text)],
                "item.genres": [g if g != "(no genres listed)" else None for g in movies["genres"]],
                "item.decade": [d.group(1) + "0s" if d else None for d in decade],
            }
        ),
        "queries": pa.table({"query_id": sorted(tagged), "text": sorted(tagged)}),
    }
    description = (
        f"MovieLens ml-latest-small from {src.absolute()}: rating >= 4 click, <= 2.5 non-click; "
        f"tags as queries with {NEGATIVES} sampled negatives (seed {seed}); "
        f"valid from the {VALID_QUANTILE} and test from the {TEST_QUANTILE} time quantile"
    )
    name = "movielens-small"
    if domains or exclude_domains:
        tables = keep_domains(tables, domains, exclude_domains)
        name += "".join(f"-{d}" for d in domains) + "".join(f"-no-{d}" for d in exclude_domains)
        description += f"; domains {tables['domains']['name'].to_pylist()} only"
    return from_arrow(
        tables,
        out,
        name,
        description,
        overwrite=overwrite,
        key_prefix=key_prefix,
        negatives_per_click={SEARCH: NEGATIVES},
    )
