"""Proposal recall: how many ground-truth objects the top-k proposals cover.

A detector that classifies proposals cannot find an object no proposal covers, so recall at a given IoU
bounds its accuracy. The R-CNN family papers report it for the top 300, 1000 and 2000 proposals at IoU 0.5
(enough for a detection to count in PASCAL VOC) and 0.7 (a tight box).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torchvision.ops import box_iou

__all__ = ["proposal_recall", "format_recall"]


def proposal_recall(
    proposals: Sequence[Tensor],
    gt_boxes: Sequence[Tensor],
    *,
    top_k: Sequence[int] = (300, 1000, 2000),
    iou_thresholds: Sequence[float] = (0.5, 0.7),
) -> dict[tuple[int, float], float]:
    """Fraction of ground-truth boxes whose best IoU with an image's first k proposals is >= the threshold.

    Args:
        proposals: per image, [P_i, 4] xyxy, best-ranked first.
        gt_boxes: per image, [M_i, 4] xyxy (images without objects contribute nothing).

    Returns:
        {(k, threshold): recall in [0, 1]}; ``nan`` when there is no ground truth at all.
    """
    if len(proposals) != len(gt_boxes):
        raise ValueError(f"{len(proposals)} proposal lists for {len(gt_boxes)} ground-truth lists")
    best: dict[int, list[Tensor]] = {k: [] for k in top_k}
    for props, gts in zip(proposals, gt_boxes, strict=True):
        if len(gts) == 0:
            continue
        iou = box_iou(gts.float(), props.float()) if len(props) else torch.zeros(len(gts), 0)
        for k in top_k:
            top = iou[:, :k]
            best[k].append(top.max(dim=1).values if top.shape[1] else torch.zeros(len(gts)))
    recall = {}
    for k in top_k:
        overlaps = torch.cat(best[k]) if best[k] else torch.zeros(0)
        for t in iou_thresholds:
            recall[(k, t)] = int((overlaps >= t).sum()) / len(overlaps) if len(overlaps) else float("nan")
    return recall


def format_recall(recall: dict[tuple[int, float], float]) -> str:
    """A small text table: one row per k, one column per IoU threshold."""
    ks = sorted({k for k, _ in recall})
    ts = sorted({t for _, t in recall})
    lines = ["proposals  " + "  ".join(f"R@{t:.2f}" for t in ts)]
    for k in ks:
        lines.append(f"{k:>9}  " + "  ".join(f"{recall[(k, t)]:6.3f}" for t in ts))
    return "\n".join(lines)
