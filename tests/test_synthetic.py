import numpy as np

from helpers import TINY
from sr_jax.data import synthetic


def test_generation_is_deterministic_per_seed(tmp_path):
    a = synthetic.generate(TINY, tmp_path / "a")
    b = synthetic.generate(TINY, tmp_path / "b")
    c = synthetic.generate(type(TINY)(**{**TINY.__dict__, "seed": 1}), tmp_path / "c")
    assert a.texts() == b.texts()
    for split in a.meta.splits:
        for name, col in a.split(split).items():
            np.testing.assert_array_equal(col, b.split(split)[name])
    assert a.meta.oracle_auc == b.meta.oracle_auc
    assert not np.array_equal(a.split("train")["label"], c.split("train")["label"])


def test_domains_cold_items_and_oracle(tmp_path):
    ds = synthetic.generate(TINY, tmp_path / "ds")
    meta = ds.meta
    tasks = [d.task for d in meta.domains if d.pretrain]
    assert tasks.count("search") >= 4 and tasks.count("rec") >= 3
    heldout = [k for k, d in enumerate(meta.domains) if not d.pretrain]
    assert len(heldout) == 1
    train, test = ds.split("train"), ds.split("test")
    assert not np.isin(heldout, train["domain"]).any() and not np.isin(heldout, test["domain"]).any()
    assert set(np.unique(ds.split("heldout_train")["domain"])) == set(heldout)
    # recommendation examples have no query; search examples do
    is_rec = np.array([d.task == "rec" for d in meta.domains])[train["domain"]]
    assert np.all(train["query_id"][is_rec] == 0) and np.all(train["query_text"][is_rec] == -1)
    assert np.all(train["query_id"][~is_rec] > 0)
    # cold items: in test, never in train or valid
    seen = set(np.unique(train["item_id"])) | set(np.unique(ds.split("valid")["item_id"]))
    cold = ~np.isin(test["item_id"], list(seen))
    assert cold.mean() > 0.1
    # the cold-item protocol's splits: known domains, items never seen in train or valid
    for split in ("cold_train", "cold_test"):
        cols = ds.split(split)
        assert set(np.unique(cols["domain"])) <= set(meta.pretrain_domains)
        assert not np.isin(cols["item_id"], list(seen)).any()
    assert "cold_test" in meta.oracle_auc
    # oracle AUC per pretraining domain and for cold items, well above chance
    oracle = meta.oracle_auc["test"]
    assert set(oracle) >= {d.name for d in meta.domains if d.pretrain} | {"cold_items", "overall"}
    assert all(0.6 < v < 1.0 for v in oracle.values())
    # domain shift: base rates differ
    ctr = [train["label"][train["domain"] == k].mean() for k in np.unique(train["domain"])]
    assert max(ctr) - min(ctr) > 0.2


def test_item_text_names_topic_and_style():
    words = set(" ".join(" ".join(v) for v in synthetic.TOPICS.values()).split())
    ds_texts = synthetic._texts(synthetic._make_world(TINY, np.random.default_rng(0)), np.random.default_rng(1))[0]
    assert all(any(w in words for w in t.split()) for t in ds_texts[1:])
