"""Mosaic (Bochkovskiy et al., "YOLOv4", 2020): one training image made of parts of several, through
albumentations' ``Mosaic`` on the shared detection pipeline.

A training pipeline that lists it, for example::

    transforms:
      - {name: Mosaic, p: 0.5, grid_yx: [2, 2], target_size: [384, 384], cell_shape: [384, 384], fill: 128}
      - {name: HorizontalFlip, p: 0.5}

needs the other images of each composite. ``CocoDetection`` finds the transform (:func:`find_mosaic`) and
hands it, under the transform's ``metadata_key``, the partners :func:`mosaic_partners` draws: other items
of the dataset picked with torch's generator (so a seed repeats them, as every augmentation here does),
decoded with their boxes. Each partner box carries an ``indices`` value numbered after the primary image's
boxes, so that whichever boxes survive the composite's crop keep their label and their crowd flag.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import albumentations as A
import numpy as np
import torch

__all__ = ["Partners", "find_mosaic", "mosaic_partners"]

# a partner as read from the dataset: image (H, W, 3) uint8, object boxes [M, 4] xyxy, their labels [M],
# crowd boxes [C, 4]
Sample = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def find_mosaic(transforms: Any) -> A.Mosaic | None:
    """The ``Mosaic`` inside a pipeline or a list of transforms (at any depth of Compose/OneOf/...), or
    None."""
    if isinstance(transforms, A.Mosaic):
        return transforms
    children = transforms if isinstance(transforms, list) else getattr(transforms, "transforms", None)
    for child in children or []:
        found = find_mosaic(child)
        if found is not None:
            return found
    return None


@dataclass
class Partners:
    """What one composite adds to its primary image: ``items`` for the transform's metadata, and for each
    partner box (in ``indices`` order, starting where the primary's boxes end) its label and whether it is
    an object (True) or a crowd region (False)."""

    items: list[dict[str, np.ndarray]]
    labels: np.ndarray  # int64 [B]
    instance: np.ndarray  # bool [B]


def mosaic_partners(mosaic: A.Mosaic, dataset_size: int, first_index: int,
                    read: Callable[[int], Sample]) -> Partners:
    """Draw the other cells' images (``grid_yx`` cells less the primary) from ``dataset_size`` items with
    torch's generator and read each through ``read(index)``; their boxes are numbered from ``first_index``."""
    rows, cols = mosaic.grid_yx
    picks = torch.randint(dataset_size, (rows * cols - 1,)).tolist()
    items, labels, instance = [], [], []
    index = first_index
    for pick in picks:
        image, boxes, box_labels, crowd = read(pick)
        boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
        crowd = np.asarray(crowd, np.float32).reshape(-1, 4)
        count = len(boxes) + len(crowd)
        box_labels = np.asarray(box_labels, np.int64).reshape(-1)
        items.append({
            "image": image,
            "bboxes": np.concatenate([boxes, crowd]),
            "labels": np.concatenate([box_labels, np.zeros(len(crowd), np.int64)]),  # crowd: no class
            "indices": np.arange(index, index + count),
        })
        labels.append(items[-1]["labels"])
        instance.append(np.arange(count) < len(boxes))
        index += count
    return Partners(items, np.concatenate(labels) if labels else np.zeros(0, np.int64),
                    np.concatenate(instance) if instance else np.zeros(0, bool))
