"""The per-region half of Fast/Faster R-CNN: RoI pooling, box head, predictor, loss and post-processing.

Legend: N images, P_i proposals of image i, R regions in a batch, K object classes (labels 1..K, 0 is
background), C channels, S x S the pooled grid.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import box_area, box_iou, roi_pool

from detection.boxes import BalancedPositiveNegativeSampler, BoxCoder, Matcher, ignore_crowd
from detection.interfaces import RegionHeads
from detection.roi_align import roi_align
from detection.rpn import box_regression_loss
from vision.layers import group_norm, linear

POOLER_METHODS = ("pool", "align", "multiscale")


class RoIPooler(nn.Module):
    """Pool every region to a fixed S x S grid of features.

    method "pool": RoIPool (max over bins, Fast R-CNN's layer) on one map; "align": RoIAlign (bilinear,
    ``sampling_ratio`` points per bin) on one map; "multiscale": FPN's level assignment (``fpn_levels``,
    clamped to the given levels) with RoIAlign on each level.
    """

    def __init__(
        self,
        method: str,
        in_features: Sequence[str],
        strides: Sequence[int],
        *,
        output_size: int = 7,
        sampling_ratio: int = 2,
        aligned: bool = False,
    ) -> None:
        super().__init__()
        if method not in POOLER_METHODS:
            raise ValueError(f"unknown RoI pooler {method!r}; choose one of {POOLER_METHODS}")
        if method != "multiscale" and len(in_features) != 1:
            raise ValueError(f"RoI pooler {method!r} works on one feature map, got {list(in_features)}")
        self.method = method
        self.in_features = list(in_features)
        self.strides = list(strides)
        self.output_size = output_size
        self.sampling_ratio = sampling_ratio
        self.aligned = aligned
        # FPN levels of the maps, from their declared strides (4 -> P2 ...), never guessed from a batch
        self.levels = [int(round(math.log2(s))) for s in self.strides]
        consecutive = list(range(self.levels[0], self.levels[0] + len(self.levels)))
        if method == "multiscale" and self.levels != consecutive:
            raise ValueError(f"multiscale pooling needs consecutive pyramid levels, got {self.strides}")

    def forward(
        self, features: dict[str, Tensor], boxes: list[Tensor], image_sizes: list[tuple[int, int]]
    ) -> Tensor:
        """boxes: N tensors [P_i, 4] in image pixels -> [R, C, S, S], in the order of the boxes.
        ``image_sizes`` is not read: every scale comes from the declared strides."""
        x = features[self.in_features[0]]
        boxes = [b.to(x.dtype) for b in boxes]
        if self.method == "multiscale":
            return self._multiscale(features, boxes)
        scale = 1.0 / self.strides[0]
        if self.method == "pool":
            return roi_pool(x, boxes, self.output_size, scale)
        return roi_align(x, boxes, self.output_size, scale, self.sampling_ratio, self.aligned)

    def _multiscale(self, features: dict[str, Tensor], boxes: list[Tensor]) -> Tensor:
        """RoIAlign of each region on the level ``fpn_levels`` assigns it, in the order of the boxes.

        Written without Python branches on data or sizes read as numbers, so that a traced export
        (detection.export) keeps the region count dynamic."""
        rois = torch.cat([torch.cat([torch.full_like(b[:, :1], i), b], dim=1) for i, b in enumerate(boxes)])
        levels = fpn_levels(rois[:, 1:], self.levels[0], self.levels[-1]) - self.levels[0]
        out = None
        for index, (name, stride) in enumerate(zip(self.in_features, self.strides, strict=True)):
            picked = torch.where(levels == index)[0]
            pooled = roi_align(features[name], rois[picked], self.output_size, 1.0 / stride,
                               self.sampling_ratio, self.aligned)
            if out is None:
                out = pooled.new_zeros((rois.size(0), *pooled.shape[1:]))
            out.index_put_((picked,), pooled)  # in place: one result tensor, not a copy per level
        return out


def fpn_levels(boxes: Tensor, min_level: int, max_level: int, *, canonical_size: float = 224.0,
               canonical_level: int = 4) -> Tensor:
    """The pyramid level of each box [R, 4] (FPN paper, eq. 1): k = floor(k0 + log2(sqrt(wh) / 224)),
    clamped to [min_level, max_level]. A 224 px box (ImageNet's size) goes to P4, half that to P3.

    A tiny epsilon keeps sizes that are exact powers of two of 224 on the level the equation gives,
    despite float rounding in log2.
    """
    sizes = box_area(boxes).sqrt()
    levels = torch.floor(canonical_level + torch.log2(sizes / canonical_size) + 1e-6)
    return levels.clamp(min_level, max_level).to(torch.int64)


class TwoMLPHead(nn.Module):
    """FPN box head: flatten, fc6, ReLU, fc7, ReLU (two 1024-d layers in the FPN paper).

    Two options the ablation studies toggle, off by default (the paper's head): ``norm="gn"`` puts a
    GroupNorm after each fc, before its ReLU; ``dropout`` > 0 drops features after each ReLU while training
    (``nn.Dropout``: nothing at evaluation). Neither adds state to the head when off, so checkpoints of the
    plain head load unchanged."""

    def __init__(
        self, in_features: int, representation_size: int = 1024, *, norm: str | None = None,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if norm not in (None, "gn"):
            raise ValueError(f"box head norm must be 'gn' or None, got {norm!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"box head dropout must be in [0, 1), got {dropout}")
        self.fc6 = nn.Linear(in_features, representation_size)
        self.fc7 = nn.Linear(representation_size, representation_size)
        gn = norm == "gn"
        self.norm6 = group_norm(representation_size) if gn else nn.Identity()
        self.norm7 = group_norm(representation_size) if gn else nn.Identity()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.out_channels = representation_size

    def forward(self, x: Tensor) -> Tensor:
        """[R, C, S, S] -> [R, representation_size]."""
        x = self.dropout(F.relu(self.norm6(linear(self.fc6, x.flatten(1))), inplace=True))
        return self.dropout(F.relu(self.norm7(linear(self.fc7, x)), inplace=True))


class VGGBoxHead(nn.Module):
    """VGG-16's fc6/fc7 (with ReLU and dropout) applied per region, as in Fast R-CNN (section 2.3): the
    layers are copied from the backbone's ImageNet classifier, which fits because RoI pooling to 7x7 on
    conv5 gives the 512 x 7 x 7 input the classifier was trained on."""

    def __init__(self, fc6: nn.Linear, fc7: nn.Linear, dropout: float = 0.5) -> None:
        super().__init__()
        self.fc6 = nn.Linear(fc6.in_features, fc6.out_features)
        self.fc7 = nn.Linear(fc7.in_features, fc7.out_features)
        self.fc6.load_state_dict(fc6.state_dict())
        self.fc7.load_state_dict(fc7.state_dict())
        self.dropout = nn.Dropout(dropout)
        self.out_channels = fc7.out_features

    def forward(self, x: Tensor) -> Tensor:
        """[R, 512, 7, 7] -> [R, 4096]."""
        x = self.dropout(F.relu(linear(self.fc6, x.flatten(1)), inplace=True))
        return self.dropout(F.relu(linear(self.fc7, x), inplace=True))


class ResNetC4Head(nn.Module):
    """ResNet's res5 stage run per region, then global average pooling (He et al. 2016, appendix A):
    conv1..conv4 are shared over the image, conv5 plays the role of VGG's fc layers."""

    def __init__(self, res5: nn.Module, out_channels: int) -> None:
        super().__init__()
        self.res5 = res5
        self.out_channels = out_channels

    def forward(self, x: Tensor) -> Tensor:
        """[R, C4, S, S] -> [R, C5]."""
        return self.res5(x).mean(dim=(2, 3))


class ConvFCHead(nn.Module):
    """Convs (3x3, BatchNorm, ReLU) then FC layers with ReLU: the box head of torchvision's v2 model
    (4 x 256 convs + one 1024 FC), from "Benchmarking detection transfer learning with vision
    transformers" (Li et al., 2021). ``norm="gn"``: GroupNorm in place of the BatchNorms."""

    def __init__(
        self, in_channels: int, resolution: int, conv_dims: Sequence[int], fc_dims: Sequence[int],
        *, norm: str = "bn",
    ) -> None:
        super().__init__()
        if norm not in ("bn", "gn"):
            raise ValueError(f"conv head norm must be 'bn' or 'gn', got {norm!r}")
        convs: list[nn.Module] = []
        for dim in conv_dims:
            convs += [
                nn.Conv2d(in_channels, dim, 3, padding=1, bias=False),
                nn.BatchNorm2d(dim) if norm == "bn" else group_norm(dim),
                nn.ReLU(inplace=True),
            ]
            in_channels = dim
        self.convs = nn.Sequential(*convs)
        fcs: list[nn.Module] = []
        in_features = in_channels * resolution * resolution
        for dim in fc_dims:
            fcs += [nn.Linear(in_features, dim), nn.ReLU(inplace=True)]
            in_features = dim
        self.fcs = nn.Sequential(*fcs)
        self.out_channels = in_features
        for m in self.convs.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        """[R, C, S, S] -> [R, fc_dims[-1]]."""
        return self.fcs(self.convs(x).flatten(1))


class BoxPredictor(nn.Module):
    """Sibling layers on the box head's features: K + 1 class scores and class-specific box deltas
    (4 per class, background included so the layout matches torchvision's checkpoints).

    ``void_classes`` V adds logits after the K + 1 that take part in the softmax but are never predicted
    nor trained towards: torchvision's COCO models score 10 unused "N/A" category ids this way, and keeping
    them keeps converted scores identical.
    """

    def __init__(self, in_channels: int, num_classes: int, *, void_classes: int = 0) -> None:
        super().__init__()
        self.cls_score = nn.Linear(in_channels, num_classes + 1 + void_classes)
        self.bbox_pred = nn.Linear(in_channels, (num_classes + 1) * 4)
        # Fast R-CNN, section 2.3: zero-mean Gaussians, std 0.01 (classification) and 0.001 (regression)
        nn.init.normal_(self.cls_score.weight, std=0.01)
        nn.init.normal_(self.bbox_pred.weight, std=0.001)
        nn.init.zeros_(self.cls_score.bias)
        nn.init.zeros_(self.bbox_pred.bias)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """[R, D] -> class logits [R, K + 1 + V], box deltas [R, 4 (K + 1)]."""
        return self.cls_score(x), self.bbox_pred(x)


def fast_rcnn_loss(
    class_logits: Tensor,
    box_deltas: Tensor,
    labels: Tensor,
    box_targets: Tensor,
    smooth_l1_beta: float = 1.0 / 9,
) -> dict[str, Tensor]:
    """The multi-task loss (Fast R-CNN, eq. 1) over R sampled regions.

    class_logits [R, K + 1], box_deltas [R, 4 (K + 1)], labels [R] in 0..K, box_targets [R, 4] (read for
    labels > 0). Cross-entropy averaged over R; the box loss on the ground-truth class's deltas of the
    foreground regions, summed and divided by R. No regions gives zero losses (still in the graph).
    """
    if labels.numel() == 0:
        zero = class_logits.sum() * 0 + box_deltas.sum() * 0
        return {"loss_classifier": zero, "loss_box_reg": zero.clone()}
    loss_classifier = F.cross_entropy(class_logits, labels)
    fg = torch.where(labels > 0)[0]
    deltas = box_deltas.reshape(box_deltas.shape[0], -1, 4)[fg, labels[fg]]
    loss_box_reg = box_regression_loss(deltas, box_targets[fg], smooth_l1_beta) / labels.numel()
    return {"loss_classifier": loss_classifier, "loss_box_reg": loss_box_reg}


class RoIHeads(RegionHeads):
    """Regions -> class scores and refined boxes (the Fast R-CNN detector on shared features).

    Training regions: the proposals plus the ground-truth boxes, matched by IoU: foreground at
    >= ``fg_iou_thresh``, background in ``bg_iou_range`` [lo, hi) unless it lies at least
    ``ignore_iof_thresh`` inside one of the target's ``crowd_boxes`` (then it is ignored);
    ``batch_size_per_image`` sampled with up to ``positive_fraction`` foreground. Testing: every proposal
    is scored, decoded per class, and post-processed by ``detections_from_scores`` with the thresholds of
    the call (``score_thresh``, ``nms_thresh`` and ``detections_per_img`` given here are the defaults:
    ``thresholds``).
    """

    def __init__(
        self,
        pooler: nn.Module,
        box_head: nn.Module,
        box_predictor: BoxPredictor,
        *,
        fg_iou_thresh: float = 0.5,
        bg_iou_range: tuple[float, float] = (0.0, 0.5),
        batch_size_per_image: int = 512,
        positive_fraction: float = 0.25,
        box_coder_weights: Sequence[float] = (10.0, 10.0, 5.0, 5.0),
        smooth_l1_beta: float = 1.0 / 9,
        score_thresh: float = 0.05,
        nms_thresh: float = 0.5,
        detections_per_img: int = 100,
        add_gt_as_proposals: bool = True,
        ignore_iof_thresh: float = 0.5,
    ) -> None:
        super().__init__()
        self.pooler = pooler
        self.box_head = box_head
        self.box_predictor = box_predictor
        self.box_coder = BoxCoder(box_coder_weights)
        self.matcher = Matcher(fg_iou_thresh, bg_iou_range[1], bg_iou_min=bg_iou_range[0])
        self.sampler = BalancedPositiveNegativeSampler(batch_size_per_image, positive_fraction)
        self.smooth_l1_beta = smooth_l1_beta
        self.score_thresh = score_thresh
        self.nms_thresh = nms_thresh
        self.detections_per_img = detections_per_img
        self.add_gt_as_proposals = add_gt_as_proposals
        self.ignore_iof_thresh = ignore_iof_thresh

    def losses(self, features: dict[str, Tensor], proposals: list[Tensor], image_sizes: list[tuple[int, int]],
               targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        """The multi-task loss (``fast_rcnn_loss``) on regions sampled from the proposals and the targets."""
        regions, labels, box_targets = self.sample_regions(proposals, targets)
        class_logits, box_deltas = self.logits_and_deltas(features, regions, image_sizes)
        return fast_rcnn_loss(class_logits, box_deltas, labels, box_targets, self.smooth_l1_beta)

    def logits_and_deltas(
        self, features: dict[str, Tensor], regions: list[Tensor], image_sizes: list[tuple[int, int]]
    ) -> tuple[Tensor, Tensor]:
        """Pool, box head, predictor: N tensors [P_i, 4] -> logits [R, K + 1 + V], deltas [R, 4 (K + 1)]."""
        return self.box_predictor(self.box_head(self.pooler(features, regions, image_sizes)))

    def predict(
        self, features: dict[str, Tensor], regions: list[Tensor], image_sizes: list[tuple[int, int]]
    ) -> tuple[Tensor, Tensor]:
        """Every region's class-specific decoded boxes [R, K, 4] and softmax scores [R, K] (background and
        void classes left out): what NMS chooses from."""
        class_logits, box_deltas = self.logits_and_deltas(features, regions, image_sizes)
        boxes = self.box_coder.decode(box_deltas, torch.cat(regions)).reshape(box_deltas.shape[0], -1, 4)
        scores = F.softmax(class_logits, dim=-1)[:, : boxes.shape[1]]  # void classes are never predicted
        return boxes[:, 1:], scores[:, 1:]

    @torch.no_grad()
    def sample_regions(
        self, proposals: list[Tensor], targets: list[dict[str, Tensor]]
    ) -> tuple[list[Tensor], Tensor, Tensor]:
        """Sampled regions per image, with their labels [R] (0 background) and box targets [R, 4]."""
        regions, labels, box_targets = [], [], []
        for boxes, target in zip(proposals, targets, strict=True):
            gt_boxes, gt_labels = target["boxes"].to(boxes.dtype), target["labels"]
            if self.add_gt_as_proposals:
                boxes = torch.cat((boxes, gt_boxes))
            matched_idxs, match = self.matcher(box_iou(gt_boxes, boxes))
            match = ignore_crowd(match, boxes, target.get("crowd_boxes"), self.ignore_iof_thresh)
            pos, neg = self.sampler(match)
            sampled = torch.cat((pos, neg))
            region_labels = torch.zeros(sampled.numel(), dtype=torch.int64, device=boxes.device)
            region_targets = torch.zeros((sampled.numel(), 4), dtype=boxes.dtype, device=boxes.device)
            if pos.numel():
                region_labels[: pos.numel()] = gt_labels[matched_idxs[pos]]
                region_targets[: pos.numel()] = self.box_coder.encode(gt_boxes[matched_idxs[pos]], boxes[pos])
            regions.append(boxes[sampled])
            labels.append(region_labels)
            box_targets.append(region_targets)
        return regions, torch.cat(labels), torch.cat(box_targets)
