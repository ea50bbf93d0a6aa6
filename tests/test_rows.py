"""Where tables store their rows (`model.row_layout`, sr_jax/model/rows.py): strided storage is a permutation that
spreads every range of rows over every shard, so the routed lookup drops nothing at its default capacity for a
fine-tune's batch of appended rows or a popularity-ordered vocabulary's Zipf ids, and the model reads the same
rows whatever the layout."""

import dataclasses

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from helpers import TINY, config, model_inputs
from sr_jax import model as sr_model
from sr_jax.bench.world import draw_ids
from sr_jax.model import rows
from sr_jax.model.lookup import routed_lookup
from sr_jax.training import sparse_update

M, MULTIPLE = 8, 64  # shards, model.table_row_multiple


def test_strided_storage_is_a_permutation_that_spreads_every_range_of_rows():
    r = 4096
    at = rows.position(np.arange(r), r, MULTIPLE, "strided")
    assert sorted(at.tolist()) == list(range(r)) and at[0] == 0  # a permutation; row 0 (missing) stays put
    owner = at // (r // M)  # contiguous blocks of stored rows per shard
    for start in (0, 1000, r - MULTIPLE):  # any 64 consecutive rows: 8 on each of the 8 shards
        assert np.bincount(owner[start : start + MULTIPLE], minlength=M).tolist() == [MULTIPLE // M] * M
    table = np.random.default_rng(0).standard_normal((r, 3))
    stored = rows.stored(table, MULTIPLE, "strided")
    np.testing.assert_array_equal(stored[at], table)  # row i is stored at position(i)
    np.testing.assert_array_equal(rows.row_order(stored, MULTIPLE, "strided"), table)
    assert rows.stored(table, MULTIPLE, "contiguous") is table
    np.testing.assert_array_equal(rows.position(np.arange(r), r, MULTIPLE, "contiguous"), np.arange(r))


@pytest.mark.parametrize("ids", ["zipf", "new-rows-last"])
def test_no_lookup_drops_at_the_default_capacity_when_rows_are_strided(ids):
    """A 1 x 8 mesh, the table over `model`, the batch over both axes (the pod layout): skewed ids lose lookups
    when rows are stored in order, none when strided, and the routed vectors are the table's rows either way."""
    mesh = jax.make_mesh((1, M), ("data", "model"))
    r, n = 65_536, 8 * 512
    table = np.random.default_rng(1).standard_normal((r, 4)).astype(np.float32)
    ids = draw_ids(np.random.default_rng(2), r, (n,), ids)
    dropped = {}
    for layout in ("contiguous", "strided"):
        stored = jax.device_put(rows.stored(table, MULTIPLE, layout), NamedSharding(mesh, P("model", None)))
        at = jax.device_put(rows.position(ids, r, MULTIPLE, layout), NamedSharding(mesh, P(("data", "model"))))
        (vectors,), lost = jax.jit(lambda t, i: routed_lookup([t], [i], mesh, capacity_factor=2.0))(stored, at)
        dropped[layout] = int(lost)
        if not dropped[layout]:
            np.testing.assert_array_equal(np.asarray(vectors), table[ids])
    assert dropped["contiguous"] > 100 and dropped["strided"] == 0, dropped  # (unique ids a device dropped)


def test_the_model_reads_the_same_rows_whatever_the_layout():
    """The same tables (in row order), stored contiguously or strided: the same logits."""
    cfg = config(TINY).model
    ds, text, batch = model_inputs()
    graphdef, params = sr_model.init(dataclasses.replace(cfg, row_layout="contiguous"), ds.meta, text.pooled.shape[1])
    strided, _ = sr_model.init(dataclasses.replace(cfg, row_layout="strided"), ds.meta, text.pooled.shape[1])
    assert params["l0"]["id_tables"]["item"].shape[0] > MULTIPLE  # a table the layout permutes
    stored = sparse_update.map_tables(params, lambda t: rows.stored(t, MULTIPLE, "strided"))
    np.testing.assert_allclose(
        np.asarray(sr_model.apply(strided, stored, batch, text)[0]),
        np.asarray(sr_model.apply(graphdef, params, batch, text)[0]),
        rtol=1e-6,
        atol=1e-6,
    )
    moved = np.asarray(sr_model.apply(strided, params, batch, text)[0])  # row-order tables read as strided
    assert not np.allclose(moved, np.asarray(sr_model.apply(graphdef, params, batch, text)[0]))
