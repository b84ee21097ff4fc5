"""The data layer: decoding, datasets, augmentation pipelines, samplers, synthetic data, dataset tools.

Modules (import from them directly; the names below are also reachable as ``vision.data.<name>``):

- ``images``: ``read_image``, the one decoder, and ``ImageError``
- ``coco`` / ``cocofile``: ``CocoDetection``, ``CocoSegmentation``, ``CategoryMap``, ``load_coco``
- ``segfolder``: ``MaskFolderSegmentation`` (VOC layout); ``folder``: ``ImageFolderDataset``
- ``transforms``: ``build_transforms`` (albumentations from YAML lists), ``to_tensor``
- ``samplers``: ``AspectRatioGroupedBatchSampler``; ``collate``: ``detection_collate``
- ``synthetic``: ``make_shapes``; ``convert``: VOC/YOLO <-> COCO; ``check``: ``check_dataset``;
  ``preview``: ``make_preview``

Attributes load their module on first use, so ``import vision.data.images`` does not pull in torch or
albumentations.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "read_image": "images",
    "image_size": "images",
    "ImageError": "images",
    "IMAGE_EXTENSIONS": "images",
    "CocoDetection": "coco",
    "CocoSegmentation": "coco",
    "CategoryMap": "coco",
    "AnnotationError": "cocofile",
    "load_coco": "cocofile",
    "safe_join": "cocofile",
    "MaskFolderSegmentation": "segfolder",
    "ImageFolderDataset": "folder",
    "build_transforms": "transforms",
    "to_tensor": "transforms",
    "AspectRatioGroupedBatchSampler": "samplers",
    "detection_collate": "collate",
    "make_shapes": "synthetic",
    "check_dataset": "check",
    "make_preview": "preview",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'vision.data' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
