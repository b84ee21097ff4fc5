"""Exponential moving average of the weights, on top of ``torch.optim.swa_utils.AveragedModel``.

``ema = d * ema + (1 - d) * weights`` after every optimizer step, buffers (BatchNorm statistics) included.
The decay ramps up as ``d = min(decay, (1 + n) / (10 + n))`` after ``n`` updates (the TensorFlow
ExponentialMovingAverage rule), so early averages are not dominated by the random initial weights.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel

__all__ = ["ModelEMA"]


class ModelEMA:
    """EMA copy of a model; ``module`` is the averaged model (same class and state-dict keys)."""

    def __init__(self, model: nn.Module, decay: float = 0.9998) -> None:
        self.decay = decay
        self.averaged = AveragedModel(model, multi_avg_fn=self._update, use_buffers=True)
        self.averaged.requires_grad_(False)
        self.averaged.eval()

    @property
    def module(self) -> nn.Module:
        return self.averaged.module

    @property
    def updates(self) -> int:
        return int(self.averaged.n_averaged)

    def current_decay(self, updates: int) -> float:
        return min(self.decay, (1.0 + updates) / (10.0 + updates))

    @torch.no_grad()
    def _update(self, ema: list[Tensor], current: list[Tensor], num_averaged: Tensor | int) -> None:
        # AveragedModel copies the weights on the first update and calls this from the second on.
        d = self.current_decay(int(num_averaged))
        for e, c in zip(ema, current, strict=True):
            if e.is_floating_point():
                e.lerp_(c, 1.0 - d)
            else:  # integer buffers (num_batches_tracked) just follow the model
                e.copy_(c)

    def update(self, model: nn.Module) -> None:
        """Fold ``model``'s current weights (an unwrapped module, not DDP) into the average."""
        self.averaged.update_parameters(model)

    def state_dict(self) -> dict[str, Any]:
        """The averaged model's own state dict: loadable into the model class as is."""
        return self.module.state_dict()

    def load_state_dict(self, state: dict[str, Any], updates: int) -> None:
        self.module.load_state_dict(state)
        self.averaged.n_averaged.fill_(updates)
