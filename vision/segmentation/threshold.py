"""The pixel thresholds a segmenter's checkpoint recommends: how sure it must be of each class to paint it.

An argmax paints every pixel with its most probable class. On photographs unlike its training ones a
segmenter paints background texture as objects, mostly less sure of them than of the objects it knows
(the real-photo segmenter on a lion: 5% of the picture as cat_face and coin, median probability 0.61).
Under its class's threshold, a pixel whose most probable class is an object keeps the background instead.

How sure is sure enough differs by class (a segmenter that confuses textures with a cat's face needs 0.85
for it, one sure of rockets 0.4), so each object class gets its own threshold, chosen on held-out images
by the metric the task reports: of the thresholds 0, 0.05, ... 0.95, the ones of best mIoU, one class at a
time until none improves it (coordinate ascent from the plain argmax, all 0; a change must raise mIoU, so
on the split it was chosen on the result is never worse than the argmax). :class:`ThresholdSweep` counts
in one pass what any thresholds would paint: one histogram of (true class, painted class, probability bin).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor

from vision.segmentation.metrics import IGNORE_INDEX, metrics_from_confusion

__all__ = ["RULE", "THRESHOLDS", "PixelCalibration", "ThresholdSweep", "paint"]

THRESHOLDS = tuple(round(k / 20, 2) for k in range(20))  # 0.0, 0.05, ... 0.95
RULE = "max mIoU, per class by coordinate ascent from the argmax, over thresholds 0, 0.05, ... 0.95"


def paint(probs: Tensor, thresholds: float | Sequence[float] | Tensor = 0.0) -> Tensor:
    """Index map ``[..., H, W]`` of class probabilities ``[..., C, H, W]`` (class 0 the background): each
    pixel's most probable class, the background where that is an object class under its threshold
    (``thresholds``: one for every object class, or the K object classes' own, in label order)."""
    top, labels = probs.max(dim=-3)
    per_class = torch.as_tensor(thresholds, dtype=top.dtype, device=top.device).flatten()
    if not per_class.any():
        return labels
    below = per_class.expand(probs.shape[-3] - 1)[labels.clamp(min=1) - 1]  # each pixel's class's threshold
    return labels.masked_fill((labels > 0) & (top < below), 0)


@dataclass(frozen=True)
class PixelCalibration:
    """The chosen thresholds and what they do on the images they were chosen on."""

    thresholds: list[float]  # one per object class, in label order
    miou: float  # at ``thresholds``
    pixel_accuracy: float
    miou_argmax: float  # the plain argmax's (every threshold 0), for comparison
    pixel_accuracy_argmax: float
    images: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class ThresholdSweep:
    """Confusion matrices of any per-class thresholds from :data:`THRESHOLDS`, counted over batches, and
    the best of them.

    >>> sweep = ThresholdSweep(num_classes=8)           # C = K + 1 including background
    >>> sweep.update(logits.softmax(1), targets)        # [N, C, H, W] and [N, H, W], any number of times
    >>> sweep.choose().thresholds
    """

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX) -> None:
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        # the same float32 values ``paint`` compares with, so a bin never straddles its threshold
        self.edges = torch.tensor(THRESHOLDS, dtype=torch.float32)
        self.counts = torch.zeros(num_classes, num_classes, len(THRESHOLDS), dtype=torch.int64)
        self.images = 0

    def update(self, probs: Tensor, targets: Tensor) -> None:
        """Add a batch: softmax probabilities ``[N, C, H, W]``, true index maps ``[N, H, W]``."""
        top, painted = probs.float().max(dim=1)
        valid = targets != self.ignore_index
        truth, painted, top = targets[valid].long().cpu(), painted[valid].cpu(), top[valid].cpu()
        # bin b holds probabilities in [edges[b], edges[b + 1]): under threshold k exactly when b < k
        bins = torch.bucketize(top, self.edges, right=True) - 1
        C, B = self.num_classes, len(THRESHOLDS)
        self.counts += torch.bincount((truth * C + painted) * B + bins, minlength=C * C * B).view(C, C, B)
        self.images += int(probs.shape[0])

    def matrix(self, thresholds: float | Sequence[float]) -> Tensor:
        """The ``[C, C]`` confusion matrix (rows = truth) of :func:`paint` at ``thresholds`` (values of
        :data:`THRESHOLDS`: one for every object class, or one per object class)."""
        if isinstance(thresholds, float | int):
            thresholds = [float(thresholds)] * (self.num_classes - 1)
        matrix = self.counts.sum(dim=2)
        for c, threshold in enumerate(thresholds, 1):
            moved = self.counts[:, c, :THRESHOLDS.index(threshold)].sum(dim=1)  # painted c, under: background
            matrix[:, c] -= moved
            matrix[:, 0] += moved
        return matrix

    def choose(self, rounds: int = 3) -> PixelCalibration:
        """Per-class thresholds of best mIoU: each class in turn takes its best threshold given the others'
        (the lowest of equals), for ``rounds`` passes or until a pass changes nothing."""
        if not self.counts.any():
            raise ValueError("no labelled pixel seen: nothing to choose thresholds on")
        miou = lambda ts: float(metrics_from_confusion(self.matrix(ts))["miou"])  # noqa: E731
        chosen = [0.0] * (self.num_classes - 1)
        best = argmax = miou(chosen)
        for _ in range(rounds):
            changed = False
            for c in range(len(chosen)):
                for threshold in THRESHOLDS:
                    trial = [*chosen[:c], threshold, *chosen[c + 1:]]
                    if (value := miou(trial)) > best + 1e-12:
                        best, chosen, changed = value, trial, True
            if not changed:
                break
        figures, plain = metrics_from_confusion(self.matrix(chosen)), metrics_from_confusion(self.matrix(0.0))
        return PixelCalibration(thresholds=chosen, miou=best, pixel_accuracy=float(figures["pixel_accuracy"]),
                                miou_argmax=argmax, pixel_accuracy_argmax=float(plain["pixel_accuracy"]),
                                images=self.images)
