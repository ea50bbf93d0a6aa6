import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers import TINY, config, model_inputs
from sr_jax import model as sr_model
from sr_jax.model import rows as rows_of
from sr_jax.model.layers import StackedMLP, hash_ids


@pytest.fixture(scope="module")
def data():
    return model_inputs()


def _build(data, **model_fields):
    ds, text, batch = data
    cfg = dataclasses.replace(config(TINY).model, **model_fields)
    return sr_model.init(cfg, ds.meta, text.pooled.shape[1], seed=0)


def test_functional_api_is_pure_and_levelled(data):
    ds, text, batch = data
    graphdef, params = _build(data)
    assert set(params) == set(sr_model.LEVELS)
    labels = jax.tree.leaves(sr_model.leaf_levels(params))
    assert set(labels) == {"l0", "l1", "l2"}
    assert "id_tables" in params["l0"] and "experts" in params["l1"]["backbone"] and "tower" in params["l2"]
    logits, aux = jax.jit(lambda p, b: sr_model.apply(graphdef, p, b, text))(params, batch)
    again, _ = sr_model.apply(graphdef, params, batch, text)
    np.testing.assert_allclose(logits, again, rtol=1e-5, atol=1e-6)
    assert logits.shape == (64,) and np.all(np.isfinite(logits))
    assert aux["expert_weights"].shape == (64, 4) and aux["reg"].shape == ()
    np.testing.assert_allclose(aux["expert_weights"].sum(1), 1.0, rtol=1e-5)
    # recommendation examples: no query aspect present, all query weights zero
    rec = np.array([d.task == "rec" for d in ds.meta.domains])[np.asarray(batch["domain"])]
    assert rec.any() and np.all(np.asarray(aux["aspect_weights"]["query"])[rec] == 0)


def test_each_example_uses_its_own_domain_tower(data):
    ds, text, batch = data
    graphdef, params = _build(data)
    logits, _ = sr_model.apply(graphdef, params, batch, text)
    k = int(batch["domain"][0])
    bumped = jax.tree.map(lambda a: a, params)
    bumped["l2"]["tower"]["layers"][1]["bias"] = params["l2"]["tower"]["layers"][1]["bias"].at[k].add(1.0)
    changed, _ = sr_model.apply(graphdef, bumped, batch, text)
    in_k = np.asarray(batch["domain"]) == k
    np.testing.assert_allclose(np.asarray(changed - logits)[in_k], 1.0, rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(changed)[~in_k], np.asarray(logits)[~in_k])


@pytest.mark.parametrize(
    "fields",
    [
        {"gating": "mean"},
        {"gating": "cls"},
        {"use_text": False},
        {"use_domain_adapter": False},
        {"regularizer": "mmd"},
        {"regularizer": "none"},
        {"id_buckets": 50},
        {"backbone": "ple", "ple_levels": 2},
        {"backbone": "star"},
        {"backbone": "star", "star_norm": "layer"},
        {"dtype": "bfloat16"},
    ],
)
def test_variants_build_and_run(data, fields):
    ds, text, batch = data
    graphdef, params = _build(data, **fields)
    logits, aux = sr_model.apply(graphdef, params, batch, text)
    assert logits.dtype == jnp.float32 and np.all(np.isfinite(logits))
    if fields.get("use_text") is False:
        assert "text_proj" not in params["l0"] or not params["l0"]["text_proj"]
        assert aux["aspect_weights"]["item"].shape[1] == 3  # id, sparse, dense
    if "id_buckets" in fields:
        assert params["l0"]["id_tables"]["item"].shape[0] == 64  # 50 buckets, padded to the row multiple
    if fields.get("regularizer") == "none":
        assert float(aux["reg"]) == 0.0


def test_bad_model_options_are_refused(data):
    with pytest.raises(ValueError, match="model.gating: 'max' is not one of"):
        _build(data, gating="max")
    with pytest.raises(ValueError, match="model.regularizer: 'kl' is not one of"):
        _build(data, regularizer="kl")


