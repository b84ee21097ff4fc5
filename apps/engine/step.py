"""One batch forward and backward, and the optimizer step that closes each accumulation window.

A batch runs under autocast (``train.amp``, apps/engine/precision.py) and its loss, scaled for float16 and
divided by ``train.accum_steps``, is propagated back; DDP synchronises gradients on a window's last batch
only. A non-finite loss (on any rank: all ranks take the same branch) is not propagated, and the batch-norm
statistics it moved are put back. The optimizer step unscales and clips the gradients, applies them, and
advances the learning rate and the EMA; a float16 overflow makes the scaler skip it.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn

from apps.engine.ema import ModelEMA
from apps.engine.logging import RunLogger

__all__ = ["TrainingError", "BatchResult", "Stepper"]


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. repeated non-finite losses); a checkpoint of the last good state exists."""


class BatchResult:
    """A batch's loss, its parts, and whether it was finite on every rank (then it was propagated)."""

    def __init__(self, loss: torch.Tensor, losses: dict[str, torch.Tensor], finite: bool) -> None:
        self.loss, self.losses, self.finite = loss, losses, finite


class Stepper:
    """Forward/backward of batches and optimizer steps for one model (``ddp``: the model as trained, DDP
    wrapped or not; :attr:`ddp` is set again when the model is wrapped again)."""

    def __init__(self, model: nn.Module, *, optimizer: torch.optim.Optimizer, scheduler: Any,
                 scaler: torch.amp.GradScaler, ema: ModelEMA | None, amp_dtype: torch.dtype | None,
                 accum_steps: int, grad_clip: float | None, device: torch.device, world_size: int,
                 log: RunLogger) -> None:
        self.model, self.ddp, self.device = model, model, device
        self.optimizer, self.scheduler, self.scaler, self.ema = optimizer, scheduler, scaler, ema
        self.amp_dtype, self.accum_steps, self.grad_clip = amp_dtype, accum_steps, grad_clip
        self.world_size, self.log = world_size, log

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def forward_backward(self, images: Any, targets: Any, *, sync: bool) -> BatchResult:
        """One batch; ``sync``: the last of its window (DDP all-reduces the gradients)."""
        buffers = [b.detach().clone() for b in self.model.buffers()]
        no_sync = not sync and self.ddp is not self.model
        with self.ddp.no_sync() if no_sync else contextlib.nullcontext():
            with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                                enabled=self.amp_dtype is not None):
                _, losses = self.ddp(images, targets)
            loss = sum(losses.values())
            finite = self._finite_everywhere(loss)
            if finite:
                self.scaler.scale(loss / self.accum_steps).backward()
        if not finite:
            with torch.no_grad():  # BatchNorm statistics saw the bad batch
                for buffer, value in zip(self.model.buffers(), buffers, strict=True):
                    buffer.copy_(value)
        return BatchResult(loss, losses, finite)

    def drop_window(self) -> None:
        """Forget the gradients of the window so far (after a non-finite batch)."""
        self.optimizer.zero_grad(set_to_none=True)

    def _finite_everywhere(self, loss: torch.Tensor) -> bool:
        # every rank must take the same branch, or DDP's gradient all-reduce would wait forever
        flag = torch.isfinite(loss.detach()).float().reshape(1)
        if self.world_size > 1:
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
        return bool(flag.item())

    def step(self, step: int) -> bool:
        """The optimizer step after ``step`` steps; False when it was skipped (non-finite gradient norm,
        float16 overflow)."""
        self.scaler.unscale_(self.optimizer)
        if self.grad_clip is not None:
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
            if not torch.isfinite(norm) and not self.scaler.is_enabled():
                self.log.warning(f"non-finite gradient norm at step {step}; step skipped")
                self.optimizer.zero_grad(set_to_none=True)
                return False
        scale = self.scaler.get_scale() if self.scaler.is_enabled() else 0.0
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler.get_scale() < scale:  # float16 overflow: the scaler skipped the step and backed off
            return False  # (common in the first steps while the scale settles; not an error)
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update(self.model)
        return True

    def grad_scale(self) -> float | None:
        return self.scaler.get_scale() if self.scaler.is_enabled() else None
