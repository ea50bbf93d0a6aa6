"""The lookup routed by all-to-all (`sr_jax.model.lookup`): the rows and gradients of a plain gather, drops
counted when the capacity is too small, and fewer bytes on the wire than GSPMD's lookup (read from the
compiled program)."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from sr_jax.bench import compiled
from sr_jax.model.lookup import routed_lookup


def _routed(table, ids, mesh, **kwargs):
    (vectors,), dropped = routed_lookup([table], [ids], mesh, **kwargs)
    return vectors, dropped


@pytest.fixture
def mesh():
    return jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Auto,) * 2)


def _inputs(mesh, rows=1024, n=512, skew=False, dim=8):
    rng = np.random.default_rng(0)
    table = jax.device_put(jnp.asarray(rng.standard_normal((rows, dim)), jnp.float32), NamedSharding(mesh, P("model")))
    ids = rng.integers(0, rows // 8 if skew else rows, n)  # skew: every id in the first shard's rows
    ids[::7] = ids[0]  # repeated ids: deduped before they travel
    return table, jax.device_put(jnp.asarray(ids, jnp.int32), NamedSharding(mesh, P(("data", "model"))))


def test_routed_rows_and_gradients_are_the_gather_s(mesh):
    table, ids = _inputs(mesh)
    vectors, dropped = jax.jit(lambda t, i: _routed(t, i, mesh))(table, ids)
    assert int(dropped) == 0
    np.testing.assert_array_equal(np.asarray(vectors), np.asarray(table)[np.asarray(ids)])
    cotangent = jnp.asarray(np.random.default_rng(1).standard_normal(vectors.shape), jnp.float32)
    routed = jax.jit(jax.grad(lambda t: jnp.sum(_routed(t, ids, mesh)[0] * cotangent)))(table)
    plain = jax.grad(lambda t: jnp.sum(t[np.asarray(ids)] * cotangent))(np.asarray(table))
    np.testing.assert_allclose(np.asarray(routed), np.asarray(plain), rtol=1e-6, atol=1e-6)


def test_vectors_and_gradients_travel_in_bfloat16_at_half_the_bytes(mesh):
    """`wire=bfloat16` (model.lookup_wire): each vector arrives as its bfloat16 rounding and each gradient leaves
    rounded so, summed into the float32 rows after arrival; the exchange's vectors take half the bytes."""
    table, ids = _inputs(mesh)
    vectors, _ = jax.jit(lambda t, i: _routed(t, i, mesh, wire=jnp.bfloat16))(table, ids)
    assert vectors.dtype == jnp.float32
    rounded = np.asarray(table.astype(jnp.bfloat16).astype(jnp.float32))
    np.testing.assert_array_equal(np.asarray(vectors), rounded[np.asarray(ids)])
    cotangent = jnp.asarray(np.random.default_rng(1).standard_normal(vectors.shape), jnp.float32)
    grad = jax.jit(jax.grad(lambda t: jnp.sum(_routed(t, ids, mesh, wire=jnp.bfloat16)[0] * cotangent)))(table)
    # a device sums its examples' gradients per unique id, rounds that sum where it leaves, the owner adds them up
    want = np.zeros(table.shape, np.float32)
    for i, c in zip(np.split(np.asarray(ids), 8), np.split(np.asarray(cotangent), 8)):
        per_id = np.zeros(table.shape, np.float32)
        np.add.at(per_id, i, c)
        want += np.asarray(jnp.asarray(per_id).astype(jnp.bfloat16).astype(jnp.float32))
    np.testing.assert_allclose(np.asarray(grad), want, rtol=1e-6, atol=1e-6)
    exact = jax.grad(lambda t: jnp.sum(t[np.asarray(ids)] * cotangent))(np.asarray(table))
    assert not np.allclose(np.asarray(grad), np.asarray(exact), rtol=1e-6, atol=1e-6)  # the rounding is real

    def exchanged(wire):
        step = jax.jit(jax.grad(lambda t: jnp.sum(_routed(t, ids, mesh, wire=wire)[0] * cotangent)))
        found = compiled.collectives(step.lower(table).compile().as_text(), 8)
        return sorted(c.bytes for c in found if c.kind == "all-to-all")

    full, half = exchanged(None), exchanged(jnp.bfloat16)
    assert full[0] == half[0]  # the ids: int32 either way
    assert [b // 2 for b in full[1:]] == half[1:]  # the vectors and their gradients: half


def test_ids_beyond_the_capacity_are_counted_and_get_zeros(mesh):
    table, ids = _inputs(mesh, skew=True)  # every id owned by one shard: 4x its fair share
    vectors, dropped = jax.jit(lambda t, i: _routed(t, i, mesh, capacity_factor=1.0))(table, ids)
    got, want = np.asarray(vectors), np.asarray(table)[np.asarray(ids)]
    lost = ~np.isclose(got, want).all(axis=1)
    assert int(dropped) > 0 and lost.any()
    assert (got[lost] == 0).all()  # a dropped id reads zeros, never another row
    _, none = jax.jit(lambda t, i: _routed(t, i, mesh, capacity_factor=4.0))(table, ids)
    assert int(none) == 0  # capacity for every id in one shard
    exact, none = jax.jit(lambda t, i: _routed(t, i, mesh, capacity_factor=None))(table, ids)  # inference's
    assert int(none) == 0
    np.testing.assert_array_equal(np.asarray(exact), want)


def test_routing_sends_fewer_bytes_than_gspmd_s_lookup():
    """Rows and batch over all 8 devices (the pod layout of `train.bench_scaling --lookups`), 2,048 ids a device."""
    mesh = jax.make_mesh((1, 8), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
    table, ids = _inputs(mesh, rows=65536, n=16384, dim=32)

    cotangent = jax.ShapeDtypeStruct((16384, 32), jnp.float32, sharding=NamedSharding(mesh, P(("data", "model"))))

    def sent(gather):
        step = jax.jit(jax.grad(lambda t, i, c: jnp.sum(gather(t, i) * c)), out_shardings=table.sharding)
        program = step.lower(table, ids, cotangent).compile()
        return sum(c.wire_bytes for c in compiled.collectives(program.as_text(), 8))

    routed, gspmd = sent(lambda t, i: _routed(t, i, mesh)[0]), sent(lambda t, i: t[i])
    assert routed < gspmd / 2, (routed, gspmd)


def test_many_tables_travel_in_one_exchange(mesh):
    """Two tables of other sizes and a multi-valued field's ids: each gets its own rows, and the gradient program
    holds three all-to-alls (ids, vectors, the vectors' gradient), not three per table."""
    small, ids = _inputs(mesh)
    rng = np.random.default_rng(3)
    big = jax.device_put(jnp.asarray(rng.standard_normal((4096, 8)), jnp.float32), small.sharding)
    many = jax.device_put(jnp.asarray(rng.integers(0, 4096, (512 * 3,)), jnp.int32), ids.sharding)

    def loss(tables):
        vectors, _ = routed_lookup(tables, [ids, many], mesh)
        return sum(jnp.sum(v**2) for v in vectors)

    (a, b), _ = jax.jit(lambda t: routed_lookup(t, [ids, many], mesh))([small, big])
    np.testing.assert_array_equal(np.asarray(a), np.asarray(small)[np.asarray(ids)])
    np.testing.assert_array_equal(np.asarray(b), np.asarray(big)[np.asarray(many)])
    hlo = jax.jit(jax.grad(loss)).lower([small, big]).compile().as_text()
    assert [c.kind for c in compiled.collectives(hlo, 8)].count("all-to-all") == 3


def test_the_text_rows_a_batch_reads_are_routed_as_they_are_gathered():
    """With `model.lookup=all_to_all` on a mesh splitting the text table, the query, item and history texts come by
    one routed exchange (`FeatureEncoder.read_texts`): the same logits as plain gathers on one device, the content
    match and the history aspect included."""
    from helpers import TINY, config, model_inputs
    from sr_jax import model as sr_model, sharding as shd
    from sr_jax.data.history import COLUMN as HISTORY

    cfg = config(TINY, model={"lookup": "all_to_all", "lookup_capacity": 8.0, "user_history": 3}).model
    assert cfg.content_match and cfg.use_text
    ds, text, batch = model_inputs(64)
    history = np.random.default_rng(0).integers(-1, ds.meta.num_texts, (64, 3))
    batch = {**batch, HISTORY: jnp.asarray(history, jnp.int32)}
    graphdef, params = sr_model.init(cfg, ds.meta, text.pooled.shape[1])
    plain = sr_model.apply(graphdef, params, batch, text)[0]
    mesh = jax.make_mesh((1, 8), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
    params = jax.device_put(params, shd.replicated(mesh))
    text = sr_model.TextTable(*shd.text_table(mesh, *map(np.asarray, text), keep_summary=True))  # padded, strided
    batch = jax.device_put(batch, NamedSharding(mesh, P(("data", "model"))))
    with shd.model_context(mesh, shd.parse_rules(())):
        step = jax.jit(lambda p, b, t: sr_model.apply(graphdef, p, b, t)[0])
        routed = step(params, batch, text)
        hlo = step.lower(params, batch, text).compile().as_text()
    # ids and vectors of the tables, and of the texts (inference: no gradient); the text table never gathered whole
    assert len(re.findall(r" all-to-all\(", hlo)) == 4 and " all-gather(" not in hlo
    np.testing.assert_allclose(np.asarray(routed), np.asarray(plain), rtol=1e-5, atol=1e-5)


def test_text_vectors_joined_on_the_host_give_the_device_table_s_logits():
    """`data.text_join=host`: the batch carries its query, item, history and summary vectors (`join_texts`, zeros
    where a row is -1) and the model reads them, not the table: the same logits as the table's gathers, with cls
    gating (which reads the summary vectors), the history aspect and the content match on; a text table of zeros
    beside such a batch changes nothing."""
    from helpers import TINY, config, model_inputs
    from sr_jax import model as sr_model
    from sr_jax.data.history import COLUMN as HISTORY
    from sr_jax.data.pipeline import join_texts, joined

    cfg = config(TINY, model={"gating": "cls", "user_history": 3}).model
    ds, text, batch = model_inputs(64)
    rng = np.random.default_rng(0)
    batch = {**batch, HISTORY: jnp.asarray(rng.integers(-1, ds.meta.num_texts, (64, 3)), jnp.int32)}
    batch["query_text"] = batch["query_text"].at[::5].set(-1)  # some examples without a query text
    graphdef, params = sr_model.init(cfg, ds.meta, text.pooled.shape[1])
    table = sr_model.apply(graphdef, params, batch, text)[0]
    host = {"pooled": np.asarray(text.pooled), "summary": np.asarray(text.summary)}
    rows = join_texts({k: np.asarray(v) for k, v in batch.items()}, host)
    assert rows[joined(HISTORY, "pooled")].shape == (64, 3, text.pooled.shape[1])
    assert not rows[joined("query_text", "summary")][::5].any()
    np.testing.assert_array_equal(rows[joined("item_text", "pooled")], host["pooled"][np.asarray(batch["item_text"])])
    zeros = sr_model.TextTable(jnp.zeros((1, text.pooled.shape[1])), jnp.zeros((1, text.pooled.shape[1])))
    out = sr_model.apply(graphdef, params, {k: jnp.asarray(v) for k, v in rows.items()}, zeros)[0]
    np.testing.assert_allclose(np.asarray(out), np.asarray(table), rtol=1e-5, atol=1e-6)


def test_a_text_table_is_stored_strided_so_one_block_of_rows_never_fills_one_owner():
    """`sharding.text_rows` puts row r on shard r mod S (S = 8 here): a batch reading only the table's first
    rows (a catalogue's queries come first) reaches every owner evenly and drops nothing at capacity 2, and
    the model reads each row where it is stored, routed or gathered."""
    from sr_jax import sharding as shd
    from sr_jax.model.encoding import text_position

    mesh = jax.make_mesh((1, 8), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
    host = np.arange(100 * 4, dtype=np.float32).reshape(100, 4)  # row r holds 4r .. 4r + 3
    table = shd.text_rows(mesh, host)
    assert table.shape == (104, 4)  # padded to a multiple of the 8 shards
    for piece in table.addressable_shards:
        k = piece.index[0].start // 13
        want = np.concatenate([host[k::8], np.zeros((13 - len(host[k::8]), 4), np.float32)])
        np.testing.assert_array_equal(np.asarray(piece.data), want)
    ids = jax.device_put(jnp.asarray(np.arange(256) % 12, jnp.int32), NamedSharding(mesh, P(("data", "model"))))
    with shd.model_context(mesh, shd.parse_rules(())):
        stored = jax.jit(lambda i: text_position(i, 104))(ids)
        (vectors,), dropped = jax.jit(lambda t, i: routed_lookup([t], [i], mesh))(table, stored)
        assert int(dropped) == 0  # row order: all 12 rows on shard 0, 12 unique ids a device against a capacity of 8
        np.testing.assert_array_equal(np.asarray(vectors), host[np.asarray(ids)])
        gathered = jax.jit(lambda t, i: t[text_position(i, 104)])(table, ids)
    np.testing.assert_array_equal(np.asarray(gathered), host[np.asarray(ids)])
    assert np.asarray(text_position(jnp.array([-1, 0, 9]), 104)).tolist() == [-1, 0, 9]  # no mesh: the identity
