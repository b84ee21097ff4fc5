"""Semantic segmentation metrics from one confusion matrix.

Every figure (per-class IoU, mean IoU, pixel accuracy, mean class accuracy, frequency-weighted IoU) is read
off a single ``[C, C]`` matrix of pixel counts, rows = ground-truth class, columns = predicted class, with
``C = K + 1`` (background included). Counting happens on the device the predictions live on; under
``torch.distributed`` the matrices of all processes are summed before the figures are computed, so every
rank reports the figures of the whole validation set.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor

IGNORE_INDEX = 255


def confusion_matrix(
    preds: Tensor, targets: Tensor, num_classes: int, ignore_index: int = IGNORE_INDEX
) -> Tensor:
    """Pixel counts ``[C, C]`` (int64; rows = target, columns = prediction) for one batch.

    preds, targets: integer tensors of the same shape (for example ``[N, H, W]``); target pixels equal to
    ``ignore_index`` are not counted. A target value outside ``0..C-1`` (other than the ignore value) is a
    ``ValueError``: it would otherwise land silently in another class's cell.
    """
    if preds.shape != targets.shape:
        raise ValueError(
            f"predictions {tuple(preds.shape)} and targets {tuple(targets.shape)} differ in shape"
        )
    valid = targets != ignore_index
    t = targets[valid].long()
    p = preds[valid].long()
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= num_classes):
        raise ValueError(
            f"target values must be in 0..{num_classes - 1} or {ignore_index} (ignore); "
            f"found {int(t.min())}..{int(t.max())}"
        )
    if p.numel() and (int(p.min()) < 0 or int(p.max()) >= num_classes):
        raise ValueError(
            f"predicted values must be in 0..{num_classes - 1}; found {int(p.min())}..{int(p.max())}"
        )
    counts = torch.bincount(t * num_classes + p, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes)


def metrics_from_confusion(matrix: Tensor) -> dict[str, float | list[float]]:
    """Figures of a ``[C, C]`` confusion matrix (rows = target, columns = prediction).

    Returns ``miou``, ``pixel_accuracy``, ``mean_accuracy``, ``fw_iou`` (floats) and ``per_class_iou``,
    ``per_class_accuracy`` (lists of C floats). A class that appears neither in the targets nor in the
    predictions has IoU NaN and is left out of the means, as in MMSegmentation and torchvision's reference
    scripts: it says nothing about the model.
    """
    m = matrix.double().cpu()
    true_pos = m.diagonal()
    gt_pixels = m.sum(dim=1)
    pred_pixels = m.sum(dim=0)
    total = m.sum()
    union = gt_pixels + pred_pixels - true_pos
    iou = torch.where(union > 0, true_pos / union.clamp(min=1), torch.full_like(union, math.nan))
    accuracy = torch.where(gt_pixels > 0, true_pos / gt_pixels.clamp(min=1), torch.full_like(union, math.nan))
    present = ~iou.isnan()
    if total > 0:
        # fw-IoU weighs each class's IoU by its share of ground-truth pixels (0 for classes without any).
        frequency = gt_pixels / total
        fw_iou = float((frequency[present] * iou[present]).sum())
        pixel_accuracy = float(true_pos.sum() / total)
    else:
        fw_iou = pixel_accuracy = math.nan
    return {
        "miou": float(iou[present].mean()) if present.any() else math.nan,
        "pixel_accuracy": pixel_accuracy,
        "mean_accuracy": float(accuracy.nanmean()) if (~accuracy.isnan()).any() else math.nan,
        "fw_iou": fw_iou,
        "per_class_iou": iou.tolist(),
        "per_class_accuracy": accuracy.tolist(),
    }


class SegmentationMetric:
    """Accumulates a confusion matrix over batches, then reduces across processes and computes the figures.

    >>> metric = SegmentationMetric(num_classes=3)      # C = K + 1 including background
    >>> metric.update(logits.argmax(1), targets)        # [N, H, W] each, any number of times
    >>> metric.compute()["miou"]
    """

    def __init__(
        self, num_classes: int, ignore_index: int = IGNORE_INDEX, device: torch.device | str = "cpu"
    ):
        if num_classes < 1:
            raise ValueError(f"num_classes must be at least 1, got {num_classes}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.matrix = torch.zeros((num_classes, num_classes), dtype=torch.int64, device=device)

    def reset(self) -> None:
        self.matrix.zero_()

    def update(self, preds: Tensor, targets: Tensor) -> None:
        """Add a batch: ``preds`` index maps ``[N, H, W]`` (logits ``[N, C, H, W]`` are argmaxed) and
        ``targets`` ``[N, H, W]``."""
        if preds.dim() == targets.dim() + 1:
            preds = preds.argmax(dim=1)
        batch = confusion_matrix(preds, targets.to(preds.device), self.num_classes, self.ignore_index)
        self.matrix += batch.to(self.matrix.device)

    def reduced(self) -> Tensor:
        """The matrix summed over all processes (a copy; this process's own counts stay as they are, so
        calling it twice never counts twice). Outside ``torch.distributed`` it is just a copy."""
        matrix = self.matrix.clone()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(matrix, op=dist.ReduceOp.SUM)
        return matrix

    def compute(self) -> dict[str, float | list[float]]:
        """Figures over everything seen so far by all processes (see ``metrics_from_confusion``).

        Under ``torch.distributed`` every rank must call it (it is a collective operation)."""
        return metrics_from_confusion(self.reduced())
