"""The one per-image result every detector returns."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Detections:
    """Detections of one image, in that image's pixel coordinates.

    boxes: [D, 4] float32 xyxy; scores: [D] float32; labels: [D] int64 in 1..K (0 is background).
    """

    boxes: Tensor
    scores: Tensor
    labels: Tensor

    def __len__(self) -> int:
        return self.boxes.shape[0]

    def to(self, device: torch.device | str) -> Detections:
        return Detections(self.boxes.to(device), self.scores.to(device), self.labels.to(device))

    def filter(self, keep: Tensor) -> Detections:
        """Subset by a boolean mask or an index tensor."""
        return Detections(self.boxes[keep], self.scores[keep], self.labels[keep])

    @staticmethod
    def empty(device: torch.device | str = "cpu") -> Detections:
        return Detections(
            torch.zeros((0, 4), device=device),
            torch.zeros((0,), device=device),
            torch.zeros((0,), dtype=torch.int64, device=device),
        )
