"""Vocabularies that travel: a dataset's raw keys, their alignment to a pretrained run's tables, and a
fine-tune on a separately prepared dataset with ids, fields and texts of its own."""

import dataclasses
import json

import numpy as np
import pytest

from helpers import config
from sr_jax.config import ConfigError
from sr_jax.data import vocabulary
from sr_jax.data.importer import import_tables
from sr_jax.data.schema import SparseField
from sr_jax.data.store import DatasetError, open_dataset
from sr_jax.text import HashedBagOfWords, build_text_cache
from sr_jax.training import records, restore, trainer
from train import finetune as finetune_cli


def _vocab(users, items, fields):
    keys = {"user_id": tuple(users), "query_id": (), "item_id": tuple(items)}
    keys.update({column: tuple(values) for column, values in fields.items()})
    sparse = tuple(SparseField(c.split(".")[1], c.split(".")[0], len(v) + 1) for c, v in fields.items())
    return vocabulary.Vocabulary(keys, sparse)


def test_extend_keeps_pretrained_rows_and_appends_new_keys():
    pre = _vocab(["u1", "u2"], ["a", "b", "c"], {"item.brand": ["acme", "zeta"], "user.city": ["oslo"]})
    data = _vocab(["u2", "u9"], ["c", "d", "a"], {"item.brand": ["zeta", "nova"], "item.color": ["red"]})
    row_map = vocabulary.extend(pre, data)
    assert row_map.vocab.keys["item_id"] == ("a", "b", "c", "d")
    assert row_map.vocab.keys["user_id"] == ("u1", "u2", "u9")
    assert row_map.vocab.keys["item.brand"] == ("acme", "zeta", "nova")
    assert row_map.vocab.keys["user.city"] == ("oslo",)  # kept: the pretrained rows stay readable
    assert [f.column for f in row_map.vocab.fields] == ["item.brand", "user.city", "item.color"]
    assert row_map.new_keys() == {
        "user_id": 1, "query_id": 0, "item_id": 1, "item.brand": 1, "user.city": 0, "item.color": 2
    }  # fmt: skip
    # data ids (1-based rows of `data`) -> model rows; 0 stays 0
    columns = {
        "label": np.zeros(4, np.int8),
        "user_id": np.array([1, 2, 0, 2], np.int32),
        "query_id": np.zeros(4, np.int32),
        "item_id": np.array([1, 2, 3, 0], np.int32),  # c, d, a, missing
        "item.brand": np.array([1, 2, 0, 1], np.int32),  # zeta, nova
        "item.color": np.array([1, 1, 0, 0], np.int32),
    }
    out = row_map.remap(columns)
    np.testing.assert_array_equal(out["item_id"], [3, 4, 1, 0])
    np.testing.assert_array_equal(out["user_id"], [2, 3, 0, 3])
    np.testing.assert_array_equal(out["item.brand"], [2, 3, 0, 2])
    np.testing.assert_array_equal(out["item.color"], [1, 1, 0, 0])
    np.testing.assert_array_equal(out["user.city"], [0, 0, 0, 0])  # a field the data lacks reads as missing
    assert vocabulary.extend(data, data).rows == {}  # the same vocabulary: nothing to remap


def test_the_store_keeps_raw_keys_and_checks_them(tmp_path):
    from test_importer import _source

    ds = import_tables(_source(tmp_path), tmp_path / "out")
    keys = ds.keys()
    assert keys["item_id"] == ["A7", "B2", "C9", "D4"] and keys["user_id"] == ["u1", "u2", "u3", "u4"]
    assert keys["item.brand"] == ["acme", "zeta"] and keys["item.tags"] == ["home", "outdoor", "sport"]
    broken = json.loads((tmp_path / "out/keys.json").read_text())
    broken["item_id"][2] = "A7"
    (tmp_path / "out/keys.json").write_text(json.dumps(broken))
    with pytest.raises(DatasetError, match=r"keys.json, field 'item_id', row 3: key 'A7' is also row 1"):
        open_dataset(tmp_path / "out")
    broken["item_id"] = broken["item_id"][:2]
    (tmp_path / "out/keys.json").write_text(json.dumps(broken))
    with pytest.raises(DatasetError, match=r"field 'item_id'.*2 keys, expected 4"):
        open_dataset(tmp_path / "out")


