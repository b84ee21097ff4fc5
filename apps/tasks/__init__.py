"""The tasks the engine can train, and :func:`load_model`, which rebuilds any saved model from its checkpoint.

Task modules are imported on first use, so a task whose module (or its dependencies) is missing does not
break the others. The registry sits above them: a task module never imports this package's ``__init__``
(tests/test_layering.py counts the modules named in ``TASKS`` as imports). What a task needs to rebuild a
model of its own is apps/tasks/loading.py.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import torch

from apps import WEIGHTS_DIR
from apps.tasks.base import LoadedModel, Task
from apps.tasks.loading import model_from_checkpoint, read_checkpoint
from detection.torchvision_weights import resolve_torchvision_coco
from vision.checkpoint import CheckpointError

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


def load_model(path: str | Path, device: str | torch.device = "cpu", *, ema: bool = True) -> LoadedModel:
    """Rebuild the model saved in ``path`` on ``device`` (any checkpoint loads on CPU).

    ``ema=True`` uses the EMA weights when the checkpoint has them (they are what the run selected on).
    torchvision's COCO Faster R-CNN files (``fasterrcnn_resnet50_fpn_coco-258fb6c6.pth`` and its v2), given as
    a path or a bare name found in weights/ or the hub cache, are converted once and loaded from the cache.
    Errors are CheckpointError naming the file and the reason.
    """
    path = resolve_torchvision_coco(path, [WEIGHTS_DIR]) or Path(path)
    ckpt = read_checkpoint(path)
    try:
        task = get_task(ckpt["task"])
    except KeyError as exc:
        raise CheckpointError(f"{path}: {exc.args[0]}") from None
    return model_from_checkpoint(task, ckpt, path, device, ema=ema)
