"""R-CNN (Girshick et al., CVPR 2014) as the third configuration of TwoStageDetector.

Test time, per image (the paper's figure 1), with the skeleton's parts:

    transform           normalise only: R-CNN works at the image's own size (no resize)
    backbone            ImageInput: nothing is computed over the whole image; the pixels pass through
    proposal_generator  ExternalProposals: selective search (about 2000 boxes)
    roi_heads           RCNNHeads:
        WarpedRegions   each proposal + 16 px of context warped to the CNN's input size  (detection.warp)
        RegionCNN       the CNN on every warped region: pool5 -> fc6 -> fc7
        SVMPredictor    one linear SVM per class on fc7; ridge box regression on pool5 (or fc7), per class
        then per-class NMS                              (interfaces.detections_from_scores)

Training has stages, each kept on disk (detection.rcnn_stages): fine-tune the CNN on warped regions (the
detector's forward with targets: IoU >= 0.5 foreground, 32 foreground + 96 background per batch of 128
drawn over all images of the batch), then ``RCNNHeads.train_later_stages``: cache features, train the SVMs
with hard negative mining and fit the box regressors. The CNN parts (backbone,
fc6/fc7 head) and the box coding, matching, sampling and post-processing are the ones Fast and Faster
R-CNN use.

Legend: P proposals of an image, R warped regions, K object classes (labels 1..K, 0 background), D feature
size, S the warped input side.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset
from torchvision.ops import box_iou

from detection.boxes import FOREGROUND, BalancedPositiveNegativeSampler, BoxCoder, Matcher, ignore_crowd
from detection.interfaces import RegionHeads
from detection.rcnn_stages import BoxRegressionConfig, SVMConfig, run_stages
from detection.roi_heads import RoIPooler
from detection.warp import warp_regions
from vision.backbones import FeatureInfo

__all__ = ["RCNNConfig", "ImageInput", "WarpedRegions", "RegionCNN", "SVMPredictor", "RCNNHeads"]


@dataclass
class RCNNConfig:
    """The ``rcnn:`` section of a DetectorConfig: what only R-CNN (``arch: rcnn_<body>``) uses; the defaults
    are the paper's (VGG-16 variant, table 3). Pooled size, fc width, IoU thresholds, foreground fraction
    and test thresholds are the ``roi:`` section's, as for Fast/Faster R-CNN."""

    input_size: int = 224  # S: regions are warped to S x S (227 for AlexNet)
    context_padding: int = 16  # warped pixels of context around each box (appendix A)
    feature_map: str | None = None  # the map pooled to pool5; None: conv5 (VGG), c4 (ResNet)
    head: Literal["fc", "res5"] = "fc"  # fc: VGG's fc6/fc7 (fresh FC layers on ResNet); res5: ResNet's own
    batch_size: int = 128  # regions per fine-tuning batch, drawn over all images of the batch
    region_batch: int = 64  # warped regions per CNN forward at test time and in feature extraction (memory)
    svm: SVMConfig = field(default_factory=SVMConfig)
    bbox: BoxRegressionConfig = field(default_factory=BoxRegressionConfig)


# ---- the parts ---------------------------------------------------------------------------------------------


class ImageInput(nn.Module):
    """R-CNN's "backbone" stage: nothing is shared over the image, so the normalised pixels pass through
    (as the map ``image``, stride 1) to the per-region stage."""

    def __init__(self) -> None:
        super().__init__()
        self.feature_info = {"image": FeatureInfo(3, 1)}

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return {"image": x}


