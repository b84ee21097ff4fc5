"""Checkpoints written the way training writes them, for the tests that load one (predict, export, demo)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from vision.checkpoint import save_checkpoint

CLASSES = [{"id": 3, "name": "road"}, {"id": 7, "name": "sky"}]


def write_checkpoint(path: Path, task: str, cfg: Any, model: torch.nn.Module, preprocess: dict,
                     classes: list[dict] = CLASSES) -> Path:
    """A visiondet checkpoint of ``model`` as training writes it (what predict, export and the demo load)."""
    ckpt = {"format": "visiondet", "version": 1, "task": task, "model": dataclasses.asdict(cfg),
            "classes": classes, "preprocess": preprocess, "state_dict": model.state_dict()}
    return save_checkpoint(ckpt, path)
