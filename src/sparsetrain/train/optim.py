"""Optimizers and learning-rate schedules by name, built from a :class:`TrainConfig`.

Every schedule is a pure function of the iteration (a ``LambdaLR``), so its state is the step
count alone and a resumed run continues exactly.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from ..config import TrainConfig
from ..errors import SparsetrainError
from ..registry import Registry

OPTIMIZERS = Registry("optimizer")
SCHEDULES = Registry("schedule")


@OPTIMIZERS.register("sgd")
def _sgd(params, cfg: TrainConfig):
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov, weight_decay=cfg.weight_decay)


@OPTIMIZERS.register("adam")
def _adam(params, cfg: TrainConfig):
    return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


@OPTIMIZERS.register("adamw")
def _adamw(params, cfg: TrainConfig):
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


@SCHEDULES.register("constant")
def _constant(cfg: TrainConfig, total: int) -> Callable[[int], float]:
    return lambda step: 1.0


@SCHEDULES.register("step")
def _step(cfg: TrainConfig, total: int) -> Callable[[int], float]:
    if cfg.decay_every <= 0:
        raise SparsetrainError("schedule 'step' needs decay_every > 0 (iterations between decays)")
    return lambda step: cfg.decay_factor ** (step // cfg.decay_every)


@SCHEDULES.register("linear")
def _linear(cfg: TrainConfig, total: int) -> Callable[[int], float]:
    return lambda step: 1.0 - (1.0 - cfg.end_lr_factor) * min(step, total) / total


@SCHEDULES.register("linear-then-constant")
def _linear_then_constant(cfg: TrainConfig, total: int) -> Callable[[int], float]:
    """Linear from lr to ``end_lr_factor`` * lr over ``decay_every`` steps, then constant: TF's
    ``polynomial_decay(power=1, cycle=False)``, the decay effect-dps-public searches over."""
    if cfg.decay_every <= 0:
        raise SparsetrainError("schedule 'linear-then-constant' needs decay_every > 0 (the steps of the decay)")
    return lambda step: 1.0 - (1.0 - cfg.end_lr_factor) * min(step, cfg.decay_every) / cfg.decay_every


@SCHEDULES.register("cosine")
def _cosine(cfg: TrainConfig, total: int) -> Callable[[int], float]:
    end = cfg.end_lr_factor
    return lambda step: end + (1.0 - end) * 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))


def build_optimizer(params, cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.lr <= 0:
        raise SparsetrainError(f"learning rate must be positive, got {cfg.lr}")
    return OPTIMIZERS.create(cfg.optimizer, params, cfg)


def build_schedule(optimizer: torch.optim.Optimizer, cfg: TrainConfig, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, SCHEDULES.create(cfg.schedule, cfg, total))


def total_iterations(cfg: TrainConfig, steps_per_epoch: int) -> int:
    if (cfg.iterations > 0) == (cfg.epochs > 0):
        raise SparsetrainError(
            "give the training length as exactly one of iterations or epochs "
            f"(got iterations={cfg.iterations}, epochs={cfg.epochs})"
        )
    return cfg.iterations if cfg.iterations > 0 else max(1, round(cfg.epochs * steps_per_epoch))
