"""A model from its checkpoint, given its task: what :func:`apps.tasks.load_model` does after the registry
look-up, and what a task uses to reload a model of its own (R-CNN's later stages) without the registry.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from apps.migrations import upgrade_checkpoint
from apps.schema import ConfigError, from_dict
from apps.tasks.base import LoadedModel, Task
from vision.checkpoint import CheckpointError, checkpoint_weights, is_visiondet_checkpoint, load_checkpoint

__all__ = ["read_checkpoint", "model_from_checkpoint"]


def read_checkpoint(path: Path) -> dict[str, Any]:
    """The visiondet checkpoint in ``path`` in today's layout (apps.migrations.upgrade_checkpoint)."""
    ckpt = load_checkpoint(path, map_location="cpu")
    if not is_visiondet_checkpoint(ckpt):
        raise CheckpointError(f"{path}: not a visiondet checkpoint (a bare state dict has no model config; "
                              "use it as training weights=... instead)")
    for key in ("task", "model", "classes"):
        if key not in ckpt:
            raise CheckpointError(f"{path}: checkpoint has no {key!r} entry")
    return upgrade_checkpoint(ckpt)


def model_from_checkpoint(task: Task, ckpt: dict[str, Any], path: Path, device: str | torch.device = "cpu",
                          *, ema: bool = True) -> LoadedModel:
    """Rebuild ``ckpt``'s model (of ``task``) on ``device``, in eval mode; ``ema=True`` takes the EMA weights
    when the checkpoint has them (they are what the run selected on). Errors name ``path``."""
    try:
        model_cfg = from_dict(task.model_config_type, ckpt["model"], "model")
    except ConfigError as exc:
        raise CheckpointError(f"{path}: model config does not fit this version of visiondet: {exc}") from None
    model = task.build_model(model_cfg, ckpt["classes"], load_pretrained=False)
    state = checkpoint_weights(ckpt, ema=ema)  # (int8-stored weights multiplied back)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: weights do not fit the model: {exc}") from None
    model.to(device).eval()
    return LoadedModel(task, model, list(ckpt["classes"]), dict(ckpt.get("preprocess") or {}), ckpt, path)
