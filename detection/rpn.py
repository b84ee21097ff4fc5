"""Region Proposal Network (Faster R-CNN, section 3.1).

Legend: N images, L levels, A anchors per position, H_l x W_l a level's size, R_i anchors over all levels of
an image (sum of H_l * W_l * A), P proposals kept for an image.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import batched_nms, box_iou, remove_small_boxes

from detection.anchors import AnchorGenerator
from detection.boxes import (
    FOREGROUND,
    BalancedPositiveNegativeSampler,
    BoxCoder,
    Matcher,
    clip_boxes,
    ignore_crowd,
)
from detection.interfaces import ProposalGenerator
from detection.structures import Proposals, ProposalStages
from detection.transform import ImageBatch
from vision.layers import group_norm


class RPNHead(nn.Module):
    """A 3x3 conv (the paper's "sliding window") + ReLU, then sibling 1x1 convs: objectness (A logits) and
    box deltas (4A) per position. Shared by all levels. ``conv_depth`` 3x3 convs (2 in torchvision's v2);
    ``norm="gn"`` puts a GroupNorm after each of them, before its ReLU (statistics per level and image)."""

    def __init__(self, in_channels: int, num_anchors: int, *, conv_depth: int = 1, norm: str | None = None
                 ) -> None:
        super().__init__()
        if norm not in (None, "gn"):
            raise ValueError(f"RPN head norm must be 'gn' or None, got {norm!r}")
        self.conv = nn.ModuleList(
            nn.Conv2d(in_channels, in_channels, 3, padding=1) for _ in range(conv_depth)
        )
        # no state when off: checkpoints of the plain head load unchanged
        self.norm = nn.ModuleList(
            group_norm(in_channels) if norm == "gn" else nn.Identity() for _ in range(conv_depth)
        )
        self.cls_logits = nn.Conv2d(in_channels, num_anchors, 1)
        self.bbox_pred = nn.Conv2d(in_channels, num_anchors * 4, 1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.01)
                nn.init.zeros_(m.bias)

    def forward(self, features: Sequence[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """L maps [N, C, H_l, W_l] -> objectness L x [N, A, H_l, W_l], deltas L x [N, 4A, H_l, W_l]."""
        objectness, deltas = [], []
        for x in features:
            for conv, norm in zip(self.conv, self.norm, strict=True):
                x = F.relu(norm(conv(x)), inplace=True)
            objectness.append(self.cls_logits(x))
            deltas.append(self.bbox_pred(x))
        return objectness, deltas


def flatten_predictions(objectness: Tensor, deltas: Tensor) -> tuple[Tensor, Tensor]:
    """[N, A, H, W], [N, 4A, H, W] -> [N, H*W*A], [N, H*W*A, 4], in AnchorGenerator's anchor order."""
    n, a, h, w = objectness.shape
    objectness = objectness.permute(0, 2, 3, 1).reshape(n, -1)
    deltas = deltas.reshape(n, a, 4, h, w).permute(0, 3, 4, 1, 2).reshape(n, -1, 4)
    return objectness, deltas


@dataclass
class RPNPredictions:
    """The RPN head's outputs for a batch, per level: objectness logits L x [N, R_l] and deltas
    L x [N, R_l, 4], the anchors [R_l, 4] of each level (in AnchorGenerator's order) and each level's grid
    (H_l, W_l); ``objectness`` [N, R] and ``deltas`` [N, R, 4] are all levels in one tensor."""

    level_objectness: list[Tensor]
    level_deltas: list[Tensor]
    anchors: list[Tensor]
    grid_sizes: list[tuple[int, int]]

    @property
    def objectness(self) -> Tensor:
        return torch.cat(self.level_objectness, dim=1)

    @property
    def deltas(self) -> Tensor:
        return torch.cat(self.level_deltas, dim=1)

    @property
    def num_per_level(self) -> list[int]:
        return [a.shape[0] for a in self.anchors]

    def detach(self) -> RPNPredictions:
        return RPNPredictions([o.detach() for o in self.level_objectness],
                              [d.detach() for d in self.level_deltas], self.anchors, self.grid_sizes)


class RegionProposalNetwork(ProposalGenerator):
    """Anchors + RPNHead -> proposals per image, and the RPN losses when targets are given.

    A proposal source for TwoStageDetector: ``forward(batch, features, targets, proposals)`` returns
    (Proposals per image: P boxes in the batch's resized coordinates with their objectness,
    {loss_objectness, loss_rpn_box_reg}).

    Proposals: the ``pre_nms_top_n`` best-scored anchors of each level are decoded, clipped to the image,
    boxes under ``min_box_size`` px and scores under ``score_thresh`` dropped, NMS at ``nms_thresh`` run
    per level, and the ``post_nms_top_n`` best kept. Train and test take separate top-n values.
    Training: anchors with IoU >= ``fg_iou_thresh`` (or the best for a ground truth) are positive,
    < ``bg_iou_thresh`` negative, except that negatives lying at least ``ignore_iof_thresh`` inside one of
    the target's ``crowd_boxes`` (intersection over the anchor's area) are ignored;
    ``batch_size_per_image`` anchors are sampled, up to ``positive_fraction`` positive. The box loss is
    smooth-L1 (``smooth_l1_beta``; 0 gives L1) over positives, normalised by the sampled count.
    """

    def __init__(
        self,
        anchor_generator: AnchorGenerator,
        head: RPNHead,
        *,
        in_features: Sequence[str],
        fg_iou_thresh: float = 0.7,
        bg_iou_thresh: float = 0.3,
        batch_size_per_image: int = 256,
        positive_fraction: float = 0.5,
        pre_nms_top_n_train: int = 2000,
        pre_nms_top_n_test: int = 1000,
        post_nms_top_n_train: int = 2000,
        post_nms_top_n_test: int = 1000,
        nms_thresh: float = 0.7,
        score_thresh: float = 0.0,
        min_box_size: float = 1e-3,
        smooth_l1_beta: float = 1.0 / 9,
        ignore_iof_thresh: float = 0.5,
    ) -> None:
        super().__init__()
        self.anchor_generator = anchor_generator
        self.head = head
        self.in_features = list(in_features)
        self.box_coder = BoxCoder((1.0, 1.0, 1.0, 1.0))
        self.matcher = Matcher(fg_iou_thresh, bg_iou_thresh, allow_low_quality_matches=True)
        self.sampler = BalancedPositiveNegativeSampler(batch_size_per_image, positive_fraction)
        self.pre_nms_top_n = {True: pre_nms_top_n_train, False: pre_nms_top_n_test}
        self.post_nms_top_n = {True: post_nms_top_n_train, False: post_nms_top_n_test}
        self.nms_thresh = nms_thresh
        self.score_thresh = score_thresh
        self.min_box_size = min_box_size
        self.smooth_l1_beta = smooth_l1_beta
        self.ignore_iof_thresh = ignore_iof_thresh

    def forward(
        self,
        batch: ImageBatch,
        features: dict[str, Tensor],
        targets: list[dict[str, Tensor]] | None = None,
        proposals: list[Tensor] | None = None,
    ) -> tuple[list[Proposals], dict[str, Tensor]]:
        if proposals is not None:
            raise ValueError("this detector makes its own proposals with an RPN; do not pass proposals to it")
        predictions = self.predict(batch, features)
        selected = self.select_proposals(predictions.detach(), batch)
        losses: dict[str, Tensor] = {}
        if targets is not None:
            p = predictions
            losses = self.losses(p.objectness, p.deltas, torch.cat(p.anchors), targets)
        return selected, losses

    def inspect(
        self, batch: ImageBatch, features: dict[str, Tensor], proposals: list[Tensor] | None = None
    ) -> ProposalStages:
        """What ``forward`` computes at test time, with its intermediate results (for detection.explain)."""
        if proposals is not None:
            raise ValueError("a Faster R-CNN makes its own proposals; do not pass proposals")
        predictions = self.predict(batch, features)
        candidates = self.candidates(predictions, batch)
        return ProposalStages(self.suppress(candidates), candidates, predictions)

    def predict(self, batch: ImageBatch, features: dict[str, Tensor]) -> RPNPredictions:
        """The head on every level, and the anchors its outputs refer to."""
        maps = [features[name] for name in self.in_features]
        objectness_maps, delta_maps = self.head(maps)
        # sizes as the shapes give them: ints, or 0-d tensors while traced (the anchors follow the input)
        grid_sizes = [tuple(m.shape[-2:]) for m in maps]
        anchors = self.anchor_generator(tuple(batch.tensors.shape[-2:]), grid_sizes, device=maps[0].device)
        flat = [flatten_predictions(o, d) for o, d in zip(objectness_maps, delta_maps, strict=True)]
        return RPNPredictions([o for o, _ in flat], [d for _, d in flat], anchors, grid_sizes)

    def select_proposals(self, predictions: RPNPredictions, batch: ImageBatch) -> list[Proposals]:
        """The proposals of each image, best first, with their objectness."""
        return self.suppress(self.candidates(predictions, batch))

    def candidates(self, predictions: RPNPredictions, batch: ImageBatch) -> list[Proposals]:
        """Per image, the ``pre_nms_top_n`` best anchors of each level moved by their deltas, clipped, with
        boxes under ``min_box_size`` px and scores under ``score_thresh`` dropped (NMS not yet run)."""
        pre_n = self.pre_nms_top_n[self.training]
        # top-k per level first, so only the kept anchors are decoded (the others could never be proposals)
        scores, chosen_deltas, chosen_anchors, level_ids = [], [], [], []
        for level, (objectness, deltas, anchors) in enumerate(
            zip(predictions.level_objectness, predictions.level_deltas, predictions.anchors, strict=True)
        ):
            k = torch._shape_as_tensor(objectness)[1].clamp(max=pre_n)  # a tensor: traced, it stays dynamic
            idx = objectness.topk(k, dim=1).indices  # [N, k]
            rows = torch.arange(objectness.shape[0], device=objectness.device)[:, None]
            scores.append(torch.sigmoid(objectness[rows, idx]))
            chosen_deltas.append(deltas[rows, idx])
            chosen_anchors.append(anchors[idx])
            level_ids.append(torch.full_like(idx[0], level))
        scores, levels = torch.cat(scores, dim=1), torch.cat(level_ids)  # [N, K], [K]
        chosen_deltas, chosen_anchors = torch.cat(chosen_deltas, dim=1), torch.cat(chosen_anchors, dim=1)
        out = []
        for i, image_size in enumerate(batch.image_sizes):
            boxes = clip_boxes(self.box_coder.decode(chosen_deltas[i], chosen_anchors[i]), image_size)
            keep = remove_small_boxes(boxes, self.min_box_size)
            keep = keep[scores[i, keep] >= self.score_thresh]
            out.append(Proposals(boxes[keep], scores[i, keep], levels[keep]))
        return out

    def suppress(self, candidates: list[Proposals]) -> list[Proposals]:
        """NMS at ``nms_thresh`` per level, then the ``post_nms_top_n`` best of each image."""
        post_n = self.post_nms_top_n[self.training]
        return [
            c.filter(batched_nms(c.boxes, c.scores, c.levels, self.nms_thresh)[:post_n]) for c in candidates
        ]

    @torch.no_grad()
    def label_anchors(self, anchors: Tensor, target: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """anchors [R, 4] -> (matched_idxs [R], labels [R] in {FOREGROUND, BACKGROUND, IGNORE}) for one
        image's target: IoU matching, then crowd regions' negatives ignored."""
        matched_idxs, labels = self.matcher(box_iou(target["boxes"].to(anchors.dtype), anchors))
        labels = ignore_crowd(labels, anchors, target.get("crowd_boxes"), self.ignore_iof_thresh)
        return matched_idxs, labels

    def losses(
        self, objectness: Tensor, deltas: Tensor, anchors: Tensor, targets: list[dict[str, Tensor]]
    ) -> dict[str, Tensor]:
        """objectness [N, R], deltas [N, R, 4], anchors [R, 4]. Images without boxes give only negatives
        (and ignored anchors on their crowd regions)."""
        obj_logits, obj_labels, box_pred, box_targets = [], [], [], []
        for i, target in enumerate(targets):
            matched_idxs, labels = self.label_anchors(anchors, target)
            gt_boxes = target["boxes"].to(anchors.dtype)
            pos, neg = self.sampler(labels)
            sampled = torch.cat((pos, neg))
            obj_logits.append(objectness[i, sampled])
            obj_labels.append((labels[sampled] == FOREGROUND).to(objectness.dtype))
            box_pred.append(deltas[i, pos])
            box_targets.append(self.box_coder.encode(gt_boxes[matched_idxs[pos]], anchors[pos]))
        obj_logits, obj_labels = torch.cat(obj_logits), torch.cat(obj_labels)
        box_pred, box_targets = torch.cat(box_pred), torch.cat(box_targets)
        num_sampled = max(obj_logits.numel(), 1)
        loss_objectness = (
            F.binary_cross_entropy_with_logits(obj_logits, obj_labels, reduction="sum") / num_sampled
        )
        loss_box = box_regression_loss(box_pred, box_targets, self.smooth_l1_beta) / num_sampled
        return {"loss_objectness": loss_objectness, "loss_rpn_box_reg": loss_box}


def box_regression_loss(pred: Tensor, target: Tensor, beta: float) -> Tensor:
    """Summed smooth-L1 with transition ``beta`` (``beta == 0`` is plain L1); 0 for empty inputs."""
    if beta == 0:
        return F.l1_loss(pred, target, reduction="sum")
    return F.smooth_l1_loss(pred, target, beta=beta, reduction="sum")
