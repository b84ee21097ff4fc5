"""The tasks the engine can train, and :func:`load_model`, which rebuilds any saved model from its checkpoint.

Task modules are imported on first use, so a task whose module (or its dependencies) is missing does not
break the others.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from apps import WEIGHTS_DIR
from apps.migrations import upgrade_checkpoint
from apps.schema import ConfigError, from_dict
from detection.torchvision_weights import resolve_torchvision_coco
from vision.checkpoint import CheckpointError, checkpoint_weights, is_visiondet_checkpoint, load_checkpoint

if TYPE_CHECKING:
    from apps.tasks.base import Task

__all__ = ["TASKS", "RETIRED_TASKS", "get_task", "LoadedModel", "load_model"]

# task name -> "module:class"
TASKS: dict[str, str] = {
    "classification": "apps.tasks.classification:ClassificationTask",
    "segmentation": "apps.tasks.segmentation:SegmentationTask",
    "detection": "apps.tasks.detection:DetectionTask",  # Faster R-CNN, Fast R-CNN and R-CNN
}

# task names that no longer exist -> the one-line migration message for a config that still names one
RETIRED_TASKS: dict[str, str] = {
    "rcnn": "task: rcnn was merged into the detection task: write task: detection and model.arch: "
            "rcnn_<network> (rcnn_vgg16, rcnn_r18, ...), with the R-CNN settings under model.rcnn "
            "(see configs/detection/rcnn_vgg16.yaml)",
}

_instances: dict[str, Task] = {}


def get_task(name: str) -> Task:
    """The task named ``name`` (imported on first use)."""
    if name not in _instances:
        if name in RETIRED_TASKS:
            raise KeyError(RETIRED_TASKS[name])
        if name not in TASKS:
            raise KeyError(f"unknown task {name!r}; known tasks: {', '.join(sorted(TASKS))}")
        module_name, class_name = TASKS[name].split(":")
        _instances[name] = getattr(importlib.import_module(module_name), class_name)()
    return _instances[name]


@dataclass
class LoadedModel:
    """A model rebuilt from a checkpoint, in eval mode on its device."""

    task: Task
    model: nn.Module
    classes: list[dict[str, Any]]
    preprocess: dict[str, Any]
    checkpoint: dict[str, Any]  # the whole checkpoint (config, metrics, ...), weights included
    path: Path


def load_model(path: str | Path, device: str | torch.device = "cpu", *, ema: bool = True) -> LoadedModel:
    """Rebuild the model saved in ``path`` on ``device`` (any checkpoint loads on CPU).

    ``ema=True`` uses the EMA weights when the checkpoint has them (they are what the run selected on).
    torchvision's COCO Faster R-CNN files (``fasterrcnn_resnet50_fpn_coco-258fb6c6.pth`` and its v2), given as
    a path or a bare name found in weights/ or the hub cache, are converted once and loaded from the cache.
    Errors are CheckpointError naming the file and the reason.
    """
    path = resolve_torchvision_coco(path, [WEIGHTS_DIR]) or Path(path)
    ckpt = load_checkpoint(path, map_location="cpu")
    if not is_visiondet_checkpoint(ckpt):
        raise CheckpointError(f"{path}: not a visiondet checkpoint (a bare state dict has no model config; "
                              "use it as training weights=... instead)")
    for key in ("task", "model", "classes"):
        if key not in ckpt:
            raise CheckpointError(f"{path}: checkpoint has no {key!r} entry")
    ckpt = upgrade_checkpoint(ckpt)
    try:
        task = get_task(ckpt["task"])
    except KeyError as exc:
        raise CheckpointError(f"{path}: {exc.args[0]}") from None
    try:
        model_cfg = from_dict(task.model_config_type, ckpt["model"], "model")
    except ConfigError as exc:
        raise CheckpointError(f"{path}: model config does not fit this version of visiondet: {exc}") from None
    model = task.build_model(model_cfg, ckpt["classes"], load_pretrained=False)
    state = checkpoint_weights(ckpt, ema=ema)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: weights do not fit the model: {exc}") from None
    model.to(device).eval()
    return LoadedModel(task, model, list(ckpt["classes"]), dict(ckpt.get("preprocess") or {}), ckpt, path)
