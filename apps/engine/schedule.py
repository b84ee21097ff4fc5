"""Learning-rate schedules: an optional linear warm-up multiplied by one of step, multi-step, cosine,
polynomial or cyclical (triangular) decay.

The whole schedule is one function of the optimizer-step count, applied through ``LambdaLR`` and stepped
after every optimizer step: warm-up composes with any schedule, the values are easy to test, and resuming
restores a single counter. Epoch-based settings are converted with ``steps_per_epoch``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch.optim.lr_scheduler import LambdaLR

from apps.config import TrainConfig

__all__ = ["lr_factor", "build_scheduler"]


def lr_factor(step: int, cfg: TrainConfig, steps_per_epoch: int) -> float:
    """Multiplier of each group's base lr for optimizer step ``step`` (0-based), in ``(0, 1]`` mostly.

    step: ``gamma ** (epoch // step_size)``; multistep: ``gamma ** (#milestones passed)``;
    cosine: ``m + (1 - m) * (1 + cos(pi * t)) / 2`` and poly: ``m + (1 - m) * (1 - t) ** power`` with
    ``t = step / total_steps`` and ``m = min_lr_ratio``; cyclic: a triangle from ``m`` up to 1 and back
    every ``cycle_epochs`` (Smith, "Cyclical learning rates", 2017). Warm-up multiplies the first
    ``warmup_iters`` steps by a factor rising linearly from ``warmup_factor`` to 1.
    """
    total = max(1, cfg.epochs * steps_per_epoch)
    m = cfg.min_lr_ratio
    if cfg.scheduler == "constant":
        factor = 1.0
    elif cfg.scheduler == "step":
        factor = cfg.gamma ** (step // max(1, cfg.step_size * steps_per_epoch))
    elif cfg.scheduler == "multistep":
        factor = cfg.gamma ** sum(step >= milestone * steps_per_epoch for milestone in cfg.milestones)
    elif cfg.scheduler == "cosine":
        t = min(step / total, 1.0)
        factor = m + (1.0 - m) * 0.5 * (1.0 + math.cos(math.pi * t))
    elif cfg.scheduler == "poly":
        t = min(step / total, 1.0)
        factor = m + (1.0 - m) * (1.0 - t) ** cfg.power
    elif cfg.scheduler == "cyclic":
        period = max(2, round(cfg.cycle_epochs * steps_per_epoch))
        x = (step % period) / period
        factor = m + (1.0 - m) * (1.0 - abs(2.0 * x - 1.0))
    else:
        raise ValueError(f"train.scheduler: unknown scheduler {cfg.scheduler!r}")
    if step < cfg.warmup_iters:
        alpha = step / cfg.warmup_iters
        factor *= cfg.warmup_factor + (1.0 - cfg.warmup_factor) * alpha
    return factor


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int) -> LambdaLR:
    """A per-optimizer-step scheduler; call ``.step()`` after each ``optimizer.step()``."""
    fn: Callable[[int], float] = lambda step: lr_factor(step, cfg, steps_per_epoch)
    return LambdaLR(optimizer, fn)
