"""The compiled-program reader (`sr_jax.bench.compiled`) on programs whose collectives are known: a gradient
summed over the data axis, a batch gathered over some axes of a mesh, a table lookup split by rows."""

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from sr_jax.bench import compiled


def _mesh(shape, names):
    return jax.make_mesh(shape, names, axis_types=(AxisType.Auto,) * len(shape))  # as sr-jax's (GSPMD)


def _collectives(fn, *args, out=None):
    program = jax.jit(fn, out_shardings=out).lower(*args).compile()
    return compiled.collectives(program.as_text(), jax.device_count())


def test_a_gradient_summed_over_the_data_axis_is_one_all_reduce_of_that_axis():
    mesh = _mesh((4, 2), ("data", "model"))
    x = jax.ShapeDtypeStruct((1024, 64), jnp.float32, sharding=NamedSharding(mesh, P("data")))
    w = jax.ShapeDtypeStruct((64, 32), jnp.float32, sharding=NamedSharding(mesh, P()))
    found = _collectives(lambda x, w: jax.grad(lambda w: (x @ w).sum())(w), x, w, out=NamedSharding(mesh, P()))
    assert [(c.kind, c.group) for c in found] == [("all-reduce", 4)]
    (reduce,) = found
    assert reduce.bytes == 64 * 32 * 4
    assert reduce.wire_bytes == pytest.approx(2 * 3 / 4 * 64 * 32 * 4)


@pytest.mark.parametrize("axes, group", [(("a", "c"), 4), ("b", 2)])
def test_a_gather_names_the_devices_of_its_axes(axes, group):
    mesh = _mesh((2, 2, 2), ("a", "b", "c"))
    y = jax.ShapeDtypeStruct((1024, 64), jnp.float32, sharding=NamedSharding(mesh, P(axes)))
    found = _collectives(lambda y: y * 2, y, out=NamedSharding(mesh, P()))
    assert [(c.kind, c.group, c.bytes) for c in found] == [("all-gather", group, 1024 * 64 * 4)]
    assert found[0].wire_bytes == pytest.approx((group - 1) / group * 1024 * 64 * 4)


def test_a_row_sharded_lookup_costs_one_device_its_rows_and_the_batch_s_vectors():
    mesh = _mesh((1, 8), ("data", "model"))
    table = jax.ShapeDtypeStruct((8192, 32), jnp.float32, sharding=NamedSharding(mesh, P("model")))
    ids = jax.ShapeDtypeStruct((512,), jnp.int32, sharding=NamedSharding(mesh, P()))
    program = jax.jit(lambda t, i: t[i], out_shardings=NamedSharding(mesh, P())).lower(table, ids).compile()
    found = compiled.collectives(program.as_text(), 8)
    assert {c.kind for c in found} <= {"all-reduce", "all-gather", "reduce-scatter", "all-to-all"}
    assert sum(c.wire_bytes for c in found) >= 7 / 8 * 512 * 32 * 4  # the vectors cross the model axis
    flops, accessed = compiled.step_cost(program)
    assert accessed < 8192 * 32 * 4  # a device reads its rows, not the table


def test_a_combined_all_reduce_of_many_gradients_counts_every_one():
    """XLA joins gradients into one all-reduce whose result is a tuple, with `/*index=5*/` comments in it."""
    shapes = ", ".join(f"{'/*index=5*/' if i == 5 else ''}f32[100,32]{{1,0}}" for i in range(7))
    line = (
        f"  %all-reduce.68 = ({shapes}) all-reduce(%a, %b), channel_id=9, "
        "replica_groups=mesh['axis_0'=1,'axis_1'=8] {'axis_1'}, use_global_device_ids=true, to_apply=%add"
    )
    (found,) = compiled.collectives(line, 8)
    assert (found.kind, found.group, found.bytes) == ("all-reduce", 8, 7 * 100 * 32 * 4)


def test_kernels_counts_the_entry_computation_s_launches_not_its_names_and_views():
    hlo = """HloModule m

%fused (p: f32[8]) -> f32[8] {
  %p = f32[8]{0} parameter(0)
  ROOT %e = f32[8]{0} exponential(%p)
}

ENTRY %main (a: f32[8], b: f32[8,8]) -> (f32[8], f32[8]) {
  %a = f32[8]{0} parameter(0)
  %b = f32[8,8]{1,0} parameter(1)
  %c = f32[] constant(1)
  %v = f32[8]{0} bitcast(%a)
  %f = f32[8]{0} fusion(%v), kind=kLoop, calls=%fused
  %d = f32[8]{0} dot(%b, %f), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  %r = f32[8]{0} all-reduce(%d), replica_groups={}, to_apply=%fused
  %k = f32[8]{0} copy(%r)
  ROOT %t = (f32[8]{0}, f32[8]{0}) tuple(%k, %f)
}
"""
    assert compiled.kernels(hlo) == 4  # fusion, dot, all-reduce, copy: not the fused computation's exponential
    program = jax.jit(lambda x: jnp.exp(x) @ x.T).lower(jnp.ones((8, 8))).compile()
    assert compiled.kernels(program.as_text()) >= 1