# Two datasets prepared apart: A (pretraining: shop search and a feed) and B (a new shop with other items,
# some shared, a new sparse field, no user field, its own split names).
DOMAINS_A = "name,task\nshop,search\nfeed,rec\n"
DOMAINS_B = "name,task\nnew_shop,search\n"
ITEMS_A = "item_id,text,item.brand\n" + "".join(f"i{k},{w} gadget number {k},{b}\n" for k, w, b in [
    (1, "red", "acme"), (2, "blue", "acme"), (3, "green", "zeta"), (4, "steel", "zeta"), (5, "wooden", "nova"),
    (6, "plastic", "nova")])  # fmt: skip
ITEMS_B = "item_id,text,item.brand,item.color\n" + "".join(f"{i},{w} gadget {i},{b},{c}\n" for i, w, b, c in [
    ("i3", "green", "zeta", "green"), ("i5", "wooden", "nova", "brown"), ("n1", "glass", "vera", "clear"),
    ("n2", "paper", "vera", "white"), ("n3", "iron", "acme", "black")])  # fmt: skip
USERS_A = "user_id,user.city\n" + "".join(f"u{k},{['oslo', 'rome'][k % 2]}\n" for k in range(1, 9))


def _impressions(domains, users, items, queries, n, seed, splits=("train", "test")):
    rng = np.random.default_rng(seed)
    lines = ["split,domain,user_id,query_id,item_id,label"]
    for i in range(n):
        domain = domains[i % len(domains)]
        query = "" if domain == "feed" else queries[rng.integers(len(queries))]
        item, user = items[rng.integers(len(items))], users[rng.integers(len(users))]
        label = int(rng.random() < (0.8 if (hash(item) + hash(query)) % 2 else 0.2))
        lines.append(f"{splits[0] if i % 4 else splits[1]},{domain},{user},{query},{item},{label}")
    return "\n".join(lines) + "\n"


def _prepare(folder, **tables):
    folder.mkdir(parents=True)
    for name, text in tables.items():
        (folder / f"{name}.csv").write_text(text)
    ds = import_tables(folder, folder.parent / (folder.name + "-store"))
    build_text_cache(ds.root, HashedBagOfWords(), progress=False)
    return ds.root