class WarpedRegions(nn.Module):
    """The RoI feature stage of R-CNN (appendix A): every region, grown by ``context_padding`` warped
    pixels of context, warped anisotropically to ``input_size`` squared from its own image's pixels.

    ``forward(features, boxes, image_sizes)``: features["image"] [N, 3, H_pad, W_pad] normalised, boxes N
    tensors [P_i, 4] -> [R, 3, S, S]. Each image is read without the batch's padding, so context beyond
    its border is the mean (0), whatever the other images' sizes.
    """

    def __init__(self, input_size: int = 224, context_padding: int = 16) -> None:
        super().__init__()
        self.input_size = input_size
        self.context_padding = context_padding

    def forward(self, features: dict[str, Tensor], boxes: list[Tensor], image_sizes: list[tuple[int, int]]
                ) -> Tensor:
        images = features["image"]
        regions = [warp_regions(images[i, :, :h, :w], b, self.input_size, self.context_padding)
                   for i, (b, (h, w)) in enumerate(zip(boxes, image_sizes, strict=True))]
        return torch.cat(regions) if regions else images.new_zeros((0, 3, self.input_size, self.input_size))


class RegionCNN(nn.Module):
    """The CNN run on each warped region: the backbone's ``feature_map`` max-pooled to ``pool_size`` squared
    over the whole region (pool5), then the fc6/fc7 ``head``. ``forward(regions [R, 3, S, S])`` ->
    (pool5 [R, C * pool_size^2], fc7 [R, D])."""

    def __init__(self, backbone: nn.Module, head: nn.Module, feature_map: str, pool_size: int,
                 input_size: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.input_size = input_size
        stride = backbone.feature_info[feature_map].stride
        self.pool5 = RoIPooler("pool", [feature_map], [stride], output_size=pool_size)
        self.out_channels = head.out_channels
        self.pool_channels = backbone.feature_info[feature_map].channels * pool_size**2

    def forward(self, regions: Tensor) -> tuple[Tensor, Tensor]:
        if len(regions) == 0:
            regions = regions.new_zeros((1, 3, self.input_size, self.input_size))
            pool, fc7 = self(regions)
            return pool[:0], fc7[:0]
        maps = self.backbone(regions)
        side = float(self.input_size)
        whole = [regions.new_tensor([[0.0, 0.0, side, side]]) for _ in range(len(regions))]
        pooled = self.pool5(maps, whole, [(self.input_size, self.input_size)] * len(regions))
        return pooled.flatten(1), self.head(pooled)


class SVMPredictor(nn.Module):
    """Class scores and box deltas from a region's CNN features (sections 2.3 and appendix C).

    Before the later training stages exist it scores with ``cls_score`` (fc8, the K + 1-way softmax the
    CNN is fine-tuned with; the paper's "fine-tuned, no SVM" row) and leaves boxes where they are. Once
    trained, ``svm_weight``/``svm_bias`` score fc7 (sigmoid of the SVM margin: same ranking, a score in
    [0, 1]) and ``bbox_weight``/``bbox_bias`` regress deltas from pool5 or fc7 (``bbox_features``), both on
    features multiplied by their ``*_scale``. These are buffers: saved with the weights, set by
    detection.rcnn_stages, never by the optimiser.
    """

    def __init__(self, feature_dim: int, pool_dim: int, num_classes: int,
                 bbox_features: Literal["pool", "fc7"] = "pool") -> None:
        super().__init__()
        k = num_classes
        self.num_classes = k
        self.bbox_features = bbox_features
        self.cls_score = nn.Linear(feature_dim, k + 1)  # fc8, fine-tuning only
        nn.init.normal_(self.cls_score.weight, std=0.01)
        nn.init.zeros_(self.cls_score.bias)
        reg_dim = pool_dim if bbox_features == "pool" else feature_dim
        self.register_buffer("svm_weight", torch.zeros(k, feature_dim))
        self.register_buffer("svm_bias", torch.zeros(k))
        self.register_buffer("svm_scale", torch.ones(()))
        self.register_buffer("svm_trained", torch.zeros((), dtype=torch.bool))
        self.register_buffer("bbox_weight", torch.zeros(k, 4, reg_dim))
        self.register_buffer("bbox_bias", torch.zeros(k, 4))
        self.register_buffer("bbox_scale", torch.ones(()))
        self.register_buffer("bbox_trained", torch.zeros((), dtype=torch.bool))

    def class_scores(self, fc7: Tensor) -> Tensor:
        """fc7 [R, D] -> scores [R, K]: sigmoid of the SVM margins once trained, else the softmax's."""
        if bool(self.svm_trained):
            return torch.sigmoid(fc7 * self.svm_scale @ self.svm_weight.T + self.svm_bias)
        return F.softmax(self.cls_score(fc7), dim=1)[:, 1:]

    def box_deltas(self, pool: Tensor, fc7: Tensor) -> Tensor | None:
        """Deltas [R, K, 4] of each class's ridge regressor, or None before they are fitted."""
        if not bool(self.bbox_trained):
            return None
        feats = pool if self.bbox_features == "pool" else fc7
        return torch.einsum("pd,kcd->pkc", feats * self.bbox_scale, self.bbox_weight) + self.bbox_bias

    def set_svms(self, weight: Tensor, bias: Tensor, scale: float) -> None:
        """weight [K, D], bias [K], the feature scale they were trained with."""
        self.svm_weight.copy_(weight)
        self.svm_bias.copy_(bias)
        self.svm_scale.fill_(scale)
        self.svm_trained.fill_(True)

    def set_box_regressors(self, weight: Tensor, bias: Tensor, scale: float) -> None:
        """weight [K, 4, D], bias [K, 4], the feature scale they were fitted with."""
        self.bbox_weight.copy_(weight)
        self.bbox_bias.copy_(bias)
        self.bbox_scale.fill_(scale)
        self.bbox_trained.fill_(True)


class RCNNHeads(RegionHeads):
    """R-CNN's per-region half (detection.interfaces.RegionHeads, as RoIHeads): TwoStageDetector runs it as
    it runs Fast R-CNN's, and its training stages after fine-tuning are ``train_later_stages``.

    Fine-tuning (targets given): the proposals and ground-truth boxes of all images, matched by IoU
    (foreground at >= ``fg_iou_thresh``, everything else background unless at least ``ignore_iof_thresh``
    inside a crowd box: ignored), ``batch_size`` regions sampled over the whole batch with up to
    ``positive_fraction`` foreground, softmax loss on fc8. Testing: every proposal warped and scored,
    ``region_batch`` at a time; boxes moved by the class's regressor; per-class NMS.
    """

    def __init__(self, warp: WarpedRegions, cnn: RegionCNN, predictor: SVMPredictor, *,
                 fg_iou_thresh: float = 0.5, batch_size: int = 128, positive_fraction: float = 0.25,
                 ignore_iof_thresh: float = 0.5, region_batch: int = 64, score_thresh: float = 0.05,
                 nms_thresh: float = 0.3, detections_per_img: int = 100) -> None:
        super().__init__()
        self.warp = warp
        self.cnn = cnn
        self.predictor = predictor
        self.matcher = Matcher(fg_iou_thresh, fg_iou_thresh)
        self.sampler = BalancedPositiveNegativeSampler(batch_size, positive_fraction)
        self.box_coder = BoxCoder((1.0, 1.0, 1.0, 1.0))  # the paper's unweighted parameterisation
        self.ignore_iof_thresh = ignore_iof_thresh
        self.region_batch = region_batch
        self.score_thresh = score_thresh
        self.nms_thresh = nms_thresh
        self.detections_per_img = detections_per_img

    def region_features(self, features: dict[str, Tensor], boxes: list[Tensor],
                        image_sizes: list[tuple[int, int]]) -> tuple[Tensor, Tensor]:
        """(pool5 [R, C s^2], fc7 [R, D]) of every region, warped and run ``region_batch`` at a time."""
        pools, fc7s = [], []
        for i, image_boxes in enumerate(boxes):
            one = {name: f[i : i + 1] for name, f in features.items()}
            for chunk in image_boxes.split(self.region_batch):
                pool, fc7 = self.cnn(self.warp(one, [chunk], [image_sizes[i]]))
                pools.append(pool)
                fc7s.append(fc7)
        if not pools:
            return self.cnn(features["image"].new_zeros((0, 3, self.warp.input_size, self.warp.input_size)))
        return torch.cat(pools), torch.cat(fc7s)

    def predict(self, features: dict[str, Tensor], regions: list[Tensor], image_sizes: list[tuple[int, int]]
                ) -> tuple[Tensor, Tensor]:
        """N tensors [P_i, 4] -> class-specific boxes [R, K, 4] (the regions themselves before the box
        regressors are fitted) and class scores [R, K] (the SVMs', or fc8's softmax before them)."""
        pool, fc7 = self.region_features(features, regions, image_sizes)
        scores = self.predictor.class_scores(fc7)
        boxes = torch.cat(regions) if regions else pool.new_zeros((0, 4))
        deltas = self.predictor.box_deltas(pool, fc7)
        k = self.predictor.num_classes
        if deltas is None:
            return boxes[:, None, :].expand(-1, k, -1), scores
        decoded = self.box_coder.decode(deltas.reshape(len(boxes), 4 * k), boxes)
        return decoded.reshape(-1, k, 4), scores

    def train_later_stages(self, detector: nn.Module, dataset: Dataset, stage_dir: Path, cfg: RCNNConfig,
                           log: Callable[[str], None] = print, *, workers: int = 0,
                           worker_init_fn: Callable[[int], None] | None = None) -> None:
        """R-CNN's stages after fine-tuning (detection.rcnn_stages: features, SVMs with hard negative mining,
        ridge box regression) over ``dataset`` (items ``(image, target)``, not augmented, with their
        ``proposals``; read by ``workers`` DataLoader processes) through ``detector`` (whose heads these
        are); each stage is kept under ``stage_dir`` so an interrupted run continues, and the results are
        loaded into this head's SVMPredictor."""
        if detector.roi_heads is not self:
            raise ValueError("train_later_stages needs the detector these heads belong to")
        run_stages(detector, dataset, stage_dir, cfg.svm, cfg.bbox, log, workers=workers,
                   worker_init_fn=worker_init_fn)

    def losses(self, features: dict[str, Tensor], proposals: list[Tensor],
                      image_sizes: list[tuple[int, int]], targets: list[dict[str, Tensor]]
                      ) -> dict[str, Tensor]:
        """Softmax loss on ``batch_size`` warped regions sampled over all images (25% foreground)."""
        boxes, matches, labels, owners = [], [], [], []
        with torch.no_grad():
            for i, (image_boxes, target) in enumerate(zip(proposals, targets, strict=True)):
                gt_boxes = target["boxes"].to(image_boxes.dtype)
                candidates = torch.cat([image_boxes, gt_boxes])
                matched, match = self.matcher(box_iou(gt_boxes, candidates))
                match = ignore_crowd(match, candidates, target.get("crowd_boxes"), self.ignore_iof_thresh)
                region_labels = torch.zeros(len(candidates), dtype=torch.int64, device=candidates.device)
                if len(gt_boxes):
                    fg = match == FOREGROUND
                    region_labels[fg] = target["labels"][matched[fg]]
                boxes.append(candidates)
                matches.append(match)
                labels.append(region_labels)
                owners.append(torch.full((len(candidates),), i, device=candidates.device))
            all_boxes, all_labels, all_owners = torch.cat(boxes), torch.cat(labels), torch.cat(owners)
            pos, neg = self.sampler(torch.cat(matches))  # over the whole batch, as the paper samples
            picked = torch.cat([pos, neg])
        cls_score = self.predictor.cls_score
        if picked.numel() == 0:  # no proposal and no object in any image: nothing to learn from
            return {"loss_classifier": cls_score.weight.sum() * 0}
        per_image = [picked[all_owners[picked] == i] for i in range(len(proposals))]
        regions = self.warp(features, [all_boxes[sel] for sel in per_image], image_sizes)
        _, fc7 = self.cnn(regions)
        return {"loss_classifier": F.cross_entropy(cls_score(fc7), all_labels[torch.cat(per_image)])}
