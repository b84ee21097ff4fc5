"""Box helpers shared by every detector of the R-CNN family: delta coding, IoU matching, fg/bg sampling.

The kernels (IoU, NMS, RoI pooling) come from ``torchvision.ops``; this module only holds the small pieces of
logic around them. Legend for shapes: N boxes, M ground-truth boxes, C classes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor
from torchvision.ops import box_area

# Labels a Matcher gives each box; the samplers read them.
FOREGROUND = 1
BACKGROUND = 0
IGNORE = -1

# exp() of a larger log-scale would make boxes over 1000/16 times their anchor: clamp before exp to avoid inf.
DEFAULT_SCALE_CLAMP = math.log(1000.0 / 16)


class BoxCoder:
    """The R-CNN box parameterisation (Girshick et al. 2014, appendix C), with per-coordinate weights.

    ``t_x = w_x (x_gt - x_a) / w_a``, ``t_y = w_y (y_gt - y_a) / h_a``, ``t_w = w_w log(w_gt / w_a)``,
    ``t_h = w_h log(h_gt / h_a)`` where ``(x, y)`` are centres. The weights scale the deltas so that the
    regression targets have roughly unit variance: ``(1, 1, 1, 1)`` for the RPN, ``(10, 10, 5, 5)`` for the
    Fast R-CNN head.
    """

    def __init__(
        self,
        weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0),
        scale_clamp: float = DEFAULT_SCALE_CLAMP,
    ) -> None:
        if len(weights) != 4:
            raise ValueError(f"BoxCoder weights must be 4 numbers (wx, wy, ww, wh), got {weights}")
        self.weights = tuple(float(w) for w in weights)
        self.scale_clamp = scale_clamp

    def encode(self, gt_boxes: Tensor, boxes: Tensor) -> Tensor:
        """Deltas that turn ``boxes`` [N, 4] into ``gt_boxes`` [N, 4] (both xyxy); returns [N, 4]."""
        wx, wy, ww, wh = self.weights
        boxes = boxes.to(gt_boxes.dtype)
        widths = boxes[:, 2] - boxes[:, 0]
        heights = boxes[:, 3] - boxes[:, 1]
        ctr_x = boxes[:, 0] + 0.5 * widths
        ctr_y = boxes[:, 1] + 0.5 * heights

        gt_widths = gt_boxes[:, 2] - gt_boxes[:, 0]
        gt_heights = gt_boxes[:, 3] - gt_boxes[:, 1]
        gt_ctr_x = gt_boxes[:, 0] + 0.5 * gt_widths
        gt_ctr_y = gt_boxes[:, 1] + 0.5 * gt_heights

        dx = wx * (gt_ctr_x - ctr_x) / widths
        dy = wy * (gt_ctr_y - ctr_y) / heights
        dw = ww * torch.log(gt_widths / widths)
        dh = wh * torch.log(gt_heights / heights)
        return torch.stack((dx, dy, dw, dh), dim=1)

    def decode(self, deltas: Tensor, boxes: Tensor) -> Tensor:
        """Apply ``deltas`` [N, 4 * C] (C boxes per row, e.g. one per class) to ``boxes`` [N, 4].

        Returns xyxy boxes [N, 4 * C]; row ``i`` block ``c`` is ``boxes[i]`` moved by ``deltas[i, 4c:4c+4]``.
        """
        if deltas.shape[0] != boxes.shape[0] or deltas.shape[-1] % 4 != 0:
            raise ValueError(
                f"decode expects deltas [N, 4*C] and boxes [N, 4], got {deltas.shape} and {boxes.shape}"
            )
        boxes = boxes.to(deltas.dtype)
        wx, wy, ww, wh = self.weights
        widths = (boxes[:, 2] - boxes[:, 0])[:, None]
        heights = (boxes[:, 3] - boxes[:, 1])[:, None]
        ctr_x = boxes[:, 0, None] + 0.5 * widths
        ctr_y = boxes[:, 1, None] + 0.5 * heights

        dx = deltas[:, 0::4] / wx
        dy = deltas[:, 1::4] / wy
        dw = (deltas[:, 2::4] / ww).clamp(max=self.scale_clamp)
        dh = (deltas[:, 3::4] / wh).clamp(max=self.scale_clamp)

        pred_ctr_x = dx * widths + ctr_x
        pred_ctr_y = dy * heights + ctr_y
        half_w = 0.5 * torch.exp(dw) * widths
        half_h = 0.5 * torch.exp(dh) * heights
        out = torch.stack(
            (pred_ctr_x - half_w, pred_ctr_y - half_h, pred_ctr_x + half_w, pred_ctr_y + half_h), dim=2
        )
        return out.reshape(deltas.shape)


class Matcher:
    """Assign each box its best ground truth by IoU and label it foreground, background or ignored.

    With IoU ``q`` of a box with its best ground truth: ``q >= fg_iou_thresh`` is foreground;
    ``bg_iou_min <= q < bg_iou_thresh`` is background; anything else (the band between the two thresholds,
    and ``q < bg_iou_min``) is ignored. The RPN uses 0.7 / 0.3 with low-quality matches; the Fast R-CNN
    head uses 0.5 / 0.5 (Faster R-CNN) or background in [0.1, 0.5) (Fast R-CNN's heuristic).

    ``allow_low_quality_matches`` adds, for every ground truth, the boxes with the highest IoU with it
    (ties included) as foreground, so a ground truth that no anchor overlaps by ``fg_iou_thresh`` still gets
    one (Faster R-CNN, section 3.1.2). A ground truth that overlaps no box at all (IoU 0) gets none.
    """

    def __init__(
        self,
        fg_iou_thresh: float,
        bg_iou_thresh: float,
        *,
        allow_low_quality_matches: bool = False,
        bg_iou_min: float = 0.0,
    ) -> None:
        if not 0.0 <= bg_iou_min <= bg_iou_thresh <= fg_iou_thresh <= 1.0:
            raise ValueError(
                "Matcher thresholds must satisfy 0 <= bg_iou_min <= bg_iou_thresh <= fg_iou_thresh <= 1, got "
                f"bg_iou_min={bg_iou_min}, bg_iou_thresh={bg_iou_thresh}, fg_iou_thresh={fg_iou_thresh}"
            )
        self.fg_iou_thresh = fg_iou_thresh
        self.bg_iou_thresh = bg_iou_thresh
        self.bg_iou_min = bg_iou_min
        self.allow_low_quality_matches = allow_low_quality_matches

    def __call__(self, iou: Tensor) -> tuple[Tensor, Tensor]:
        """Match an IoU matrix [M, N] (ground truths x boxes).

        Returns ``matched_idxs`` [N] int64 (index of the best ground truth; 0 where there is none, read it
        only where the label is FOREGROUND) and ``labels`` [N] int64 in {FOREGROUND, BACKGROUND, IGNORE}.
        With no ground truth (M = 0) every box has IoU 0.
        """
        num_boxes = iou.shape[1]
        if iou.shape[0] == 0:
            matched_idxs = torch.zeros(num_boxes, dtype=torch.int64, device=iou.device)
            max_iou = torch.zeros(num_boxes, dtype=iou.dtype, device=iou.device)
        else:
            max_iou, matched_idxs = iou.max(dim=0)

        labels = torch.full((num_boxes,), IGNORE, dtype=torch.int64, device=iou.device)
        labels[(max_iou >= self.bg_iou_min) & (max_iou < self.bg_iou_thresh)] = BACKGROUND
        labels[max_iou >= self.fg_iou_thresh] = FOREGROUND

        if self.allow_low_quality_matches and iou.shape[0] > 0:
            best_per_gt = iou.max(dim=1, keepdim=True).values
            is_best = (iou == best_per_gt) & (best_per_gt > 0)
            labels[is_best.any(dim=0)] = FOREGROUND
        return matched_idxs, labels


class BalancedPositiveNegativeSampler:
    """Pick up to ``batch_size_per_image`` boxes of one image, at most ``positive_fraction`` foreground.

    When there are too few positives the negatives fill the batch (Faster R-CNN: 256 anchors, up to 1:1;
    Fast R-CNN: 512 or 64 RoIs, 25% foreground). Sampling is uniform without replacement (torch RNG).
    """

    def __init__(self, batch_size_per_image: int, positive_fraction: float) -> None:
        if batch_size_per_image <= 0 or not 0.0 <= positive_fraction <= 1.0:
            raise ValueError(
                f"sampler needs batch_size_per_image > 0 and positive_fraction in [0, 1], "
                f"got {batch_size_per_image} and {positive_fraction}"
            )
        self.batch_size_per_image = batch_size_per_image
        self.positive_fraction = positive_fraction

    def __call__(self, labels: Tensor) -> tuple[Tensor, Tensor]:
        """labels [N] from a Matcher; returns indices (int64) of the sampled positives and negatives."""
        positive = torch.where(labels == FOREGROUND)[0]
        negative = torch.where(labels == BACKGROUND)[0]
        num_pos = min(positive.numel(), int(self.batch_size_per_image * self.positive_fraction))
        num_neg = min(negative.numel(), self.batch_size_per_image - num_pos)
        pos_pick = torch.randperm(positive.numel(), device=labels.device)[:num_pos]
        neg_pick = torch.randperm(negative.numel(), device=labels.device)[:num_neg]
        return positive[pos_pick], negative[neg_pick]


def box_iof(boxes: Tensor, regions: Tensor) -> Tensor:
    """Intersection over foreground: [N, 4] boxes and [C, 4] regions (xyxy) -> [N, C], each intersection
    divided by the area of the box (not of the union), so a box lying wholly inside a region scores 1
    however large the region is. Boxes of zero area score 0."""
    top_left = torch.max(boxes[:, None, :2], regions[None, :, :2])
    bottom_right = torch.min(boxes[:, None, 2:], regions[None, :, 2:])
    inter = (bottom_right - top_left).clamp(min=0).prod(dim=2)
    # a zero-area box has zero intersection too: clamping its area gives 0 rather than 0/0
    return inter / box_area(boxes)[:, None].clamp(min=torch.finfo(inter.dtype).tiny)


def ignore_crowd(labels: Tensor, boxes: Tensor, crowd_boxes: Tensor | None, iof_thresh: float) -> Tensor:
    """Matcher ``labels`` [N] of ``boxes`` [N, 4] with the BACKGROUND boxes that lie at least
    ``iof_thresh`` inside a crowd region (``box_iof``) turned to IGNORE: a crowd box covers objects nobody
    outlined, so calling them background would teach the detector to miss them (the COCO convention,
    MMDetection's ``ignore_iof_thr``). Foreground boxes stay foreground: they match a real box. Returns a
    new tensor; ``crowd_boxes`` None or empty changes nothing."""
    if crowd_boxes is None or crowd_boxes.numel() == 0 or boxes.numel() == 0:
        return labels
    covered = box_iof(boxes, crowd_boxes.to(boxes)).max(dim=1).values >= iof_thresh
    labels = labels.clone()
    labels[covered & (labels == BACKGROUND)] = IGNORE
    return labels


def as_size(size: Sequence[int] | Sequence[Tensor]) -> Tensor:
    """An image size ``(h, w)`` as an int64 tensor [2]. The sizes a detector reads from shapes are ints when
    it runs eagerly and 0-d tensors while it is traced for export; this keeps the latter in the graph (as the
    shape they came from) where ``torch.tensor(size)`` would freeze them into constants."""
    return torch.stack([torch.as_tensor(side) for side in size])


def clip_boxes(boxes: Tensor, size: Sequence[int] | Sequence[Tensor]) -> Tensor:
    """Boxes [..., 4] xyxy clipped to an image of ``size`` (h, w): the values of torchvision's
    ``clip_boxes_to_image``, with the size kept traceable (``as_size``)."""
    height, width = as_size(size).to(boxes)
    return torch.minimum(boxes.clamp(min=0), torch.stack((width, height, width, height)))
