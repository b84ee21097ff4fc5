"""The one per-image result every detector returns."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

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


@dataclass(frozen=True)
class Thresholds:
    """The test-time cuts of a detector's post-processing, given per call (never stored by mutating a model).

    score_thresh: boxes must score above it; nms_thresh: IoU of the per-class non-maximum suppression;
    detections_per_img: the best this many are kept. A detector's configured defaults are
    ``model.thresholds``; ``dataclasses.replace(model.thresholds, score_thresh=0.3)`` changes one.
    """

    score_thresh: float = 0.05
    nms_thresh: float = 0.5
    detections_per_img: int = 100

    def __post_init__(self) -> None:
        if not 0.0 <= self.score_thresh <= 1.0:
            raise ValueError(f"score_thresh {self.score_thresh} outside [0, 1]")
        if not 0.0 <= self.nms_thresh <= 1.0:
            raise ValueError(f"nms_thresh {self.nms_thresh} outside [0, 1]")
        if self.detections_per_img < 1:
            raise ValueError(f"detections_per_img must be at least 1, got {self.detections_per_img}")


@dataclass
class Proposals:
    """The regions a proposal source gives the RoI heads for one image, best first where scored.

    boxes: [P, 4] float xyxy in the network's input pixels; scores: [P] objectness in [0, 1] (RPN), or None
    for sources that only rank (selective search, a file); levels: [P] int64 pyramid level of each box
    (the RPN's candidates before its NMS, which runs per level), else None.
    """

    boxes: Tensor
    scores: Tensor | None = None
    levels: Tensor | None = None

    def __len__(self) -> int:
        return self.boxes.shape[0]

    def filter(self, keep: Tensor) -> Proposals:
        """Subset by a boolean mask or an index tensor."""
        pick = lambda t: t[keep] if t is not None else None  # noqa: E731
        return Proposals(self.boxes[keep], pick(self.scores), pick(self.levels))


@dataclass
class ProposalStages:
    """What a proposal source computed for a batch, for detection.explain.

    proposals: what the RoI heads receive, per image; candidates: the RPN's scored boxes before its NMS
    (None for external sources); predictions: the RPN's raw outputs and anchors
    (``detection.rpn.RPNPredictions``; None for external sources).
    """

    proposals: list[Proposals]
    candidates: list[Proposals] | None = None
    predictions: Any = None