def test_tables_are_padded_to_the_row_multiple_and_ids_never_reach_the_padding(data):
    ds, text, batch = data
    graphdef, params = _build(data, table_row_multiple=64)
    assert params["l0"]["id_tables"]["item"].shape[0] == 128  # 120 items -> 128 rows
    assert all(t.shape[0] % 64 == 0 for t in jax.tree.leaves(params["l0"]["sparse_tables"]))
    rows = sr_model.table_rows(graphdef, params, batch)
    padding = rows_of.position(np.arange(ds.meta.vocab["item_id"], 128), 128, 64, "strided")  # where it is stored
    assert not np.isin(np.asarray(rows[("id_tables", "item")]), padding).any()
    bumped = jax.tree.map(lambda a: a, params)
    in_order = rows_of.row_order(params["l0"]["id_tables"]["item"], 64, "strided")
    bumped["l0"]["id_tables"]["item"] = rows_of.stored(in_order.at[120:].set(100.0), 64, "strided")  # the padding
    np.testing.assert_array_equal(
        sr_model.apply(graphdef, params, batch, text)[0], sr_model.apply(graphdef, bumped, batch, text)[0]
    )


def test_hash_ids_keeps_missing_and_stays_in_range():
    ids = jnp.arange(0, 10_000)
    rows = np.asarray(hash_ids(ids, 10_000, 101))
    assert rows[0] == 0 and rows[1:].min() >= 1 and rows.max() <= 100
    assert len(np.unique(rows)) == 101
    np.testing.assert_array_equal(hash_ids(ids, 10_000, 10_000), ids)


@pytest.mark.parametrize("buckets", [1025, 1000])
def test_hashed_strided_ids_collide_no_more_than_random(buckets):
    """Ids that differ by multiples of the number of hashed rows (rows - 1 = 1024, a power of two) must not
    pile into one row, as they all did (1 row of 1024) when the hash kept the low bits: the distinct rows hit
    stay near the ideal of a random map."""
    n = buckets - 1  # rows 1..buckets-1 take ids
    for stride in (n, 1024, 4096):
        ids = jnp.arange(1, n + 1) * stride
        used = len(np.unique(np.asarray(hash_ids(ids, 1 << 30, buckets))))
        ideal = n * (1 - (1 - 1 / n) ** n)  # expected distinct rows of n ids thrown at random
        assert used > 0.95 * ideal, (stride, used, ideal)


def test_bfloat16_logits_are_not_rounded_to_bfloat16(data):
    """The tower's last layer accumulates in float32: logits are not quantised to bf16's 8 bits (which ties
    scores and costs AUC), so few of them are exactly representable in bf16."""
    ds, text, batch = data
    graphdef, params = _build(data, dtype="bfloat16")
    logits, _ = sr_model.apply(graphdef, params, batch, text)
    logits = np.asarray(logits)
    representable = logits == np.asarray(jnp.asarray(logits).astype(jnp.bfloat16).astype(jnp.float32))
    assert logits.dtype == np.float32 and representable.mean() < 0.25
    assert len(np.unique(logits)) == len(logits)


def test_the_regularizer_does_not_depend_on_the_adapters_gain(data):
    """L_reg aligns the normalised output before LayerNorm's gain: shrinking the gain (what the model could do
    to switch the regularizer off) leaves it unchanged."""
    ds, text, batch = data
    for regularizer in ("js", "mmd"):
        graphdef, params = _build(data, regularizer=regularizer)
        reg = float(sr_model.apply(graphdef, params, batch, text)[1]["reg"])
        shrunk = jax.tree.map(lambda a: a, params)
        shrunk["l1"]["adapter"]["scale"] = params["l1"]["adapter"]["scale"] * 0.1
        assert reg > 0 and float(sr_model.apply(graphdef, shrunk, batch, text)[1]["reg"]) == pytest.approx(
            reg, rel=1e-5
        )


