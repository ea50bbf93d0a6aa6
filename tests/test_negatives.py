"""Negative sampling for implicit feedback (seeded, never a positive), the importer's unlabelled tables, and
text caches that reuse another dataset's vectors by text content."""

import logging
import numpy as np
import pytest

from sr_jax.data import negatives
from sr_jax.data.importer import import_tables
from sr_jax.data.store import DatasetError
from sr_jax.text import HashedBagOfWords, build_text_cache


def _clicks(seed=0, n=300, users=20, items=60):
    rng = np.random.default_rng(seed)
    popular = rng.random(items) ** 3  # a skewed catalogue
    item = rng.choice(items, n, p=popular / popular.sum())
    return (
        np.array([f"u{u}" for u in rng.integers(users, size=n)], dtype=object),
        np.array([f"i{i}" for i in item], dtype=object),
    )


def test_negatives_exclude_positives_and_are_seeded():
    users, items = _clicks()
    queries = np.array([None if k % 2 else f"q{k % 6}" for k in range(len(items))], dtype=object)
    pool = np.array([f"i{i}" for i in range(60)], dtype=object)
    drawn = negatives.sample(users, items, queries, 4, seed=3, pool=pool)
    assert drawn.shape == (len(items), 4)
    clicked = set(zip(users, items))
    answered = {(q, i) for q, i in zip(queries, items) if q is not None}
    for p in range(len(items)):
        assert len(set(drawn[p])) == 4  # no item twice
        for item in drawn[p]:
            assert (users[p], item) not in clicked
            assert (queries[p], item) not in answered
    np.testing.assert_array_equal(drawn, negatives.sample(users, items, queries, 4, seed=3, pool=pool))
    assert not np.array_equal(drawn, negatives.sample(users, items, queries, 4, seed=4, pool=pool))


def test_popularity_sampling_follows_the_clicks_and_groups_hold():
    users, items = _clicks(n=2000, users=400)
    count = {i: int((items == i).sum()) for i in set(items)}
    top = max(count, key=count.get)
    uniform = negatives.sample(users, items, None, 2, 0, "uniform")
    popular = negatives.sample(users, items, None, 2, 0, "popularity")
    assert (popular == top).sum() > 2 * (uniform == top).sum()
    group_of = {f"i{i}": "even" if i % 2 == 0 else "odd" for i in range(60)}
    grouped = negatives.sample(users, items, None, 2, 0, group_of=group_of)
    assert all(group_of[n] == group_of[i] for i, row in zip(items, grouped) for n in row)
    with pytest.raises(ValueError, match="negative sampler 'zipf'"):
        negatives.sample(users, items, None, 2, 0, "zipf")


def test_unlabelled_impressions_get_sampled_negatives(tmp_path):
    from test_importer import DOMAINS, _write

    rng = np.random.default_rng(0)
    clicks = ["split,domain,user_id,item_id,timestamp"] + [
        f"{'train' if k % 5 else 'test'},feed,u{rng.integers(6)},i{rng.integers(40)},{k}" for k in range(30)
    ]
    src = _write(tmp_path / "src", domains=DOMAINS, impressions="\n".join(clicks) + "\n")
    with pytest.raises(DatasetError, match=r"impressions.csv, field 'label': missing column.*--negatives"):
        import_tables(src, tmp_path / "out")
    ds = import_tables(src, tmp_path / "out", negatives=2, seed=1)
    train = ds.split("train")
    labels = np.asarray(train["label"])
    assert sum(ds.meta.splits.values()) == 3 * 30 and labels.reshape(-1, 3).tolist() == [[1, 0, 0]] * (len(labels) // 3)
    assert ds.meta.negatives_per_click == {d.name: 2 for d in ds.meta.domains}  # what a calibration can undo
    items, users = np.asarray(train["item_id"]).reshape(-1, 3), np.asarray(train["user_id"]).reshape(-1, 3)
    assert (users == users[:, :1]).all()  # a negative shares its positive's user (and domain, time)
    keys = ds.keys()
    clicked = {(keys["user_id"][u - 1], keys["item_id"][i - 1]) for u, i in zip(users[:, 0], items[:, 0])}
    assert not any(
        (keys["user_id"][u - 1], keys["item_id"][i - 1]) in clicked
        for u, i in zip(users[:, 1:].ravel(), items[:, 1:].ravel())
    )
    again = import_tables(src, tmp_path / "again", negatives=2, seed=1)
    np.testing.assert_array_equal(again.split("train")["item_id"], train["item_id"])


class CountingBagOfWords(HashedBagOfWords):
    def __init__(self):
        super().__init__()
        self.seen = []

    def featurize(self, texts):
        self.seen += texts
        return super().featurize(texts)


def test_text_caches_reuse_known_texts_by_content(tmp_path, caplog):
    from test_importer import ITEMS, _source

    caplog.set_level(logging.INFO)
    first = import_tables(_source(tmp_path / "a"), tmp_path / "a/out")
    build_text_cache(first.root, HashedBagOfWords(), progress=False)
    more = ITEMS + "E1,green tea pot,nova,home\n"
    second = import_tables(_source(tmp_path / "b", items=more), tmp_path / "b/out")
    counting = CountingBagOfWords()
    build_text_cache(second.root, counting, progress=False, reuse=[first.root])
    assert counting.seen == ["green tea pot"]  # only the text the first dataset lacks is encoded
    assert "4 of 5 texts reused" in caplog.text and "1 to encode" in caplog.text
    caplog.clear()  # a reuse that finds nothing says so too
    other = HashedBagOfWords(seed=3)
    build_text_cache(tmp_path / "a/out", other, progress=False, reuse=[second.root])
    assert "no hashed-bow cache of this fingerprint" in caplog.text and "0 of" in caplog.text
    fresh = tmp_path / "c"
    import_tables(_source(tmp_path / "c", items=more), fresh / "out")
    build_text_cache(fresh / "out", HashedBagOfWords(), progress=False)
    from sr_jax.data.store import open_dataset

    reused = open_dataset(second.root).text_cache("hashed-bow")[0]
    np.testing.assert_array_equal(reused, open_dataset(fresh / "out").text_cache("hashed-bow")[0])
