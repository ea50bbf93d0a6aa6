"""Importing a user's own CSV / Parquet tables into the store: ids, texts, sparse fields, errors, training."""

import numpy as np
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
import pytest

from helpers import config
from sr_jax.data.importer import import_tables
from sr_jax.data.store import DatasetError, open_dataset
from sr_jax.text import build_text_cache, get_featurizer
from sr_jax.training import trainer

DOMAINS = "name,task,pretrain\nshop,search,true\nfeed,rec,true\nnew,search,false\n"
ITEMS = (
    "item_id,text,item.brand,item.tags\nA7,red running shoes,acme,sport|outdoor\nB2,,zeta,\nC9,blue kettle,acme,home\n"
)
USERS = "user_id,user.city\nu1,paris\nu2,\nu3,oslo\n"
QUERIES = "query_id,text\nq1,running shoes\nq2,kettle\n"


def _impressions(n: int, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    lines = ["split,domain,user_id,query_id,item_id,label,timestamp"]
    for i in range(n):
        domain = ["shop", "feed", "new"][i % 3]
        query = "" if domain == "feed" else ["q1", "q2"][rng.integers(2)]
        item = ["A7", "B2", "C9", "D4"][rng.integers(4)]  # D4 has no row in items: no text, no fields
        user = ["u1", "u2", "u3", "u4"][rng.integers(4)]
        label = int(rng.random() < (0.8 if (query == "q1") == (item == "A7") else 0.2))
        lines.append(f"{'train' if i % 5 else 'test'},{domain},{user},{query},{item},{label},{1000 + i}")
    return "\n".join(lines) + "\n"


def _edit(table: str, row: int, column: str, value: str) -> str:
    """The CSV text with one cell (data row `row`) replaced."""
    lines = table.splitlines()
    cells = lines[row + 1].split(",")
    cells[lines[0].split(",").index(column)] = value
    lines[row + 1] = ",".join(cells)
    return "\n".join(lines) + "\n"


def _write(folder, **tables):
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in tables.items():
        (folder / f"{name}.csv").write_text(text)
    return folder


def _source(tmp_path, impressions=None, **replace):
    tables = {"domains": DOMAINS, "items": ITEMS, "users": USERS, "queries": QUERIES}
    tables["impressions"] = impressions or _impressions(40)
    tables.update(replace)
    return _write(tmp_path / "src", **tables)


def test_import_maps_ids_texts_and_fields(tmp_path):
    ds = import_tables(_source(tmp_path), tmp_path / "out", name="mine")
    meta = ds.meta
    assert [(d.name, d.task, d.pretrain) for d in meta.domains] == [
        ("shop", "search", True),
        ("feed", "rec", True),
        ("new", "search", False),
    ]
    assert meta.vocab == {"user_id": 5, "query_id": 3, "item_id": 5}  # sorted ids -> 1..n, 0 = missing
    assert meta.splits == {"test": 8, "train": 32} and meta.has_timestamp
    texts = ds.texts()
    assert texts == ["red running shoes", "blue kettle", "running shoes", "kettle"]  # B2 has none
    fields = {f.column: f for f in meta.sparse_fields}
    assert fields["item.tags"].max_len == 2 and fields["item.brand"].max_len == 1
    assert fields["item.tags"].vocab == 4 and fields["user.city"].vocab == 3  # home, outdoor, sport; oslo, paris
    train = ds.split("train")
    items, users = np.asarray(train["item_id"]), np.asarray(train["user_id"])
    a7, b2, d4 = 1, 2, 4  # sorted: A7, B2, C9, D4
    assert np.all(np.asarray(train["item_text"])[items == a7] == 0)
    assert np.all(np.asarray(train["item_text"])[(items == b2) | (items == d4)] == -1)
    np.testing.assert_array_equal(np.asarray(train["item.tags"])[items == a7][0], [3, 2])  # sport, outdoor
    assert np.all(np.asarray(train["item.brand"])[items == d4] == 0)
    assert np.all(np.asarray(train["user.city"])[users == 2] == 0)  # u2: empty city
    feed = np.asarray(train["domain"]) == 1
    assert np.all(np.asarray(train["query_id"])[feed] == 0) and np.all(np.asarray(train["query_text"])[feed] == -1)
    np.testing.assert_array_equal(np.asarray(train["timestamp"])[:3], [1001, 1002, 1003])


def test_parquet_gives_the_same_dataset(tmp_path):
    csv_src = _source(tmp_path)
    parquet_src = tmp_path / "parquet"
    parquet_src.mkdir()
    for file in csv_src.glob("*.csv"):
        pq.write_table(pa_csv.read_csv(file), parquet_src / f"{file.stem}.parquet")
    a = import_tables(csv_src, tmp_path / "a", name="x")
    b = import_tables(parquet_src, tmp_path / "b", name="x")
    assert a.texts() == b.texts() and a.meta.vocab == b.meta.vocab
    for name, col in a.split("train").items():
        np.testing.assert_array_equal(col, b.split("train")[name], err_msg=name)


@pytest.mark.parametrize(
    "replace, match",
    [
        ({"impressions": _edit(_impressions(6), 3, "label", "2")}, r"impressions.csv, field 'label', row 3: label '2'"),
        ({"impressions": _edit(_impressions(6), 1, "domain", "fed")}, r"row 1: domain 'fed' is not declared"),
        ({"impressions": _impressions(6).replace("user_id", "uid")}, r"field 'user_id': missing column"),
        ({"impressions": _edit(_impressions(6), 2, "user_id", "")}, r"field 'user_id', row 2: empty value"),
        ({"items": ITEMS + "A7,again,acme,\n"}, r"items.csv, field 'item_id', row 0: id 'A7' appears more than once"),
        ({"domains": DOMAINS.replace("rec", "feeds")}, r"domains.csv, field 'task', row 1: task 'feeds'"),
        ({"impressions": _edit(_impressions(6), 4, "timestamp", "soon")}, r"field 'timestamp'.*not an integer"),
    ],
)  # fmt: skip
def test_malformed_tables_name_the_file_field_and_row(tmp_path, replace, match):
    with pytest.raises(DatasetError, match=match):
        import_tables(_source(tmp_path, **replace), tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_missing_table_is_an_error(tmp_path):
    src = _write(tmp_path / "src", domains=DOMAINS)
    with pytest.raises(DatasetError, match=r"impressions.csv: missing"):
        import_tables(src, tmp_path / "out")


def test_an_imported_dataset_trains(tmp_path):
    ds = import_tables(_source(tmp_path, impressions=_impressions(2000, seed=1)), tmp_path / "data")
    build_text_cache(ds.root, get_featurizer("hashed-bow"))
    cfg = config(data={"path": str(ds.root), "batch_size": 64, "eval_batch_size": 64}, train={"epochs": 3.0})
    result = trainer.fit(cfg, tmp_path / "run")
    assert result["overall"]["auc"] > 0.7  # the label follows (query q1) == (item A7): learnable from ids and text


def test_cli_imports_and_builds_the_text_cache(tmp_path, capsys, monkeypatch):
    from train import prepare

    src = _source(tmp_path)
    ds = prepare.main(["tables", "--src", str(src), "--out", str(tmp_path / "out"), "--encoder", "hashed-bow"])
    assert "hashed-bow" in ds.meta.text_caches and "'train': 32" in capsys.readouterr().out
    with pytest.raises(FileExistsError, match=r"prepared.json differs\): pass --overwrite"):
        prepare.main(["tables", "--src", str(src), "--out", str(tmp_path / "out"), "--seed", "3"])
    # re-preparing over it encodes no text it already held (the replaced dataset's cache is reused)
    from sr_jax.text import featurizer

    encoded = []
    real = featurizer.HashedBagOfWords.featurize
    monkeypatch.setattr(featurizer.HashedBagOfWords, "featurize", lambda self, t: encoded.extend(t) or real(self, t))
    (src / "items.csv").write_text(ITEMS + "E1,a new steel pan,acme,home\n")
    again = prepare.main(["tables", "--src", str(src), "--out", str(tmp_path / "out"), "--encoder", "hashed-bow",
                          "--overwrite"])  # fmt: skip
    assert encoded == ["a new steel pan"] and again.meta.num_texts == ds.meta.num_texts + 1
    assert not any(p.name.startswith(".out") for p in tmp_path.iterdir())  # the replaced dataset is gone


def test_ids_are_kept_as_written(tmp_path):
    """007 and 7, 1.0 and 1, and two integers that differ past float precision (in a column that also holds
    1.5, which made pyarrow read it as floats) are six distinct items, not three."""
    items = ["007", "7", "1.0", "1", "9007199254740993", "9007199254740992"]
    lines = ["split,domain,user_id,item_id,label"]
    lines += [f"train,feed,u{i % 2},{item},{i % 2}" for i, item in enumerate(items)]
    lines += ["test,feed,u0,1.5,1", "test,feed,u1,7,0"]
    item_table = "item_id,text\n" + "".join(f"{item},item {item}\n" for item in items + ["1.5"])
    src = _write(
        tmp_path / "src", domains="name,task\nfeed,rec\n", impressions="\n".join(lines) + "\n", items=item_table
    )
    ds = import_tables(src, tmp_path / "out")
    assert ds.meta.vocab["item_id"] == len(items) + 1 + 1  # + "1.5", + the missing id 0
    train = ds.split("train")
    assert len(np.unique(train["item_id"])) == len(items)
    texts = ds.texts()
    assert [texts[r] for r in train["item_text"]] == [f"item {item}" for item in items]


def test_a_key_prefix_keeps_a_catalogue_s_ids_apart(tmp_path):
    """Two catalogues that both number their users 1, 2, ... (MovieLens and RecBole's Amazon files) would share
    those users' rows when a run of one is fine-tuned on the other: `key_prefix` (`train.prepare --key-prefix`)
    keeps every user, query and item key apart; field values stay as written (shared where they are the same)."""
    from sr_jax.data import vocabulary

    src = _write(tmp_path / "src", domains=DOMAINS, impressions=_impressions(40), items=ITEMS, users=USERS,
                 queries=QUERIES)  # fmt: skip
    plain, apart = import_tables(src, tmp_path / "plain"), import_tables(src, tmp_path / "apart", key_prefix="b:")
    for table in ("user_id", "query_id", "item_id"):
        assert apart.keys()[table] == ["b:" + k for k in plain.keys()[table]]
    assert apart.keys()["item.brand"] == plain.keys()["item.brand"]
    extended = vocabulary.extend(vocabulary.of_dataset(plain), vocabulary.of_dataset(apart))
    assert extended.new_keys()["user_id"] == len(plain.keys()["user_id"])  # every user new: nothing shared
    assert extended.new_keys()["item.brand"] == 0


def test_a_killed_prepare_resumes_when_run_again(tmp_path, monkeypatch):
    """Killed while encoding (or stopped by a text the featurizer refused): the same command again keeps the
    dataset and finishes the cache; nothing is converted twice."""
    from sr_jax.text import featurizer
    from train import prepare

    command = ["tables", "--src", str(_source(tmp_path)), "--out", str(tmp_path / "out"), "--encoder", "hashed-bow"]
    real = featurizer.HashedBagOfWords.featurize

    def killed(self, texts):
        raise KeyboardInterrupt

    monkeypatch.setattr(featurizer.HashedBagOfWords, "featurize", killed)
    with pytest.raises(KeyboardInterrupt):
        prepare.main(command)
    assert (tmp_path / "out/meta.json").exists() and "hashed-bow" not in open_dataset(tmp_path / "out").meta.text_caches
    monkeypatch.setattr(featurizer.HashedBagOfWords, "featurize", real)
    converted = []
    monkeypatch.setitem(prepare.CONVERTERS, "tables", lambda *a, **k: converted.append(a))
    ds = prepare.main(command)
    assert not converted and "hashed-bow" in ds.meta.text_caches
    assert prepare.main(command).meta.text_caches == ds.meta.text_caches  # done: a rerun changes nothing


BOM = "\ufeff"


def _move_first(table: str, column: str) -> str:
    """The CSV text with `column` moved to the first position (every row)."""
    rows = [line.split(",") for line in table.splitlines()]
    at = rows[0].index(column)
    return "\n".join(",".join([r[at], *r[:at], *r[at + 1 :]]) for r in rows) + "\n"


@pytest.mark.parametrize("table", ["domains", "impressions", "items", "users", "queries"])
@pytest.mark.parametrize("first", ["id", "other"])
def test_a_byte_order_mark_changes_nothing(tmp_path, table, first):
    """A UTF-8 BOM before the header (as Excel writes it), with the id column first or another one first: the
    same dataset as without it. Every key looks like a number, so a column whose name kept the BOM would be
    type-inferred and `007` and `7` would merge."""
    tables = {
        "domains": "name,task,pretrain\n01,search,true\n1,rec,true\n",
        "users": "user_id,user.city\n007,1\n7,2\n3,\n",
        "items": "item_id,text,item.brand\n007,red shoes,1\n7,blue kettle,2\n3,,1\n",
        "queries": "query_id,text\n01,shoes\n1,kettle\n",
        "impressions": "split,domain,user_id,query_id,item_id,label\n"
        + "".join(
            f"{s},{d},{u},{q},{item},{i % 2}\n"
            for i, (s, d, u, q, item) in enumerate(
                [("train", "01", "007", "01", "007"), ("train", "1", "7", "", "7"), ("test", "01", "3", "1", "3")] * 4
            )
        ),
    }
    plain = import_tables(_write(tmp_path / "plain", **tables), tmp_path / "plain-out")
    key = {"domains": "name", "impressions": "user_id", "items": "item_id", "users": "user_id", "queries": "query_id"}
    text = tables[table]
    other = [c for c in text.splitlines()[0].split(",") if c != key[table]][-1]
    tables[table] = BOM + _move_first(text, key[table] if first == "id" else other)
    marked = import_tables(_write(tmp_path / "bom", **tables), tmp_path / "bom-out")
    assert marked.keys() == plain.keys() and {"007", "7"} <= set(marked.keys()["user_id"])
    assert [d.name for d in marked.meta.domains] == ["01", "1"] and marked.texts() == plain.texts()
    for split in ("train", "test"):
        for name, column in plain.split(split).items():
            np.testing.assert_array_equal(marked.split(split)[name], column, err_msg=f"{table}: {split}/{name}")


def test_na_and_null_are_texts_and_ids_only_an_empty_cell_is_missing(tmp_path):
    items = "item_id,text\nNA,null\nnull,NA\nA7,\n"
    impressions = "split,domain,user_id,item_id,label\n" + "".join(
        f"{s},feed,None,{item},{i % 2}\n" for i, (s, item) in enumerate([("train", "NA"), ("train", "null")] * 2)
    )
    impressions += "test,feed,None,A7,1\ntest,feed,None,NA,0\n"
    src = _write(tmp_path / "src", domains="name,task\nfeed,rec\n", impressions=impressions, items=items)
    ds = import_tables(src, tmp_path / "out")
    assert set(ds.keys()["item_id"]) == {"NA", "null", "A7"} and ds.keys()["user_id"] == ["None"]
    texts, train = ds.texts(), ds.split("train")
    by_key = dict(zip(ds.keys()["item_id"], range(1, 4)))
    text_of = {int(i): texts[t] for i, t in zip(train["item_id"], train["item_text"])}
    assert text_of[by_key["NA"]] == "null" and text_of[by_key["null"]] == "NA"
    assert (ds.split("test")["item_text"][ds.split("test")["item_id"] == by_key["A7"]] == -1).all()  # empty: none


def test_a_prepare_killed_after_writing_its_dataset_resumes(tmp_path, monkeypatch):
    """Killed as the converter returns (the dataset written, its record not yet): the same command again
    finishes, where it used to refuse with 'not prepared by this command'."""
    from train import prepare

    command = ["tables", "--src", str(_source(tmp_path)), "--out", str(tmp_path / "out"), "--encoder", "none"]
    real = prepare.CONVERTERS["tables"]

    def killed(*args, **kwargs):
        real(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setitem(prepare.CONVERTERS, "tables", killed)
    with pytest.raises(KeyboardInterrupt):
        prepare.main(command)
    monkeypatch.setitem(prepare.CONVERTERS, "tables", real)
    ds = prepare.main(command)
    assert (ds.root / prepare.PREPARED).exists() and ds.meta.splits
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]  # no staging folder left behind
