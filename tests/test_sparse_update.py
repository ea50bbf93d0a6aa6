"""Row-sparse embedding updates equal the dense math where it says they must."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from helpers import TINY, config
from sr_jax import model as sr_model
from sr_jax.data.pipeline import BatchIterator
from sr_jax.training import loop, restore, sparse_update, trainer
from sr_jax.training.optimizer import SPARSE, TRAIN, build_optimizer, learning_rate, param_roles
from sr_jax.sharding import ROW_SHARDED
from sr_jax.training.steps import StepConfig, init_state, loss_fn, make_train_step, state_shardings
from sr_jax.treeutil import path_names

STEPS = 4


def _world(tmp_path, rule):
    cfg = config(TINY, train={"embedding_update": rule, "learning_rate": 0.01, "warmup_steps": 2, "grad_clip": 0.5})
    run = trainer.build_run(cfg, tmp_path)
    params = sr_model.init_params(cfg.model, run.spec.dataset.meta, run.spec.text.pooled.shape[1], seed=0)
    batches = [jax.device_put(b) for _, b in zip(range(STEPS), BatchIterator(run.spec.train_columns, 256, seed=0))]
    return cfg, run, params, batches


def _is_table(path) -> bool:
    return path_names(path)[1] in ROW_SHARDED


def _run(step, state, batches, text):
    for batch in batches:
        state, _ = step(state, batch, text, None)
    return state


def _close(a, b, **tol):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), **tol), a, b)


def test_gradient_of_the_gathered_rows_is_the_dense_gradient_of_those_rows(tmp_path):
    cfg, run, params, (batch, *_) = _world(tmp_path, "lazy_adam")
    grad = jax.jit(
        jax.grad(
            lambda p, rows: loss_fn(run.spec.program.graphdef, p, batch, run.spec.text, 0.05, table_rows=rows),
            has_aux=True,
        )
    )
    dense = grad(params, None)[0]
    gathered = sparse_update.gather(params, sr_model.table_rows(run.spec.program.graphdef, params, batch))
    small = sparse_update.with_tables(params, gathered.embeddings)
    sparse = grad(small, gathered.inverse)[0]
    touched_any = False
    for key, table_grad in sparse_update.tables(dense).items():
        g, u = np.asarray(sparse_update.tables(sparse)[key]), np.asarray(gathered.uniq[key])
        real = u < table_grad.shape[0]
        assert len(np.unique(u[real])) == real.sum()  # distinct rows; the rest is padding
        np.testing.assert_array_equal(g[~real], 0)
        scattered = np.zeros(table_grad.shape, np.float32)
        scattered[u[real]] = g[real]
        np.testing.assert_allclose(scattered, np.asarray(table_grad), rtol=1e-5, atol=1e-7)
        touched_any |= bool(np.abs(g).sum() > 0)
    assert touched_any
    rest = lambda tree: sparse_update.with_tables(tree, {k: None for k in gathered.uniq})  # noqa: E731
    _close(rest(dense), rest(sparse), rtol=1e-5, atol=1e-7)


def _dense_rowwise_adagrad(schedule) -> optax.GradientTransformation:
    """The rule written densely over the whole table, as the reference."""

    def init(params):
        return (jnp.zeros((), jnp.int32), jax.tree.map(lambda p: jnp.zeros(p.shape[:1]), params))

    def update(g, state, params=None):
        count, acc = state
        acc = jax.tree.map(lambda a, x: a + jnp.mean(x * x, -1), acc, g)
        lr = schedule(count)
        u = jax.tree.map(lambda x, a: -lr * x / (jnp.sqrt(a) + sparse_update.ADAGRAD_EPS)[:, None], g, acc)
        return u, (count + 1, acc)

    return optax.GradientTransformation(init, update)


@pytest.mark.parametrize("rule", ["rowwise_adagrad", "lazy_adam"])
def test_sparse_step_equals_the_dense_rule(tmp_path, rule):
    """rowwise_adagrad: the whole state equals the dense rule's after several steps (untouched rows have
    zero gradient, so the dense rule leaves them alone too). lazy_adam: every parameter equals dense
    Adam's while every step touches the same rows (one step, or one batch repeated); over distinct
    batches the rows no step touched keep their start values and zero moments (dense Adam's momentum
    would move rows touched earlier, which lazy Adam by design does not)."""
    cfg, run, params, batches = _world(tmp_path, rule)
    total = 100
    schedule = learning_rate(cfg.train, total)
    per_domain = jax.tree.map(lambda _: False, params)
    sparse_labels = param_roles(params, (), per_domain, (), sparse_tables=True)
    assert {
        path_names(p)[1] for p, label in jax.tree_util.tree_leaves_with_path(sparse_labels) if label == SPARSE
    } == set(ROW_SHARDED)
    tx_sparse = build_optimizer(cfg.train, total, sparse_labels)
    sparse_step = _step(run, params, sparse_labels, tx_sparse, rule, (rule, schedule))
    table_rule = _dense_rowwise_adagrad(schedule) if rule == "rowwise_adagrad" else optax.adam(schedule)
    dense_labels = jax.tree_util.tree_map_with_path(lambda p, _: "table" if _is_table(p) else "rest", params)
    tx_dense = optax.chain(
        optax.clip_by_global_norm(cfg.train.grad_clip),
        optax.multi_transform({"table": table_rule, "rest": optax.adam(schedule)}, dense_labels),
    )
    all_train = jax.tree.map(lambda _: TRAIN, params)
    dense_step = _step(run, params, all_train, tx_dense, "dense", None)

    def both(steps):
        fresh = lambda: jax.tree.map(jnp.copy, params)  # noqa: E731  (the steps donate their state)
        s = _run(sparse_step, init_state(fresh(), sparse_labels, tx_sparse, rule), steps, run.spec.text)
        d = _run(dense_step, init_state(fresh(), all_train, tx_dense), steps, run.spec.text)
        return s, d

    if rule == "rowwise_adagrad":
        s, d = both(batches)
        _close(s.params, d.params, rtol=2e-5, atol=2e-6)
        dense_acc = sparse_update.tables(d.opt_state[1].inner_states["table"].inner_state[1])
        sparse_acc = {(g, n): state["acc"] for g, by_name in s.tables_state.items() for n, state in by_name.items()}
        _close(sparse_acc, dense_acc, rtol=1e-5, atol=1e-9)
        return
    s, d = both([batches[0]])
    _close(s.params, d.params, rtol=2e-5, atol=2e-6)
    s, d = both([batches[0]] * STEPS)  # every step touches the same rows: lazy == dense on every row
    _close(s.params, d.params, rtol=2e-5, atol=2e-6)
    s, _ = both(batches)
    never_touched = 0
    for key, start in sparse_update.tables(jax.tree.map(np.asarray, params)).items():
        touched = set().union(*(set(np.asarray(r).ravel()) for r in _rows(run, params, batches, key)))
        never = sorted(set(range(start.shape[0])) - touched)
        np.testing.assert_array_equal(np.asarray(sparse_update.tables(s.params)[key])[never], start[never])
        np.testing.assert_array_equal(np.asarray(s.tables_state[key[0]][key[1]]["mu"])[never], 0)
        never_touched += len(never)
    assert never_touched > 0  # such rows exist in this world


def _step(run, params, labels, tx, rule, sparse):
    shapes = jax.eval_shape(lambda: init_state(params, labels, tx, rule))
    shardings = state_shardings(run.spec.mesh, shapes)
    step_cfg = StepConfig(run.spec.program.graphdef, tx, labels, 0.05, seed=0, grad_clip=0.5, sparse=sparse)
    return make_train_step(step_cfg, run.spec.mesh, shardings)


def _rows(run, params, batches, key):
    return [sr_model.table_rows(run.spec.program.graphdef, params, b)[key] for b in batches]


def test_frozen_tables_take_no_update_under_a_sparse_rule(tmp_path):
    assert sparse_update.effective_rule("lazy_adam", ("L0",)) == "dense"
    assert sparse_update.effective_rule("lazy_adam", ("l1",)) == "lazy_adam"
    cfg = config(TINY, train={"embedding_update": "rowwise_adagrad"}, finetune={"freeze": ("l0",)})
    run = trainer.build_run(cfg, tmp_path)
    start = restore.initial_state(run.spec)
    before = jax.tree.map(np.asarray, sparse_update.tables(start.params))
    state = loop.train(run, start, until=3)
    assert run.spec.program.embedding_update == "dense" and state.tables_state == {}
    jax.tree.map(np.testing.assert_array_equal, before, jax.tree.map(np.asarray, sparse_update.tables(state.params)))


def test_a_sparse_rule_trains_a_useful_model(tmp_path):
    cfg = config(TINY, train={"epochs": 2.0, "embedding_update": "rowwise_adagrad", "embedding_learning_rate": 0.05})
    result = trainer.fit(cfg, tmp_path)
    assert result["overall"]["auc"] > 0.6, result["overall"]  # a constant predictor scores 0.5
