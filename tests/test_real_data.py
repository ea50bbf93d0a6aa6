"""The converters of real public datasets, on small slices of the files in ../shared/data."""

import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from sr_jax.data import amazon, movielens
from sr_jax.data.store import DatasetError

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
MOVIELENS, AMAZON = SHARED / "movielens-latest-small", SHARED / "amazon-scientific"
needs_movielens = pytest.mark.skipif(
    not MOVIELENS.exists(), reason=f"{MOVIELENS} is absent: the real-data converters are tested where it exists"
)
needs_amazon = pytest.mark.skipif(
    not AMAZON.exists(), reason=f"{AMAZON} is absent: the real-data converters are tested where it exists"
)


def _slice(src: Path, dst: Path, rows: dict[str, int]) -> Path:
    """A copy of `src` with only the first rows (after the header) of some files."""
    dst.mkdir(parents=True)
    for file in src.iterdir():
        lines = file.read_text(encoding="utf-8").splitlines(keepends=True)
        (dst / file.name).write_text("".join(lines[: rows.get(file.name, len(lines) - 1) + 1]), encoding="utf-8")
    return dst


@needs_movielens
def test_movielens_domains_labels_search_and_cold_items(tmp_path):
    src = _slice(MOVIELENS, tmp_path / "src", {"ratings.csv": 3000, "tags.csv": 300})
    ds = movielens.convert(src, tmp_path / "out")
    meta = ds.meta
    assert [d.name for d in meta.domains] == [*movielens.GROUPS, movielens.SEARCH]
    assert set(meta.splits) == {"train", "valid", "test"} and meta.has_timestamp
    assert meta.negatives_per_click == {movielens.SEARCH: movielens.NEGATIVES}  # the ratings' non-clicks are real
    train, valid, test = ds.split("train"), ds.split("valid"), ds.split("test")
    times = [np.asarray(s["timestamp"]) for s in (train, valid, test)]
    assert times[0].max() < times[1].min() and times[1].max() < times[2].min()  # split by time, valid in between
    sizes = np.array([len(t) for t in times]) / sum(len(t) for t in times)
    assert sizes == pytest.approx([movielens.VALID_QUANTILE, movielens.TEST_QUANTILE - movielens.VALID_QUANTILE,
                                   1 - movielens.TEST_QUANTILE], abs=0.02)  # fmt: skip
    search = len(movielens.GROUPS)
    n_search = sum(int((np.asarray(s["domain"]) == search).sum()) for s in (train, valid, test))
    assert n_search == 300 * (1 + movielens.NEGATIVES)
    for split in (train, test):
        is_search = np.asarray(split["domain"]) == search
        assert np.all(np.asarray(split["query_id"])[is_search] > 0) and np.all(
            np.asarray(split["query_id"])[~is_search] == 0
        )
    # one click per tag application: the search click rate is exactly 1 / (1 + NEGATIVES)
    labels = np.concatenate([np.asarray(s["label"])[np.asarray(s["domain"]) == search] for s in (train, valid, test)])
    assert labels.mean() == pytest.approx(1 / (1 + movielens.NEGATIVES))
    # the rating rule: as many rec impressions as ratings >= 4 or <= 2.5 in the slice
    ratings = np.loadtxt(src / "ratings.csv", delimiter=",", skiprows=1, usecols=2)
    rec = sum(int((np.asarray(s["domain"]) < search).sum()) for s in (train, valid, test))
    assert rec == int(((ratings >= 4) | (ratings <= 2.5)).sum())
    # cold items: movies of test that train never shows
    cold = ~np.isin(np.asarray(test["item_id"]), np.asarray(train["item_id"]))
    assert cold.any()
    texts = ds.texts()
    assert any(t.startswith("Toy Story (1995). Adventure, Animation") for t in texts)