@pytest.mark.parametrize("n, sizes", [(1, [37]), (7, [0, 1, 31, 32, 33, 100, 3]), (100, None)])
def test_grouped_domain_layers_equal_computing_every_domain(n, sizes):
    """`own_layer` runs each example through its own domain's layers by grouping (work independent of K); it equals
    computing all K layers on every example and keeping the example's own, forward and gradient."""
    rng = np.random.default_rng(n)
    domain = np.repeat(np.arange(n), sizes) if sizes else rng.integers(0, n, 257)
    domain = jnp.asarray(rng.permutation(domain), jnp.int32)
    x = jnp.asarray(rng.standard_normal((len(domain), 12)), jnp.float32)
    mlp = StackedMLP(n, 12, (16, 1), rngs=nnx.Rngs(0), linear_out=True)
    graphdef, params = nnx.split(mlp)

    def grouped(params, x):
        return nnx.merge(graphdef, params).own_layer(x, domain, jnp.float32)

    def every(params, x):
        out = nnx.merge(graphdef, params).all_layers(x, jnp.float32)  # [B, n, 1]
        return jnp.take_along_axis(out, domain[:, None, None], axis=1)[:, 0]

    np.testing.assert_allclose(grouped(params, x), every(params, x), rtol=1e-5, atol=1e-6)
    g_grouped = jax.grad(lambda p, x: grouped(p, x).sum(), argnums=(0, 1))(params, x)
    g_every = jax.grad(lambda p, x: every(p, x).sum(), argnums=(0, 1))(params, x)
    for a, b in zip(jax.tree.leaves(g_grouped), jax.tree.leaves(g_every)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_id_dropout_reads_ids_as_missing_in_training_only(data):
    ds, text, batch = data
    graphdef, params = _build(data, id_dropout=0.5)
    item_id = sr_model.encoding.side_aspects(config(TINY).model, ds.meta)["item"].index("id")

    def id_weight(train, key):
        _, aux = sr_model.apply(graphdef, params, batch, text, train=train, key=key)
        return np.asarray(aux["aspect_weights"]["item"])[:, item_id]

    dropped = id_weight(True, jax.random.key(3)) == 0
    assert 0.3 < dropped.mean() < 0.7  # about half of 64 examples
    assert not np.array_equal(dropped, id_weight(True, jax.random.key(4)) == 0)  # a new draw every step
    assert (id_weight(False, jax.random.key(3)) > 0).all()  # never at inference
    graphdef0, params0 = _build(data, id_dropout=0.0)
    _, aux = sr_model.apply(graphdef0, params0, batch, text, train=True, key=jax.random.key(3))
    assert (np.asarray(aux["aspect_weights"]["item"])[:, item_id] > 0).all()  # rate 0: never dropped


def test_history_attention_makes_the_user_depend_on_the_candidate(data):
    """DIN's target attention: the same user and history with another candidate item gives another user
    vector; the mean pooling does not look at the candidate."""
    from sr_jax.data.history import COLUMN

    ds, text, batch = data
    rows = np.random.default_rng(0).integers(-1, ds.meta.num_texts, (64, 3)).astype(np.int32)
    with_history = {**batch, COLUMN: jnp.asarray(rows)}
    other = {**with_history, "item_text": jnp.roll(with_history["item_text"], 1)}
    for pooling, depends in (("attention", True), ("mean", False)):
        graphdef, params = _build(data, user_history=3, history_pooling=pooling)
        users = [np.asarray(sr_model.sides(graphdef, params, b, text)["user"]) for b in (with_history, other)]
        has = (rows >= 0).any(1) & (np.asarray(other["item_text"]) != np.asarray(batch["item_text"]))
        assert has.any()
        assert (not np.allclose(users[0][has], users[1][has], atol=1e-6)) == depends, pooling


def test_retrieval_embeddings_refuse_a_user_vector_that_depends_on_the_candidate(tmp_path):
    from types import SimpleNamespace

    from sr_jax.export import embeddings

    cfg = dataclasses.replace(config(TINY), model=dataclasses.replace(config(TINY).model, user_history=3,
                                                                      history_pooling="attention"))  # fmt: skip
    with pytest.raises(ValueError, match="depend on the candidate item"):
        embeddings.embed(SimpleNamespace(config=cfg, workdir=tmp_path), None, "test", tmp_path / "out")
