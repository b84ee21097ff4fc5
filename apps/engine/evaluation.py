"""Evaluation during training: the validation split scored by the task after an epoch, for the model and
its EMA; the ``val`` record, ``best.pt`` on a better primary metric, and early stopping (``train.patience``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from apps.engine.checkpointing import Counters, RunCheckpoints
from apps.engine.loader import UnreadableImageError, eval_loader
from apps.engine.logging import RunLogger
from apps.engine.step import TrainingError

__all__ = ["Validation"]


class Validation:
    """Scores the model on ``dataset`` and keeps the run's best. Every process calls :meth:`run` (the task's
    evaluator reduces over them; saving best.pt gathers nothing but is written by rank 0 only)."""

    def __init__(self, task: Any, dataset: Dataset, *, models: list[tuple[str, nn.Module]],
                 classes: list[dict[str, Any]], device: torch.device, loader_args: dict[str, Any],
                 patience: int | None, counters: Counters, checkpoints: RunCheckpoints, log: RunLogger,
                 world_size: int) -> None:
        self.task, self.dataset, self.models, self.classes = task, dataset, models, classes
        self.device = device
        self.loader_args, self.patience, self.counters = loader_args, patience, counters
        self.checkpoints, self.log, self.world_size = checkpoints, log, world_size
        # with an EMA, its weights are what the run selects on
        self.key = ("ema_" if len(models) > 1 else "") + task.primary_metric

    def evaluate(self) -> dict[str, float]:
        """Metrics of every model (the EMA's prefixed ``ema_``); the models are left in training mode."""
        loader = eval_loader(self.dataset, self.task.collate, **self.loader_args)
        metrics: dict[str, float] = {}
        for prefix, model in self.models:
            model.eval()
            try:
                with torch.inference_mode():
                    result = self.task.evaluate(model, loader, self.device, self.classes)
            except UnreadableImageError:
                if self.world_size == 1:  # the epoch's training is whole: keep it (resumable)
                    self.checkpoints.save_last()
                raise
            metrics.update({f"{prefix}{k}": float(v) for k, v in result.items()})
        warnings = self.loader_args.get("data_warnings")
        for line in warnings.lines() if warnings is not None else []:  # one line per pattern, not per image
            self.log.warning(f"validation: {line}")
        self.models[0][1].train()
        return metrics

    def run(self, epoch: int, where: str) -> bool:
        """Evaluate after ``epoch`` (``where``: how far the run is, for the log line); True to stop early."""
        metrics = self.evaluate()
        c = self.counters
        c.metrics = metrics
        self.log.record("val", step=c.step, epoch=epoch + 1, values=metrics)
        if self.key not in metrics:
            raise TrainingError(f"the {self.task.name} evaluator returned no {self.key!r} "
                                f"(got {sorted(metrics)})")
        value = metrics[self.key]
        summary = "  ".join(f"{k} {v:.4f}" for k, v in metrics.items() if "/" not in k)
        self.log.info(f"epoch {epoch + 1}{where} validation: {summary}")
        if c.best is None or value > c.best:
            c.best, c.bad_evals = value, 0
            path = self.checkpoints.save_best(metrics)
            self.log.info(f"new best {self.key} {value:.4f}: {path}")
            return False
        c.bad_evals += 1
        if self.patience is not None and c.bad_evals >= self.patience:
            self.log.info(f"early stopping: {self.key} has not improved for {c.bad_evals} evaluations "
                          f"(best {c.best:.4f})")
            return True
        return False