@needs_movielens
def test_movielens_bad_rows_are_named(tmp_path):
    src = _slice(MOVIELENS, tmp_path / "src", {"ratings.csv": 50, "tags.csv": 10})
    lines = (src / "ratings.csv").read_text().splitlines()
    lines[4] = "1,99999999,4.0,964982703"
    (src / "ratings.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(DatasetError, match=r"ratings.csv, field 'movieId', row 3: movie 99999999 is not in movies.csv"):
        movielens.convert(src, tmp_path / "out")
    lines[4] = "1,1,great,964982703"
    (src / "ratings.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(DatasetError, match=r"ratings.csv, field 'rating', row 3: 'great' is not a float"):
        movielens.convert(src, tmp_path / "out")
    shutil.rmtree(src)
    with pytest.raises(DatasetError, match=r"movies.csv: missing"):
        movielens.convert(src, tmp_path / "out")


@needs_amazon
def test_amazon_domains_queries_negatives_and_splits(tmp_path):
    rows = {f"Scientific.{split}.inter": 200 for split in amazon.SPLITS}
    src = _slice(AMAZON, tmp_path / "src", rows)
    ds = amazon.convert(src, tmp_path / "out")
    assert [d.name for d in ds.meta.domains] == ["rec_scientific", "search_scientific"]
    assert ds.meta.splits == {split: 200 * (1 + amazon.NEGATIVES) for split in amazon.SPLITS}
    assert ds.meta.negatives_per_click == {"rec_scientific": amazon.NEGATIVES, "search_scientific": amazon.NEGATIVES}
    texts = ds.texts()
    for split in amazon.SPLITS:
        cols = {k: np.asarray(v) for k, v in ds.split(split).items()}
        assert cols["label"].mean() == pytest.approx(1 / (1 + amazon.NEGATIVES))
        search = cols["domain"] == 1
        assert 0.15 < search.mean() < 0.45  # SEARCH_SHARE of the positives, with their negatives
        assert np.all(cols["query_id"][search] > 0) and np.all(cols["query_id"][~search] == 0)
        # a search click's item text holds every word of its category query
        clicks = search & (cols["label"] == 1)
        for q, i in zip(cols["query_text"][clicks][:20], cols["item_text"][clicks][:20]):
            item_words = set(re.findall(r"[a-z0-9]+", texts[i].lower()))
            assert set(texts[q].split()) <= item_words
    root = amazon.ROOTS["Scientific"]
    assert amazon.category_query("Vise. Industrial & Scientific Power & Hand Tools Bench Vises. Shop Fox. ", root) == (
        "power hand tools bench vises"
    )
    assert amazon.category_query("no path here", root) is None
    # timestamps order a user's rows: the target's position in its sequence
    train = ds.split("train")
    assert ds.meta.has_timestamp and np.all(np.asarray(train["timestamp"]) >= 0)


@needs_amazon
def test_amazon_any_category_folder_and_a_sub_category_tree_apart(tmp_path):
    """File names come from the folder (here `Lab.*`, whose root needs --root); --categories keeps one top-level
    category's items, whose negatives come from it too, and --exclude-categories the rest."""
    src = tmp_path / "src"
    _slice(AMAZON, src, {f"Scientific.{split}.inter": 2000 for split in amazon.SPLITS})
    for file in list(src.iterdir()):
        file.rename(src / file.name.replace("Scientific.", "Lab."))
    with pytest.raises(DatasetError, match=r"no known category root for 'Lab': pass --root"):
        amazon.convert(src, tmp_path / "x")
    root = amazon.ROOTS["Scientific"]
    apart = amazon.convert(src, tmp_path / "lab", root=root, categories=("lab",))
    rest = amazon.convert(src, tmp_path / "rest", root=root, exclude_categories=("lab",))
    assert [d.name for d in apart.meta.domains] == ["rec_lab", "search_lab"]
    texts = apart.texts()
    for split in apart.meta.splits:
        item_text = np.asarray(apart.split(split)["item_text"])
        assert all((amazon.category_query(texts[t], root) or "").startswith("lab ") for t in item_text)
    lab_items, rest_items = set(apart.keys()["item_id"]), set(rest.keys()["item_id"])
    assert lab_items and rest_items and not lab_items & rest_items
    assert set(apart.keys()["user_id"]) & set(rest.keys()["user_id"])  # partly shared users
    with pytest.raises(ValueError, match=r"unknown top-level categories \['labs'\]"):
        amazon.convert(src, tmp_path / "y", root=root, categories=("labs",))
    # other categories and other users: nothing shared but texts and field values
    new = amazon.convert(src, tmp_path / "new", root=root, categories=("lab",), users="1/2")
    old = amazon.convert(src, tmp_path / "old", root=root, exclude_categories=("lab",), users="0/2")
    assert not set(new.keys()["user_id"]) & set(old.keys()["user_id"])
    assert not set(new.keys()["item_id"]) & set(old.keys()["item_id"])
    assert all(int(u) % 2 == 1 for u in new.keys()["user_id"]) and new.meta.splits["train"] > 0
    with pytest.raises(ValueError, match=r"--users '2/2': expected K/N"):
        amazon.convert(src, tmp_path / "z", root=root, users="2/2")


@needs_amazon
def test_amazon_bad_rows_are_named(tmp_path):
    src = _slice(AMAZON, tmp_path / "src", {f"Scientific.{split}.inter": 20 for split in amazon.SPLITS})
    lines = (src / "Scientific.valid.inter").read_text().splitlines()
    lines[3] = lines[3].replace("\t", " ", 1)
    (src / "Scientific.valid.inter").write_text("\n".join(lines) + "\n")
    with pytest.raises(DatasetError, match=r"Scientific.valid.inter, row 2: 2 tab-separated fields, expected 3"):
        amazon.convert(src, tmp_path / "out")
