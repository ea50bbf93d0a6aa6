"""Negative sampling for implicit feedback: most public interaction data holds positives only.

Each positive gets `per_positive` non-clicks that share its domain, user, query, split and timestamp.
Candidates are drawn with a seeded generator, uniformly or in proportion to item popularity (positives
per item), among the positive's `group` (e.g. the items of a top-level category, so that a
search's negatives look like its results), and are never an item the user ever clicked, nor one clicked
for the same query: a "negative" that is really a positive would teach the opposite of the truth.
Vectorised over all positives (rejection rounds), so a few million positives take seconds.
"""

from __future__ import annotations

import numpy as np

SAMPLERS = ("uniform", "popularity")
MAX_ROUNDS = 200


def _codes(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(distinct keys, the code of each key)."""
    distinct, codes = np.unique(keys.astype(str), return_inverse=True)
    return distinct, codes.astype(np.int64)


def sample(
    users: np.ndarray,
    items: np.ndarray,
    queries: np.ndarray | None,
    per_positive: int,
    seed: int,
    sampler: str = "uniform",
    pool: np.ndarray | None = None,
    group_of: dict[str, str] | None = None,
    matches: dict[str, list[str]] | None = None,
    clicks: tuple[np.ndarray, np.ndarray] | None = None,
) -> np.ndarray:
    """[P, per_positive] item keys: the negatives of positive p = (users[p], items[p], queries[p] or None).

    `pool`: the candidate item keys (default: the positives' items); `group_of`: item key -> group, a
    positive's negatives come from its item's group (the whole pool when the item has no group, or when
    its group is too small); `matches`: query -> items that answer it (never its negatives, beside the
    items clicked for it); `clicks`: (users, items) of every positive of the data (default: these), the
    items never drawn for a user."""
    if sampler not in SAMPLERS:
        raise ValueError(f"negative sampler {sampler!r}: expected one of {SAMPLERS}")
    if per_positive < 1:
        raise ValueError(f"negatives per positive: {per_positive}, expected >= 1")
    items = np.asarray(items).astype(str)
    click_users, click_items = (users, items) if clicks is None else (clicks[0], np.asarray(clicks[1]).astype(str))
    pool = np.unique(items) if pool is None else np.unique(np.asarray(pool).astype(str))
    catalogue, codes = _codes(np.concatenate([pool, items, click_items]))
    pool_codes = codes[: len(pool)]
    item_codes = codes[len(pool) : len(pool) + len(items)]
    click_codes = codes[len(pool) + len(items) :]
    n_items = len(catalogue)
    _, user_all = _codes(np.concatenate([np.asarray(users).astype(str), np.asarray(click_users).astype(str)]))
    user_codes, click_user_codes = user_all[: len(items)], user_all[len(items) :]
    clicked = np.unique(click_user_codes * n_items + click_codes)  # (user, item) pairs never to sample
    query_codes = query_pairs = None
    if queries is not None:
        has_query = np.array([q is not None and str(q) != "" for q in queries])
        query_names, query_codes = _codes(np.where(has_query, queries, "").astype(str))
        query_codes = np.where(has_query, query_codes, -1)
        pairs = [(query_codes * n_items + item_codes)[has_query]]
        position = {k: i for i, k in enumerate(catalogue)}
        for q, answers in (matches or {}).items():
            code = np.searchsorted(query_names, q)
            if code < len(query_names) and query_names[code] == q:
                pairs.append(np.array([code * n_items + position[a] for a in answers if a in position], np.int64))
        query_pairs = np.unique(np.concatenate(pairs))

    popularity = np.bincount(click_codes, minlength=n_items)[pool_codes].astype(np.float64)
    weights = np.ones(len(pool)) if sampler == "uniform" else popularity + 1.0  # +1: never-clicked items too
    groups = np.array([(group_of or {}).get(k, "") for k in pool], dtype=object)
    item_group = np.array([(group_of or {}).get(k, "") for k in items], dtype=object)

    rng = np.random.default_rng([seed, 0x4E6])
    out = np.full((len(items), per_positive), -1, np.int64)
    for group in np.unique(item_group):
        rows = np.flatnonzero(item_group == group)
        members = np.flatnonzero(groups == group) if group else np.arange(len(pool))
        if len(members) < 2 * per_positive + 1:
            members = np.arange(len(pool))  # a group too small to draw from: the whole pool
        _fill(out, rows, members, pool_codes, weights, clicked, query_pairs, user_codes, query_codes, n_items, rng)
    return catalogue[out]


def _fill(out, rows, members, pool_codes, weights, clicked, query_pairs, user_codes, query_codes, n, rng):
    """Fills out[rows] slot by slot, in rejection rounds: draw for every empty slot, keep the candidates that are
    allowed (not clicked by the user, not clicked for the query, not already a negative of that positive)."""
    p = weights[members] / weights[members].sum()
    for slot in range(out.shape[1]):
        for _ in range(MAX_ROUNDS):
            positive = rows[out[rows, slot] < 0]
            if not len(positive):
                break
            candidate = pool_codes[members[rng.choice(len(members), size=len(positive), p=p)]]
            ok = ~np.isin(user_codes[positive] * n + candidate, clicked)
            if query_codes is not None:
                q = query_codes[positive]
                ok &= (q < 0) | ~np.isin(q * n + candidate, query_pairs)
            ok &= ~(out[positive, :slot] == candidate[:, None]).any(1)
            out[positive[ok], slot] = candidate[ok]
        else:
            missing = int((out[rows, slot] < 0).sum())
            raise ValueError(
                f"negative sampling: {missing} positives found too few allowed items after {MAX_ROUNDS} rounds "
                "(users who clicked nearly every item of their pool); lower the negatives per positive"
            )


def expand(columns: dict[str, np.ndarray], negatives: np.ndarray) -> dict[str, np.ndarray]:
    """Positives' columns (every row a positive) -> each positive followed by its negatives: the item column
    from `negatives` [P, N], label 1 then N zeros, every other column repeated."""
    per = negatives.shape[1] + 1
    out = {k: np.repeat(np.asarray(v), per) for k, v in columns.items() if k not in ("item_id", "label")}
    out["item_id"] = np.concatenate([np.asarray(columns["item_id"]).astype(str)[:, None], negatives], 1).reshape(-1)
    out["label"] = np.tile(np.array(["1"] + ["0"] * (per - 1), dtype=object), len(negatives))
    return out
