"""The optimizer and learning-rate schedule a TrainConfig describes."""

from __future__ import annotations

import optax

from sr_jax.config import TrainConfig


def learning_rate(cfg: TrainConfig, total_steps: int) -> optax.Schedule:
    warmup = min(cfg.warmup_steps, max(total_steps - 1, 0))
    if cfg.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(
            0.0, cfg.learning_rate, warmup, max(total_steps, warmup + 1), end_value=0.01 * cfg.learning_rate
        )
    if cfg.schedule == "constant":
        return optax.join_schedules(
            [optax.linear_schedule(0.0, cfg.learning_rate, warmup), optax.constant_schedule(cfg.learning_rate)],
            [warmup],
        )
    raise ValueError(f"train.schedule={cfg.schedule!r}: expected cosine or constant")


def build_optimizer(cfg: TrainConfig, total_steps: int) -> optax.GradientTransformation:
    lr = learning_rate(cfg, total_steps)
    optimizers = {
        "adam": lambda: optax.adam(lr),
        "adamw": lambda: optax.adamw(lr, weight_decay=cfg.weight_decay),
        "adagrad": lambda: optax.adagrad(lr),
        "sgd": lambda: optax.sgd(lr, momentum=0.9),
    }
    if cfg.optimizer not in optimizers:
        raise ValueError(f"train.optimizer={cfg.optimizer!r}: expected one of {sorted(optimizers)}")
    clip = [optax.clip_by_global_norm(cfg.grad_clip)] if cfg.grad_clip > 0 else []
    return optax.chain(*clip, optimizers[cfg.optimizer]())
