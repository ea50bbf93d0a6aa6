"""A run's program: the model, the optimizer policy and the jitted steps a config defines on a mesh, built
before any data or parameters exist (`build_program`), and the train step compiled ahead for a batch's
shapes (`compile_train_step`), after its memory per device is checked."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from typing import Any

import jax
import optax
from flax import nnx
from jax.sharding import Mesh

from sr_jax import memory
from sr_jax import model as sr_model
from sr_jax import sharding as shd
from sr_jax.config import Config, validate
from sr_jax.data.schema import DatasetMeta
from sr_jax.model import rows
from sr_jax.training import sparse_update
from sr_jax.training.optimizer import (
    build_optimizer,
    check_levels,
    fresh_parts,
    guard,
    learning_rate,
    param_roles,
)
from sr_jax.training.steps import (
    StepConfig,
    TrainState,
    init_state,
    make_predict_step,
    make_train_step,
    state_shardings,
)
from sr_jax.training.transfer import NewRows

log = logging.getLogger("sr_jax")


@dataclasses.dataclass(frozen=True)
class Program:
    """The model, optimizer and to-be-compiled steps for a config, on a mesh (no data needed)."""

    graphdef: nnx.GraphDef
    per_domain: Any  # tree of bools like params: leaves whose first axis indexes domains
    roles: Any  # tree like params: what the optimizer does with each leaf (optimizer.param_roles)
    embedding_update: str  # the row-sparse rule the step applies, or dense (frozen tables; routed row-wise Adagrad)
    trainable_rows: dict | None  # a frozen L0's new rows, the only ones the rule updates (else None: all)
    tx: optax.GradientTransformation
    abstract_state: TrainState  # shapes, dtypes and shardings of the train state
    train_step: Callable  # (state, batch, text, reference) -> (state, metrics)
    # (params, batch, text, trained=None, calibration=None) -> {"logit", "calibrated_logit", "probability"} [B]
    predict: Callable
    adapted: Callable  # (params, batch, text) -> z [B, 3d], the Domain Adaptive Layer's output (L_reg aligns it)

    @property
    def state_shardings(self) -> TrainState:
        return jax.tree.map(lambda a: a.sharding, self.abstract_state)


def build_program(
    cfg: Config,
    meta: DatasetMeta,
    text_dim: int,
    mesh: Mesh,
    total_steps: int,
    new_domains: tuple[int, ...] = (),
    new_rows: NewRows | None = None,
    new_leaves: frozenset[str] = frozenset(),
) -> Program:
    """Fine-tuning's new domains, new table rows and new leaves (a new field's) stay trainable inside frozen
    levels."""
    validate(cfg)
    graphdef, params = sr_model.abstract(cfg.model, meta, text_dim)
    per_domain = sr_model.per_domain(cfg.model, meta, text_dim, params)
    rows_only = new_rows is not None and new_rows.any and "l0" in check_levels(cfg.finetune.freeze)
    layout = rows.layout(cfg.model)
    trainable_rows = {k: rows.stored(m, *layout) for k, m in new_rows.mask.items()} if rows_only else None
    rule = sparse_update.effective_rule(cfg.train.embedding_update, cfg.finetune.freeze, rows_only)
    # routed lookups give each device its own rows' dense gradient: row-wise Adagrad runs in its dense form there
    rowwise = rule == "rowwise_adagrad" and cfg.model.lookup == "all_to_all" and not rows_only
    rule = "dense" if rowwise else rule
    roles = param_roles(
        params,
        cfg.finetune.freeze,
        per_domain,
        new_domains,
        sparse_tables=rule != "dense",
        stats=sr_model.stats_mask(graphdef, params),
        has_new_rows=rows_only,
        new_leaves=new_leaves,
        rowwise_tables=rowwise,
    )
    tune = cfg.finetune
    guarded = ([], [])
    if tune.pretrained and (tune.probe_steps or tune.pretrained_lr != 1.0 or tune.l2sp_weight):
        fresh = fresh_parts(params, roles, per_domain, new_domains, new_rows, new_leaves)
        guarded = guard(fresh, tune.probe_steps, tune.pretrained_lr, tune.l2sp_weight)
    tx = build_optimizer(cfg.train, total_steps, roles, new_domains, guarded)
    shapes = jax.eval_shape(lambda p: init_state(p, roles, tx, rule, trainable_rows), params)
    rules = shd.parse_rules(cfg.mesh.rules)
    shardings = state_shardings(mesh, shapes, rules)
    train = cfg.train
    sparse = None
    if rule != "dense":
        sparse = (rule, learning_rate(train, total_steps, peak=train.embedding_learning_rate or train.learning_rate))
    step_cfg = StepConfig(
        graphdef, tx, roles, cfg.model.reg_weight, train.seed, train.grad_clip, new_domains, sparse, train.grad_accum
    )
    step = make_train_step(step_cfg, mesh, shardings, rules)
    return Program(
        graphdef=graphdef,
        per_domain=per_domain,
        roles=roles,
        embedding_update=rule,
        trainable_rows=trainable_rows,
        tx=tx,
        abstract_state=jax.tree.map(
            lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings
        ),
        train_step=step,
        predict=make_predict_step(graphdef, mesh, shardings.params, meta.num_domains, rules=rules),
        adapted=make_predict_step(graphdef, mesh, shardings.params, meta.num_domains, output="adapted", rules=rules),
    )


def compile_train_step(program: Program, batch: Any, text: sr_model.TextTable, reference, what: str):
    """The train step compiled ahead for these batch shapes, after its memory per device is logged and
    checked (`memory.check`: a step that cannot fit fails here, before anything is allocated).
    -> (compiled step, memory estimate, compile seconds)"""
    start = time.perf_counter()
    compiled = program.train_step.lower(program.abstract_state, batch, text, reference).compile()
    seconds = time.perf_counter() - start
    estimate = memory.estimate(program.abstract_state, (batch, text, reference), compiled)
    log.info("train step compiled in %.1f s; memory per device:\n%s", seconds, estimate.table())
    memory.check(estimate, what)
    return compiled, estimate, seconds