@pytest.fixture(scope="module")
def two_datasets(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("two")
    queries = "query_id,text\nq1,green gadget\nq2,wooden gadget\nq3,glass gadget\n"
    a = _prepare(
        tmp / "a",
        domains=DOMAINS_A,
        items=ITEMS_A,
        users=USERS_A,
        queries=queries,
        impressions=_impressions(["shop", "feed"], [f"u{k}" for k in range(1, 9)], [f"i{k}" for k in range(1, 7)],
                                 ["q1", "q2"], 2048, 0),
    )  # fmt: skip
    b = _prepare(
        tmp / "b",
        domains=DOMAINS_B,
        items=ITEMS_B,
        queries=queries,
        impressions=_impressions(["new_shop"], ["u3", "u4", "v1", "v2"], ["i3", "i5", "n1", "n2", "n3"],
                                 ["q1", "q3"], 1024, 1, splits=("cold", "later")),
    )  # fmt: skip
    pre = tmp / "pretrained"
    trainer.fit(config(data={"path": str(a)}, train={"epochs": 2.0, "checkpoint_every": 1000}), pre)
    return a, b, pre


def test_a_fine_tune_on_another_dataset_reads_the_pretrained_rows_by_key(two_datasets, tmp_path):
    a, b, pre = two_datasets
    argv = ["--pretrained", str(pre), "--workdir", str(tmp_path / "ft"), "--data", str(b), "--train-split", "cold",
            "--eval-split", "later", "finetune.new_rows_init=zero", "train.min_steps=0", "train.epochs=2",
            "--strategy", "frozen"]  # fmt: skip
    # (2 epochs: 4 steps. The new field's rows start at zero and the first step's rate is 0 (warm-up), so its
    # projection gets a gradient only once its rows have moved: after the second step.)
    args_cfg = finetune_cli.resolve(finetune_cli.parser().parse_args(argv))
    run = trainer.build_run(args_cfg, tmp_path / "ft")
    keys = run.spec.row_map.vocab.keys
    assert keys["item_id"][:6] == tuple(f"i{k}" for k in range(1, 7)) and keys["item_id"][6:] == ("n1", "n2", "n3")
    assert set(keys["user_id"][8:]) == {"v1", "v2"} and "item.color" in keys and "user.city" in keys
    start = restore.initial_state(run.spec).params
    pre_params = restore.checkpoint_params(trainer.build_run(config(data={"path": str(a)}), pre).spec)
    item, pre_item = np.asarray(start["l0"]["id_tables"]["item"]), np.asarray(pre_params["l0"]["id_tables"]["item"])
    np.testing.assert_array_equal(item[[3, 5]], pre_item[[3, 5]])  # i3 and i5: their pretrained rows
    np.testing.assert_array_equal(item[7:10], 0.0)  # n1..n3: new rows, zero-initialised
    brand = np.asarray(start["l0"]["sparse_tables"]["item_brand"])
    np.testing.assert_array_equal(brand[:4], np.asarray(pre_params["l0"]["sparse_tables"]["item_brand"])[:4])
    # L0 and L1 frozen (--strategy frozen): the new rows, the new field and the new domain still train
    result = finetune_cli.main(argv)
    after = restore.checkpoint_params(run.spec)
    moved = np.any(np.asarray(after["l0"]["id_tables"]["item"]) != item, axis=1)
    assert moved[7:10].all() and not moved[:7].any() and not moved[10:].any()
    color = after["l0"]["sparse_proj"]["item_color"]["kernel"]
    assert not np.array_equal(np.asarray(color), np.asarray(start["l0"]["sparse_proj"]["item_color"]["kernel"]))
    np.testing.assert_array_equal(after["l0"]["sparse_proj"]["item_brand"]["kernel"],
                                  start["l0"]["sparse_proj"]["item_brand"]["kernel"])  # fmt: skip
    assert 0.0 <= result["mean_domain_auc"] <= 1.0 and "new_shop" in result["domains"]
    assert vocabulary.read(tmp_path / "ft").keys == keys  # the fine-tune's own record, for the next run
    assert (tmp_path / "ft" / records.SNAPSHOT / vocabulary.VOCAB).exists()


def test_a_mismatch_that_cannot_be_aligned_names_every_parameter(two_datasets, tmp_path):
    a, b, pre = two_datasets
    argv = ["--pretrained", str(pre), "--workdir", str(tmp_path / "ft"), "--data", str(b), "--train-split", "cold",
            "--eval-split", "later", "model.dim=16", "model.gate_dim=8", "finetune.align_reference=false",
            "finetune.new_rows_init=mean"]  # fmt: skip
    cfg = finetune_cli.resolve(finetune_cli.parser().parse_args(argv))
    with pytest.raises(Exception) as info:
        restore.initial_state(trainer.build_run(cfg, tmp_path / "ft").spec)
    message = str(info.value)
    for path in ("l0/id_tables/item", "l0/sparse_proj/item_brand/kernel", "l1/domain_embedding", "l2/gate/kernel"):
        assert path in message, path


def test_a_table_that_would_switch_from_a_row_per_id_to_hashing_is_named():
    """Pretrained with 4 item rows (3 keys + missing) under model.id_buckets=4, a row per id; the fine-tune
    data's new keys make 6 rows, which 4 buckets would hash: known keys would read other keys' rows."""
    pre = _vocab(["u1"], ["a", "b", "c"], {})
    data = _vocab(["u1"], ["a", "d", "e"], {})
    row_map = vocabulary.extend(pre, data)
    assert row_map.hashing_switches(4) == [("item_id", 4, 6)]
    assert row_map.hashing_switches(0) == [] and row_map.hashing_switches(6) == []  # no hashing / still a row each
    assert row_map.hashing_switches(3) == []  # hashed before and after: lookups hash the same ids the same way


def test_fine_tuning_refuses_a_switch_to_hashing(two_datasets, tmp_path):
    """Pretrained on dataset a with model.id_buckets equal to its item rows (a row per id); b's new items n1..n3
    would make the fine-tune hash them: refused, naming the table and both sizes, before anything is trained."""
    a, b, _ = two_datasets
    rows = vocabulary.of_dataset(open_dataset(a)).rows("item_id")
    base = config(data={"path": str(a)}, train={"epochs": 1.0, "checkpoint_every": 1000}, model={"id_buckets": rows})
    trainer.fit(base, tmp_path / "pre")
    cfg = dataclasses.replace(
        base,
        data=dataclasses.replace(base.data, path=str(b), train_split="cold", eval_split="later"),
        finetune=dataclasses.replace(base.finetune, pretrained=str(tmp_path / "pre")),
    )
    with pytest.raises(ConfigError, match=rf"model.id_buckets={rows}: table item_id had {rows} rows .* has {rows + 3}"):
        trainer.build_run(cfg, tmp_path / "ft")
