"""The two seams of TwoStageDetector: where proposals come from, and what turns regions into detections.

Every generation of the R-CNN family (detection.generation) is the same skeleton with different parts:

    ProposalGenerator   RegionProposalNetwork (Faster R-CNN: anchors, learned) or ExternalProposals (Fast
                        R-CNN and R-CNN: selective search, a file, or given)
    RegionHeads         RoIHeads (Fast/Faster R-CNN: features pooled per region from the image's maps) or
                        RCNNHeads (R-CNN: a CNN per warped region, SVMs)

Both are base classes the parts inherit, so the contract is stated once and checked where a part is built.
The heads share their test-time half: ``predict`` gives every region's class-specific boxes and scores,
and ``postprocess`` (``detections_from_scores``: score cut, per-class NMS, top-k) turns them into
Detections, the same for every generation.

Legend: N images, P_i proposals of image i, R regions in a batch, K object classes (labels 1..K).
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import Tensor, nn
from torchvision.ops import batched_nms, remove_small_boxes

from detection.boxes import clip_boxes
from detection.structures import Detections, Proposals, ProposalStages, Thresholds
from detection.transform import ImageBatch

__all__ = ["ProposalGenerator", "RegionHeads", "detections_from_scores"]


class ProposalGenerator(nn.Module, ABC):
    """Where a two-stage detector's regions come from.

    ``forward(batch, features, targets=None, proposals=None) -> (N Proposals, {loss_*})``: boxes [P_i, 4]
    in the batch's resized pixels (with their objectness where the source scores them); losses only for a
    learned source given targets. ``proposals``: boxes the caller gives, already in the batch's pixels
    (sources that make their own refuse them).
    ``inspect(batch, features, proposals=None) -> ProposalStages``: what ``forward`` computes at test time,
    with its intermediate results (detection.explain draws them).
    """

    @abstractmethod
    def forward(self, batch: ImageBatch, features: dict[str, Tensor],
                targets: list[dict[str, Tensor]] | None = None, proposals: list[Tensor] | None = None
                ) -> tuple[list[Proposals], dict[str, Tensor]]: ...

    @abstractmethod
    def inspect(self, batch: ImageBatch, features: dict[str, Tensor], proposals: list[Tensor] | None = None
                ) -> ProposalStages: ...


class RegionHeads(nn.Module, ABC):
    """Regions -> detections: the per-region half of a two-stage detector.

    ``forward(features, proposals, image_sizes, targets=None, thresholds=None) -> (N Detections | None,
    {loss_*})``: losses whenever targets are given (``losses``), detections unless training, in the
    batch's resized pixels, cut with ``thresholds`` (None: the configured ``self.thresholds``).
    Subclasses give ``predict`` (regions -> class-specific boxes [R, K, 4] and scores [R, K], column k
    for label k + 1) and ``losses``, and set ``score_thresh``, ``nms_thresh``, ``detections_per_img``.
    """

    score_thresh: float
    nms_thresh: float
    detections_per_img: int

    @abstractmethod
    def predict(self, features: dict[str, Tensor], regions: list[Tensor], image_sizes: list[tuple[int, int]]
                ) -> tuple[Tensor, Tensor]:
        """N tensors [P_i, 4] -> every region's class-specific boxes [R, K, 4] and scores [R, K]."""

    @abstractmethod
    def losses(self, features: dict[str, Tensor], proposals: list[Tensor], image_sizes: list[tuple[int, int]],
               targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        """The training loss on regions sampled from ``proposals`` and the targets' boxes."""

    @property
    def thresholds(self) -> Thresholds:
        """The configured test-time thresholds, used when a call gives none."""
        return Thresholds(self.score_thresh, self.nms_thresh, self.detections_per_img)

    def forward(self, features: dict[str, Tensor], proposals: list[Tensor],
                image_sizes: list[tuple[int, int]], targets: list[dict[str, Tensor]] | None = None,
                thresholds: Thresholds | None = None) -> tuple[list[Detections] | None, dict[str, Tensor]]:
        losses = self.losses(features, proposals, image_sizes, targets) if targets is not None else {}
        if self.training:
            return None, losses
        boxes, scores = self.predict(features, proposals, image_sizes)
        return self.postprocess(boxes, scores, proposals, image_sizes, thresholds), losses

    def class_boxes_and_scores(self, boxes: Tensor, scores: Tensor, proposals: list[Tensor]
                               ) -> tuple[list[Tensor], list[Tensor]]:
        """``predict``'s outputs split per image: boxes [P_i, K, 4], scores [P_i, K]."""
        if len(proposals) == 1:  # (one image: no split, whose sizes a trace would freeze)
            return [boxes], [scores]
        counts = [len(p) for p in proposals]
        return list(boxes.split(counts)), list(scores.split(counts))

    def postprocess(self, boxes: Tensor, scores: Tensor, proposals: list[Tensor],
                    image_sizes: list[tuple[int, int]], thresholds: Thresholds | None = None
                    ) -> list[Detections]:
        """``predict``'s outputs -> Detections per image (resized pixels), by ``detections_from_scores``."""
        thresholds = thresholds or self.thresholds
        per_box, per_score = self.class_boxes_and_scores(boxes, scores, proposals)
        return [detections_from_scores(b, s, size, thresholds)
                for b, s, size in zip(per_box, per_score, image_sizes, strict=True)]


def detections_from_scores(
    boxes: Tensor,
    scores: Tensor,
    image_size: tuple[int, int],
    thresholds: Thresholds | None = None,
    *,
    min_box_size: float = 1e-2,
) -> Detections:
    """Turn per-class boxes [P, K, 4] and scores [P, K] (foreground classes only; column k is label k + 1)
    into Detections: clip to ``image_size`` (h, w), keep scores > ``thresholds.score_thresh``, drop boxes
    under ``min_box_size`` px, NMS per class at ``thresholds.nms_thresh``, keep the
    ``thresholds.detections_per_img`` best (None: ``Thresholds()``'s defaults). A pure function of its
    inputs: used with softmax scores by Fast/Faster R-CNN and with SVM scores by R-CNN, eager or traced."""
    thresholds = thresholds or Thresholds()
    num_classes = scores.shape[1]
    boxes = clip_boxes(boxes, image_size).reshape(-1, 4)
    labels = torch.arange(1, num_classes + 1, device=scores.device).expand(scores.shape[0], -1).reshape(-1)
    scores = scores.reshape(-1)
    keep = torch.where(scores > thresholds.score_thresh)[0]
    boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
    keep = remove_small_boxes(boxes, min_box_size)
    boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
    keep = batched_nms(boxes, scores, labels, thresholds.nms_thresh)[: thresholds.detections_per_img]
    return Detections(boxes[keep], scores[keep], labels[keep])
