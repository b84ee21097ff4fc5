"""What happens to a decoded image before the model, as the checkpoint's ``preprocess`` entry says.

The model input is kept as uint8 ``[3, h, w]`` until it reaches the model's device (4x less to move
between DataLoader workers and the main process, and to the GPU); the model code then sees float32
in [0, 1], as ``vision.data.transforms.to_tensor`` would give.

- detection: the image as it is; the detector resizes and pads internally and answers in the input's
  coordinates.
- classification: the evaluation pipeline of training (short side to size / 0.875, centre crop).
- segmentation: longest side to ``size``, then padded at the bottom and right to ``size`` x ``size`` so
  images of any shape batch together; ``valid`` says which part of the logits belongs to the image.
"""

from __future__ import annotations

from typing import Any

import albumentations as A
import cv2
import numpy as np
import torch
from torch import Tensor

from vision.data.transforms import PAD_VALUE, build_transforms


def _hwc_to_chw(image: np.ndarray) -> Tensor:
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).contiguous()


class InputTransform:
    """(H, W, 3) uint8 RGB -> (uint8 [3, h, w] model input, (h', w') part of it that is image).

    size: the task's ``preprocess["size"]`` (classification input side; segmentation longest side);
    None runs segmentation at each image's own size (and is an error for classification).
    """

    def __init__(self, task: str, size: int | None = None):
        self.task = task
        self.size = size
        self.resize = self.pad = self.pipeline = None
        if task == "classification":
            if size is None:
                raise ValueError("a classification checkpoint needs preprocess['size'] (its input side)")
            self.pipeline = build_transforms(None, "classification", False, size=size)
        elif task == "segmentation" and size is not None:
            self.resize = A.LongestMaxSize(max_size=size)
            self.pad = A.PadIfNeeded(min_height=size, min_width=size, position="top_left",
                                     border_mode=cv2.BORDER_CONSTANT, fill=PAD_VALUE)
        elif task not in ("detection", "segmentation"):
            raise ValueError(f"unknown task {task!r}")

    @classmethod
    def from_checkpoint(cls, task: str, preprocess: dict[str, Any]) -> InputTransform:
        # 224 for classification checkpoints without the entry, as the classification task reads them.
        size = preprocess.get("size", 224 if task == "classification" else None)
        return cls(task, int(size) if size is not None else None)

    def __call__(self, image: np.ndarray) -> tuple[Tensor, tuple[int, int]]:
        if self.pipeline is not None:
            image = self.pipeline(image=image)["image"]
        elif self.resize is not None:
            image = self.resize(image=image)["image"]
            valid = image.shape[:2]
            return _hwc_to_chw(self.pad(image=image)["image"]), valid
        return _hwc_to_chw(image), image.shape[:2]
