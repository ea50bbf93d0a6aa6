"""The embedded dataset: multi-domain search and recommendation impressions from a known click model.

Items belong to one of 12 fine topics (grouped into 4 coarse categories) and one of 4 styles; both are
named in the item's English text ("Voltaro compact espresso grinder"), while the item's sparse fields
carry only the coarse category, the brand and a price tier, and its dense field `rating` (a 1-5 star average,
missing for a fifth of the items) a noisy reading of its quality. Users prefer two topics and a style;
queries name a topic and often a style. The click probability of an impression in domain k is

    p = sigmoid(b_k + alpha_k <u, v> + beta_k <q, v> + gamma_k quality(v) - delta_k price(v) + r_k[region])

with u, q, v latent vectors of user, query (zero in recommendation domains) and item. The domains
differ in catalogue (which topics they sell), base rate b_k, and how much personalisation (alpha) vs
query relevance (beta) matters: that is the domain shift. A fraction of items are "cold": they never
appear in train or valid examples, only in test, where only text, sparse and dense fields describe them: the
rating is what tells a new item's quality beyond its brand's, so its effect on clicks is gamma_k x (the
quality it reads).

The two cold-start protocols (docs/DESIGN.md) get their own splits: `cold_train` / `cold_test` hold
impressions of cold items in the known domains (the first traffic of new items), and the last domain
is held out of pretraining (`heldout_train` / `heldout_test`).

Labels are Bernoulli draws of p, so the AUC of p itself on a split (the oracle AUC, stored in the
metadata) is the ceiling any model can reach there.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

import numpy as np

from sr_jax import metrics
from sr_jax.config import ConfigError, SyntheticConfig, validate_synthetic
from sr_jax.data.schema import DatasetMeta, DenseField, Domain, SparseField, numbered_keys
from sr_jax.data.store import Dataset, open_dataset, write_dataset

# Fine topics, three per coarse category, each with nouns a shopper would type.
TOPICS = {
    "coffee": ["espresso", "grinder", "beans", "kettle", "mug", "brewer", "filter", "latte"],
    "cooking": ["skillet", "wok", "knife", "saucepan", "spatula", "stockpot", "ladle", "oven"],
    "gardening": ["seeds", "soil", "shovel", "hose", "planter", "compost", "fertilizer", "greenhouse"],
    "running": ["sneakers", "shoes", "trainers", "marathon", "jogging", "socks", "insoles", "sprint"],
    "fitness": ["dumbbell", "kettlebell", "barbell", "yoga", "pilates", "protein", "weights", "gym"],
    "travel": ["suitcase", "backpack", "passport", "luggage", "duffel", "adapter", "pillow", "hotel"],
    "camera": ["camera", "lens", "tripod", "shutter", "zoom", "flash", "sensor", "telephoto"],
    "gaming": ["console", "controller", "headset", "joystick", "gamepad", "arcade", "esports", "keyboard"],
    "music": ["guitar", "piano", "drums", "violin", "ukulele", "amplifier", "microphone", "vinyl"],
    "books": ["novel", "paperback", "thriller", "biography", "poetry", "hardcover", "mystery", "memoir"],
    "baby": ["stroller", "diaper", "crib", "pacifier", "onesie", "rattle", "bib", "nursery"],
    "pets": ["dog", "cat", "leash", "collar", "kibble", "aquarium", "litter", "hamster"],
}
CATEGORIES = ["home and kitchen", "sports and outdoors", "electronics and music", "family and books"]
STYLES = {
    "budget": ["cheap", "affordable", "budget", "value"],
    "premium": ["premium", "luxury", "deluxe", "designer"],
    "compact": ["compact", "portable", "mini", "travel size"],
    "professional": ["professional", "pro", "heavy duty", "studio grade"],
}
SYLLABLES = ["vol", "ta", "ro", "zen", "ka", "mi", "lux", "or", "vin", "sa", "tek", "no", "ar", "bel"]
RATING = DenseField("rating", "item")
SPLITS = ("train", "valid", "test", "heldout_train", "heldout_test", "cold_train", "cold_test")
GENERATOR_VERSION = 6  # bump whenever the generated data would change: it keys the cache
NUM_BRANDS = 24
NUM_REGIONS = 6
LATENT = 12
RATING_NOISE, RATING_MISSING = 0.25, 0.2  # the rating: 3.5 + 0.8 (quality + noise), clipped to [1, 5]; missing share

# name, task, catalogue topics (indices into TOPICS), base rate, alpha, beta, gamma, delta, traffic share
DOMAINS = [
    ("search_shop", "search", range(12), -1.2, 0.6, 1.6, 0.5, 0.4, 0.22),
    ("search_kitchen", "search", [0, 1, 2, 10], -0.8, 0.4, 2.0, 0.3, 0.2, 0.12),
    ("search_sports", "search", [3, 4, 5, 6], -1.5, 0.8, 1.4, 0.6, 0.6, 0.12),
    ("search_media", "search", [6, 7, 8, 9], -1.0, 0.5, 1.8, 0.4, 0.3, 0.12),
    ("rec_home_feed", "rec", range(12), -1.8, 1.6, 0.0, 0.6, 0.3, 0.20),
    ("rec_deals", "rec", [0, 1, 4, 5, 10, 11], -1.3, 1.0, 0.0, 0.3, 1.2, 0.11),
    ("rec_creators", "rec", [7, 8, 9, 11], -2.0, 2.0, 0.0, 0.8, 0.1, 0.11),
    ("search_new_service", "search", [2, 3, 9, 10, 11], -1.1, 0.7, 1.7, 0.5, 0.5, 0.0),  # held out
]


def _unit(rng: np.random.Generator, n: int) -> np.ndarray:
    v = rng.standard_normal((n, LATENT))
    return v / np.linalg.norm(v, axis=1, keepdims=True)


@dataclasses.dataclass
class _World:
    """Latent entities of the click model (everything the labels are drawn from)."""

    topic_vec: np.ndarray  # [T, LATENT]
    style_vec: np.ndarray  # [S, LATENT]
    item_topic: np.ndarray
    item_style: np.ndarray
    item_brand: np.ndarray
    item_price: np.ndarray  # 0..4
    item_quality: np.ndarray
    item_vec: np.ndarray  # [I, LATENT]
    item_cold: np.ndarray  # bool
    user_topics: np.ndarray  # [U, 2]
    user_style: np.ndarray
    user_region: np.ndarray
    user_vec: np.ndarray
    query_topic: np.ndarray
    query_style: np.ndarray  # -1: no style word
    query_vec: np.ndarray
    region_effect: np.ndarray  # [K, NUM_REGIONS]


def _make_world(cfg: SyntheticConfig, rng: np.random.Generator) -> _World:
    n_topics, n_styles = len(TOPICS), len(STYLES)
    topic_vec, style_vec = _unit(rng, n_topics), _unit(rng, n_styles)
    brand_quality = rng.normal(0, 0.8, NUM_BRANDS)
    # items (row 0 is the "missing" id and never used)
    n_i = cfg.num_items
    item_topic = rng.permutation(np.arange(n_i) % n_topics)  # balanced: every topic has items
    item_style = rng.integers(0, n_styles, n_i)
    item_brand = (item_topic // 3) * (NUM_BRANDS // 4) + rng.integers(0, NUM_BRANDS // 4, n_i)
    item_price = np.clip(rng.integers(0, 5, n_i) + (item_style == 1) - (item_style == 0), 0, 4)  # premium +1, budget -1
    item_quality = brand_quality[item_brand] + rng.normal(0, 0.6, n_i)
    item_vec = topic_vec[item_topic] + 0.6 * style_vec[item_style] + 0.35 * _unit(rng, n_i)
    item_cold = rng.random(n_i) < cfg.cold_item_fraction
    item_cold[0] = False
    for t in range(n_topics):  # every topic has a cold item (when there are any), so cold splits are all cold
        if cfg.cold_item_fraction > 0 and not np.any(item_cold[1:] & (item_topic[1:] == t)):
            item_cold[1 + np.flatnonzero(item_topic[1:] == t)[-1]] = True
    for t in range(n_topics):  # and keeps a warm item to show in training
        if not np.any(~item_cold[1:] & (item_topic[1:] == t)):
            item_cold[1 + np.flatnonzero(item_topic[1:] == t)[0]] = False
    # users
    n_u = cfg.num_users
    user_topics = np.stack([rng.integers(0, n_topics, n_u), rng.integers(0, n_topics, n_u)], 1)
    user_style = rng.integers(0, n_styles, n_u)
    user_vec = (
        0.9 * topic_vec[user_topics[:, 0]]
        + 0.5 * topic_vec[user_topics[:, 1]]
        + 0.5 * style_vec[user_style]
        + 0.3 * _unit(rng, n_u)
    )
    # queries: a topic, and a style word for 70% of them
    n_q = cfg.num_queries
    query_topic = rng.permutation(np.arange(n_q) % n_topics)
    query_style = np.where(rng.random(n_q) < 0.7, rng.integers(0, n_styles, n_q), -1)
    query_vec = topic_vec[query_topic] + np.where(query_style[:, None] >= 0, 0.7 * style_vec[query_style], 0.0)
    region_effect = rng.normal(0, 0.3, (len(DOMAINS), NUM_REGIONS))
    return _World(
        topic_vec,
        style_vec,
        item_topic,
        item_style,
        item_brand,
        item_price,
        item_quality,
        item_vec,
        item_cold,
        user_topics,
        user_style,
        rng.integers(0, NUM_REGIONS, n_u),
        user_vec,
        query_topic,
        query_style,
        query_vec,
        region_effect,
    )


def item_ratings(world: _World, seed: int) -> np.ndarray:
    """[I] an item's average star rating, a noisy reading of its quality (NaN for missing ones): drawn from a
    generator of its own, so that adding it changed no other column or label of the data."""
    rng = np.random.default_rng([seed, 31])
    n = len(world.item_quality)
    rating = np.clip(3.5 + 0.8 * (world.item_quality + rng.normal(0, RATING_NOISE, n)), 1.0, 5.0)
    return np.where(rng.random(n) < RATING_MISSING, np.nan, rating)


def _texts(world: _World, rng: np.random.Generator) -> tuple[list[str], np.ndarray, np.ndarray]:
    """The text table: one text per item, then one per query. Returns (texts, item row, query row)."""
    topics, styles = list(TOPICS.values()), list(STYLES.values())
    brands = [
        (SYLLABLES[i % 14] + SYLLABLES[(i * 5 + 3) % 14] + SYLLABLES[(i * 3 + 7) % 14]).capitalize()
        for i in range(NUM_BRANDS)
    ]
    texts = []
    for t, s, b in zip(world.item_topic, world.item_style, world.item_brand):
        nouns = rng.choice(topics[t], 2, replace=False)
        texts.append(f"{brands[b]} {rng.choice(styles[s])} {nouns[0]} {nouns[1]}")
    item_row = np.arange(len(texts), dtype=np.int32)
    for t, s in zip(world.query_topic, world.query_style):
        nouns = rng.choice(topics[t], 2, replace=False)
        words = (
            ([str(rng.choice(styles[s]))] if s >= 0 else []) + [nouns[0]] + ([nouns[1]] if rng.random() < 0.5 else [])
        )
        texts.append(" ".join(words))
    query_row = np.arange(len(item_row), len(texts), dtype=np.int32)
    item_row[0] = query_row[0] = -1  # id 0 is "missing": it has no text
    return texts, item_row, query_row


def _sample_each(rng: np.random.Generator, pools: list[np.ndarray], which: np.ndarray) -> np.ndarray:
    """For every entry of `which`, a uniform draw from pools[which]."""
    out = np.zeros(len(which), np.int64)
    for p, pool in enumerate(pools):
        mask = which == p
        if mask.any():
            out[mask] = pool[rng.integers(0, len(pool), mask.sum())]
    return out


def _impressions(
    world: _World,
    cfg: SyntheticConfig,
    rng: np.random.Generator,
    n: int,
    domains: list[int],
    shares: np.ndarray,
    cold_share: float,
) -> dict[str, np.ndarray]:
    """Samples n impressions of the given domains and their true click probabilities."""
    n_topics = len(TOPICS)
    domain = rng.choice(domains, n, p=shares / shares.sum()).astype(np.int32)
    user = rng.integers(1, cfg.num_users, n)
    is_search = np.array([DOMAINS[k][1] == "search" for k in range(len(DOMAINS))])[domain]
    catalogue = np.zeros((len(DOMAINS), n_topics), bool)
    for k, d in enumerate(DOMAINS):
        catalogue[k, list(d[2])] = True
    # the topic the impression is about: the user's (70%) or a random one, kept inside the catalogue
    wanted = np.where(rng.random(n) < 0.7, world.user_topics[user, rng.integers(0, 2, n)], rng.integers(0, n_topics, n))
    random_topic = _sample_each(rng, [np.flatnonzero(c) for c in catalogue], domain)
    topic = np.where(catalogue[domain, wanted], wanted, random_topic)
    # query: one of that topic's queries (search domains only)
    query = _sample_each(rng, [np.flatnonzero(world.query_topic[1:] == t) + 1 for t in range(n_topics)], topic)
    query = np.where(is_search, query, 0)
    # item: 60% on the topic, else anywhere in the catalogue; cold items only with probability cold_share
    item_topic = np.where(rng.random(n) < 0.6, topic, _sample_each(rng, [np.flatnonzero(c) for c in catalogue], domain))
    real = np.arange(len(world.item_cold)) > 0
    pools = [
        np.flatnonzero(real & (world.item_cold == c) & (world.item_topic == t))
        for c in (False, True)
        for t in range(n_topics)
    ]
    want_cold = (rng.random(n) < cold_share) & np.array([len(pools[n_topics + t]) > 0 for t in range(n_topics)])[
        item_topic
    ]
    item = _sample_each(rng, pools, want_cold * n_topics + item_topic)
    params = np.array([d[3:8] for d in DOMAINS])[domain]  # b, alpha, beta, gamma, delta
    v = world.item_vec[item]
    logit = (
        params[:, 0]
        + params[:, 1] * np.sum(world.user_vec[user] * v, 1)
        + params[:, 2] * np.sum(world.query_vec[query] * v, 1) * is_search
        + params[:, 3] * world.item_quality[item]
        - params[:, 4] * world.item_price[item] / 4
        + world.region_effect[domain, world.user_region[user]]
    )
    prob = 1.0 / (1.0 + np.exp(-logit))
    return {
        "domain": domain,
        "user": user,
        "query": query,
        "item": item,
        "prob": prob,
        "label": (rng.random(n) < prob).astype(np.int8),
    }


def _columns(
    imp: dict[str, np.ndarray],
    world: _World,
    item_row: np.ndarray,
    query_row: np.ndarray,
    interests: np.ndarray,
    rating: np.ndarray,
) -> dict[str, np.ndarray]:
    """A split's columns; the dense rating raw (`generate` standardises it with the train split's statistics)."""
    u, q, i = imp["user"], imp["query"], imp["item"]
    i32 = lambda a: np.ascontiguousarray(a, dtype=np.int32)  # noqa: E731
    return {
        "domain": i32(imp["domain"]),
        "user_id": i32(u),
        "query_id": i32(q),
        "item_id": i32(i),
        "query_text": i32(query_row[q]),
        "item_text": i32(item_row[i]),
        "user.region": i32(world.user_region[u] + 1),
        "user.interests": i32(interests[u]),
        "item.category": i32(world.item_topic[i] // 3 + 1),
        "item.brand": i32(world.item_brand[i] + 1),
        "item.price": i32(world.item_price[i] + 1),
        RATING.column: rating[i],
        "label": imp["label"],
    }


def generate(cfg: SyntheticConfig, root: str | Path, overwrite: bool = False) -> Dataset:
    """Generates the dataset into `root` (atomically) and returns it opened."""
    if problems := validate_synthetic(cfg):
        raise ConfigError("invalid synthetic dataset config:\n  " + "\n  ".join(problems))
    rng = np.random.default_rng(cfg.seed)
    world = _make_world(cfg, rng)
    texts, item_row, query_row = _texts(world, rng)
    # user.interests: the user's two topics and, half the time, a third; 0 pads (multi-valued field)
    extra = np.where(rng.random(cfg.num_users) < 0.5, rng.integers(0, len(TOPICS), cfg.num_users) + 1, 0)
    interests = np.concatenate([world.user_topics + 1, extra[:, None]], 1)
    rating = item_ratings(world, cfg.seed)

    pretrain = [k for k, d in enumerate(DOMAINS) if d[8] > 0]
    heldout = [k for k, d in enumerate(DOMAINS) if d[8] == 0]
    shares = np.array([d[8] for d in DOMAINS])
    n_ho, n_cold = cfg.heldout_examples // 2, cfg.cold_examples // 2
    specs = {
        "train": (cfg.train_examples, pretrain, shares, 0.0),
        "valid": (cfg.valid_examples, pretrain, shares, 0.0),
        "test": (cfg.test_examples, pretrain, shares, 0.25),
        "heldout_train": (n_ho, heldout, np.ones(len(DOMAINS)), 0.0),
        "heldout_test": (n_ho, heldout, np.ones(len(DOMAINS)), 0.25),
        "cold_train": (n_cold, pretrain, shares, 1.0),
        "cold_test": (n_cold, pretrain, shares, 1.0),
    }
    assert tuple(specs) == SPLITS
    splits, oracle = {}, {}
    for name, (n, domains, sh, cold_share) in specs.items():
        imp = _impressions(world, cfg, rng, n, domains, sh[domains], cold_share)
        splits[name] = _columns(imp, world, item_row, query_row, interests, rating)
        if name.endswith("test"):
            oracle[name] = oracle_aucs(imp, world.item_cold[imp["item"]])

    rated = RATING.fitted(splits["train"][RATING.column])
    for columns in splits.values():
        columns[RATING.column] = rated.standardise(columns[RATING.column])
    meta = DatasetMeta(
        name="synthetic",
        domains=[Domain(d[0], d[1], pretrain=d[8] > 0) for d in DOMAINS],
        vocab={"user_id": cfg.num_users, "query_id": cfg.num_queries, "item_id": cfg.num_items},
        sparse_fields=[
            SparseField("region", "user", NUM_REGIONS + 1),
            SparseField("interests", "user", len(TOPICS) + 1, max_len=3),
            SparseField("category", "item", len(CATEGORIES) + 1),
            SparseField("brand", "item", NUM_BRANDS + 1),
            SparseField("price", "item", 6),
        ],
        dense_fields=[rated],
        splits={},
        num_texts=0,
        oracle_auc=oracle,
        description=f"sr-jax synthetic multi-domain S&R data, generator v{GENERATOR_VERSION}, "
        f"{json.dumps(dataclasses.asdict(cfg))}",
    )
    return write_dataset(root, meta, texts, splits, numbered_keys(meta), overwrite=overwrite)


def oracle_aucs(imp: dict[str, np.ndarray], is_cold: np.ndarray) -> dict[str, float]:
    """AUC of the true probabilities: per domain (by name), overall, and on cold-item impressions."""
    out = {
        DOMAINS[k][0]: metrics.auc(imp["label"][imp["domain"] == k], imp["prob"][imp["domain"] == k])
        for k in np.unique(imp["domain"])
    }
    out["overall"] = metrics.auc(imp["label"], imp["prob"])
    if is_cold.any():
        out["cold_items"] = metrics.auc(imp["label"][is_cold], imp["prob"][is_cold])
    return out


def default_root(cfg: SyntheticConfig) -> Path:
    """Where the dataset for `cfg` is cached: `$SR_JAX_DATA` or `~/.cache/sr_jax`, keyed by the config
    and the generator version."""
    spec = {"generator": GENERATOR_VERSION, **dataclasses.asdict(cfg)}
    key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]
    base = Path(os.environ.get("SR_JAX_DATA", Path.home() / ".cache" / "sr_jax"))
    return base / f"synthetic-{key}"


def ensure(cfg: SyntheticConfig) -> Dataset:
    """The cached synthetic dataset for `cfg`, generated on first use (text caches are the caller's: the
    data layer does not depend on the text encoders)."""
    root = default_root(cfg)
    if not (root / "meta.json").exists():
        generate(cfg, root)
    return open_dataset(root)
