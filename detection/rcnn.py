"""R-CNN (Girshick et al., CVPR 2014): a CNN run on every warped proposal, linear SVMs, ridge box regression.

Test time, per image (the paper's figure 1):

    proposals = selective search (about 2000 boxes)
    regions   = warp(proposal + 16 px of context) to the CNN's input size        # detection.warp
    features  = CNN(regions): pool5 -> fc6 -> fc7                               # one pass per region
    scores    = one linear SVM per class on fc7;  boxes = ridge regression on pool5, per class
    detections = per-class NMS                              # roi_heads.detections_from_scores

Training has stages (apps/tasks/rcnn.py runs them, each checkpointed): fine-tune the CNN on warped regions
(this module's ``forward`` with targets: IoU >= 0.5 foreground, 32 foreground + 96 background per batch of
128), cache features, train the SVMs with hard negative mining (``train_svm_hard_negatives``) and fit the
box regressors (``fit_box_regressor``). The CNN parts (backbone, fc6/fc7 head) and the box coding, matching,
sampling and post-processing are the ones Fast and Faster R-CNN use.

Legend: P proposals of an image, R warped regions, K object classes (labels 1..K, 0 background), D feature
size, S the warped input side.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import box_iou

from detection.boxes import FOREGROUND, BalancedPositiveNegativeSampler, BoxCoder, Matcher, ignore_crowd
from detection.proposals import ProposalConfig, ProposalSource, build_proposal_source
from detection.roi_heads import ResNetC4Head, RoIPooler, TwoMLPHead, VGGBoxHead, detections_from_scores
from detection.structures import Detections, Thresholds
from detection.transform import check_inputs
from detection.warp import warp_regions
from vision.backbones import ResNetFeatures, VGGFeatures, build_network

__all__ = ["SVMConfig", "BoxRegressionConfig", "RCNNConfig", "RCNN", "build_rcnn", "SVMResult",
           "train_svm_hard_negatives", "fit_box_regressor", "feature_scale"]


@dataclass
class SVMConfig:
    """One-vs-rest linear SVMs on cached features (R-CNN section 2.3 and its released code)."""

    C: float = 0.001  # liblinear's cost
    positive_weight: float = 2.0  # positives are few: their hinge loss counts twice
    negative_iou: float = 0.3  # negatives: proposals below this IoU with every object of the class
    hard_threshold: float = -1.0001  # a negative scoring above this (inside the margin) is "hard"
    easy_threshold: float = -1.2  # after retraining, cached negatives scoring below this are dropped
    retrain_every: int = 2000  # new hard negatives collected before the SVM is retrained
    epochs: int = 1  # passes of hard negative mining over the training images
    feature_norm: float = 20.0  # features are scaled so their mean L2 norm is this


@dataclass
class BoxRegressionConfig:
    """Class-specific ridge regression of box deltas (R-CNN appendix C)."""

    enabled: bool = True
    alpha: float = 1000.0  # ridge penalty (lambda in the paper)
    min_iou: float = 0.6  # proposals overlapping their object by at least this are training pairs
    features: Literal["pool", "fc7"] = "pool"  # the paper regresses from pool5


@dataclass
class RCNNConfig:
    """Everything that rebuilds an R-CNN; the defaults are the paper's (VGG-16 variant, table 3)."""

    num_classes: int = 0  # set from the dataset's classes
    backbone: str = "vgg16"
    weights: str | None = "imagenet"  # initial CNN weights: a named source or a path; None: random
    feature_map: str = "conv5"  # the backbone map pooled to pool_size x pool_size ("pool5")
    pool_size: int = 7
    head: Literal["fc", "res5"] = "fc"  # fc: VGG's fc6/fc7 (or two fresh FC layers on ResNet); res5: the C4
    representation_size: int = 1024  # layout of Fast/Faster R-CNN r*_c4 (feature_map c4, pool_size 14)
    freeze_at: int = 0  # backbone stages kept frozen while fine-tuning
    input_size: int = 224  # S: regions are warped to S x S (227 for AlexNet)
    context_padding: int = 16
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    proposals: ProposalConfig = field(default_factory=ProposalConfig)
    fg_iou_thresh: float = 0.5  # fine-tuning: foreground at IoU >= 0.5, everything else background
    ignore_iof_thresh: float = 0.5  # ...but regions this far inside a crowd box are ignored (no SVM negative)
    batch_size: int = 128  # regions per fine-tuning batch, drawn over all images of the batch
    positive_fraction: float = 0.25  # 32 of 128
    svm: SVMConfig = field(default_factory=SVMConfig)
    bbox: BoxRegressionConfig = field(default_factory=BoxRegressionConfig)
    score_thresh: float = 0.05  # on sigmoid(SVM score)
    nms_thresh: float = 0.3  # the paper's per-class NMS threshold
    detections_per_img: int = 100
    region_batch: int = 64  # warped regions per CNN forward at test time (memory)


class RCNN(nn.Module):
    """The R-CNN detector; ``forward(images, targets=None, proposals=None) -> (list[Detections] | None,
    losses)``. Proposals come with the data (``proposals``, or ``targets[i]["proposals"]``, which training
    requires: see detection.proposal_data); without them an eval-mode model asks its ``proposal_source``.

    With targets it returns the fine-tuning loss (``loss_classifier``, K + 1-way softmax on warped regions).
    At test time it scores proposals with the SVMs once they are trained (``svm_trained``), else with the
    fine-tuned softmax (the paper's "fine-tuned, no SVM" row), and moves boxes with the ridge regressors once
    they are fitted (``bbox_trained``).
    """

    def __init__(self, cfg: RCNNConfig, backbone: nn.Module, box_head: nn.Module, feature_dim: int,
                 pool_dim: int, proposal_source: ProposalSource) -> None:
        super().__init__()
        if cfg.num_classes < 1:
            raise ValueError(f"R-CNN needs num_classes >= 1, got {cfg.num_classes}")
        self.cfg = cfg
        self.backbone = backbone
        stride = backbone.feature_info[cfg.feature_map].stride
        self.pooler = RoIPooler("pool", [cfg.feature_map], [stride], output_size=cfg.pool_size)
        self.box_head = box_head
        self.cls_score = nn.Linear(feature_dim, cfg.num_classes + 1)  # fc8, fine-tuning only
        nn.init.normal_(self.cls_score.weight, std=0.01)
        nn.init.zeros_(self.cls_score.bias)
        self.proposal_source = proposal_source
        self.matcher = Matcher(cfg.fg_iou_thresh, cfg.fg_iou_thresh)
        self.sampler = BalancedPositiveNegativeSampler(cfg.batch_size, cfg.positive_fraction)
        self.box_coder = BoxCoder((1.0, 1.0, 1.0, 1.0))  # the paper's unweighted parameterisation
        k = cfg.num_classes
        reg_dim = pool_dim if cfg.bbox.features == "pool" else feature_dim
        self.register_buffer("mean", torch.tensor(cfg.mean).reshape(3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(cfg.std).reshape(3, 1, 1), persistent=False)
        # Learned by the later stages, saved with the weights.
        self.register_buffer("svm_weight", torch.zeros(k, feature_dim))
        self.register_buffer("svm_bias", torch.zeros(k))
        self.register_buffer("svm_scale", torch.ones(()))
        self.register_buffer("svm_trained", torch.zeros((), dtype=torch.bool))
        self.register_buffer("bbox_weight", torch.zeros(k, 4, reg_dim))
        self.register_buffer("bbox_bias", torch.zeros(k, 4))
        self.register_buffer("bbox_scale", torch.ones(()))
        self.register_buffer("bbox_trained", torch.zeros((), dtype=torch.bool))

    # ---- the CNN on warped regions ------------------------------------------------------------------------

    def propose(self, image: Tensor) -> Tensor:
        """[3, H, W] in [0, 1] -> proposals [P, 4] xyxy (selective search runs on the CPU)."""
        return self.proposal_source.propose(image).to(image.device)

    def warp(self, image: Tensor, boxes: Tensor) -> Tensor:
        """[3, H, W] in [0, 1], boxes [R, 4] -> normalised warped regions [R, 3, S, S]."""
        normalised = (image - self.mean) / self.std
        return warp_regions(normalised, boxes, self.cfg.input_size, self.cfg.context_padding)

    def region_features(self, regions: Tensor) -> tuple[Tensor, Tensor]:
        """Warped regions [R, 3, S, S] -> (pool5 [R, C * pool_size^2], fc7 [R, D])."""
        maps = self.backbone(regions)
        side = float(self.cfg.input_size)
        whole = [regions.new_tensor([[0.0, 0.0, side, side]]) for _ in range(len(regions))]
        pooled = self.pooler(maps, whole, [(self.cfg.input_size, self.cfg.input_size)] * len(regions))
        return pooled.flatten(1), self.box_head(pooled)

    def features(self, image: Tensor, boxes: Tensor) -> tuple[Tensor, Tensor]:
        """All regions of one image, ``region_batch`` at a time -> (pool5 [P, C s^2], fc7 [P, D])."""
        pools, fc7s = [], []
        for chunk in boxes.split(self.cfg.region_batch):
            pool, fc7 = self.region_features(self.warp(image, chunk))
            pools.append(pool)
            fc7s.append(fc7)
        if not pools:
            empty = self.region_features(image.new_zeros(1, 3, self.cfg.input_size, self.cfg.input_size))
            return empty[0][:0], empty[1][:0]
        return torch.cat(pools), torch.cat(fc7s)

    # ---- forward ------------------------------------------------------------------------------------------

    def forward(self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None,
                proposals: list[Tensor] | None = None, *, thresholds: Thresholds | None = None
                ) -> tuple[list[Detections] | None, dict[str, Tensor]]:
        """images: N tensors [3, H_i, W_i] in [0, 1]; targets: dicts with boxes [M, 4], labels [M] (and
        optionally crowd_boxes [C, 4], proposals [P, 4]); proposals: [P_i, 4] per image, its pixels;
        thresholds: the post-processing cuts of this call (None: ``self.thresholds``)."""
        if proposals is None and targets and all("proposals" in t for t in targets):
            proposals = [t["proposals"] for t in targets]
        check_inputs(images, targets, proposals)
        if proposals is None and self.training:
            raise ValueError(
                "training an R-CNN needs its proposals with the data: targets[i]['proposals'] (xyxy in the "
                "augmented image's pixels), as detection.proposal_data.ProposalDataset attaches them"
            )
        if proposals is None:
            proposals = [self.propose(image) for image in images]
        proposals = [p.to(image.device, image.dtype) for p, image in zip(proposals, images, strict=True)]
        losses = self.finetune_loss(images, targets, proposals) if targets is not None else {}
        if self.training:
            return None, losses
        return [self.detect(image, p, thresholds) for image, p in zip(images, proposals, strict=True)], losses

    @property
    def thresholds(self) -> Thresholds:
        """The configured post-processing thresholds (what a call without ``thresholds`` uses)."""
        return Thresholds(self.cfg.score_thresh, self.cfg.nms_thresh, self.cfg.detections_per_img)

    def finetune_loss(self, images: list[Tensor], targets: list[dict[str, Tensor]], proposals: list[Tensor]
                      ) -> dict[str, Tensor]:
        """Softmax loss on ``batch_size`` warped regions sampled over all images (25% foreground); background
        regions inside a target's crowd regions are ignored."""
        boxes, matches, labels, owners = [], [], [], []
        with torch.no_grad():
            for i, (image, target) in enumerate(zip(images, targets, strict=True)):
                gt_boxes = target["boxes"].to(image.dtype)
                candidates = torch.cat([proposals[i], gt_boxes])
                matched, match = self.matcher(box_iou(gt_boxes, candidates))
                match = ignore_crowd(match, candidates, target.get("crowd_boxes"), self.cfg.ignore_iof_thresh)
                region_labels = torch.zeros(len(candidates), dtype=torch.int64, device=image.device)
                if len(gt_boxes):
                    fg = match == FOREGROUND
                    region_labels[fg] = target["labels"][matched[fg]]
                boxes.append(candidates)
                matches.append(match)
                labels.append(region_labels)
                owners.append(torch.full((len(candidates),), i, device=image.device))
            all_boxes, all_labels, all_owners = torch.cat(boxes), torch.cat(labels), torch.cat(owners)
            pos, neg = self.sampler(torch.cat(matches))  # over the whole batch, as the paper samples
            picked = torch.cat([pos, neg])
        if picked.numel() == 0:  # no proposal and no object in any image: nothing to learn from
            return {"loss_classifier": self.cls_score.weight.sum() * 0}
        per_image = [picked[all_owners[picked] == i] for i in range(len(images))]
        regions = torch.cat([self.warp(image, all_boxes[sel]) for image, sel in zip(images, per_image,
                                                                                       strict=True)])
        _, fc7 = self.region_features(regions)
        return {"loss_classifier": F.cross_entropy(self.cls_score(fc7), all_labels[torch.cat(per_image)])}

    @torch.no_grad()
    def detect(self, image: Tensor, proposals: Tensor | None = None, thresholds: Thresholds | None = None
               ) -> Detections:
        """One image [3, H, W] in [0, 1] (and its proposals [P, 4], else the source's) -> Detections in its
        pixels."""
        if proposals is None:
            proposals = self.propose(image)
        if len(proposals) == 0:
            return Detections.empty(image.device)
        pool, fc7 = self.features(image, proposals)
        scores = self.class_scores(fc7)
        boxes = self.refine_boxes(pool if self.cfg.bbox.features == "pool" else fc7, proposals)
        size = (int(image.shape[1]), int(image.shape[2]))
        return detections_from_scores(boxes, scores, size, thresholds or self.thresholds)

    def class_scores(self, fc7: Tensor) -> Tensor:
        """fc7 [P, D] -> scores [P, K]: sigmoid of the SVM margins (same ranking), else fine-tuned softmax."""
        if bool(self.svm_trained):
            return torch.sigmoid(fc7 * self.svm_scale @ self.svm_weight.T + self.svm_bias)
        return F.softmax(self.cls_score(fc7), dim=1)[:, 1:]

    def refine_boxes(self, feats: Tensor, proposals: Tensor) -> Tensor:
        """Per-class boxes [P, K, 4]: the proposals moved by each class's ridge regressor (if fitted)."""
        k = self.cfg.num_classes
        if not bool(self.bbox_trained):
            return proposals[:, None, :].expand(-1, k, -1)
        deltas = torch.einsum("pd,kcd->pkc", feats * self.bbox_scale, self.bbox_weight) + self.bbox_bias
        return self.box_coder.decode(deltas.reshape(len(proposals), 4 * k), proposals).reshape(-1, k, 4)


def build_rcnn(cfg: RCNNConfig, *, load_pretrained: bool = True) -> RCNN:
    """An R-CNN for ``cfg``: VGG backbones keep their ImageNet fc6/fc7 as the head (as the paper does);
    ResNets get two fresh FC layers of ``representation_size`` or, with ``head: res5``, their own res5 stage
    (the same network as Fast/Faster R-CNN's C4 models, run per warped region instead of per image)."""
    weights = cfg.weights if load_pretrained else None
    net = build_network(cfg.backbone, weights=weights)
    if cfg.backbone.startswith("vgg"):
        if cfg.head != "fc" or cfg.pool_size != 7:
            raise ValueError(f"{cfg.backbone}: the head is fc6/fc7 on a 7x7 pool5 (head: fc, pool_size: 7)")
        backbone: nn.Module = VGGFeatures(net, [cfg.feature_map])
        head: nn.Module = VGGBoxHead(net.classifier[0], net.classifier[3])
    else:
        backbone = ResNetFeatures(net, [cfg.feature_map])
        channels = backbone.feature_info[cfg.feature_map].channels
        if cfg.head == "res5":
            if cfg.feature_map != "c4":
                raise ValueError(f"head res5 runs on the c4 map, got feature_map {cfg.feature_map!r}")
            head = ResNetC4Head(net.layer4, net.stage_channels[3])
        else:
            head = TwoMLPHead(channels * cfg.pool_size**2, cfg.representation_size)
    backbone.freeze(cfg.freeze_at)
    pool_dim = backbone.feature_info[cfg.feature_map].channels * cfg.pool_size**2
    return RCNN(cfg, backbone, head, head.out_channels, pool_dim, build_proposal_source(cfg.proposals))


# ---- the later training stages: pure functions on feature tensors ------------------------------------------


def feature_scale(features: Tensor, target_norm: float) -> float:
    """The factor that makes the mean L2 norm of ``features`` [N, D] equal ``target_norm`` (R-CNN's code
    uses 20): SVM and ridge penalties then mean the same for any CNN."""
    mean_norm = float(features.norm(dim=1).mean()) if len(features) else 0.0
    return target_norm / mean_norm if mean_norm > 0 else 1.0


@dataclass
class SVMResult:
    """A trained one-vs-rest SVM: score = features @ weight + bias; ``negatives`` = (batch, row) pairs in the
    final hard-negative cache; ``history`` = one entry per retraining (cache size, added, evicted)."""

    weight: Tensor
    bias: float
    negatives: set[tuple[int, int]]
    history: list[dict[str, int]]


def train_svm_hard_negatives(positives: Tensor, negative_batches: Sequence[Tensor], cfg: SVMConfig
                             ) -> SVMResult:
    """Train a linear SVM with hard negative mining (Felzenszwalb et al.'s bootstrapping, as in R-CNN).

    Args:
        positives: [N_pos, D] features of the class's ground-truth boxes (already scaled).
        negative_batches: per image, [N_i, D] features of its negatives (IoU < ``cfg.negative_iou``).

    The SVM starts at zero, so every negative of the first images is hard; whenever ``retrain_every`` new
    hard negatives (score > ``hard_threshold``) have been cached the SVM is retrained (scikit-learn's
    LinearSVC: liblinear, L2-regularised hinge loss) and easy ones (score < ``easy_threshold``) are dropped.
    """
    from sklearn.svm import LinearSVC

    dim = positives.shape[1]
    weight, bias = torch.zeros(dim, dtype=torch.float64), 0.0
    cache: dict[tuple[int, int], Tensor] = {}
    history: list[dict[str, int]] = []
    added_since = 0
    if len(positives) == 0:  # a class never seen in training: never fires
        return SVMResult(weight.float(), -10.0, set(), history)

    def retrain(added: int) -> None:
        nonlocal weight, bias
        if not cache:
            return
        negatives = torch.stack(list(cache.values())).double()
        x = torch.cat([positives.double(), negatives]).numpy()
        y = np.r_[np.ones(len(positives)), -np.ones(len(negatives))]
        svm = LinearSVC(C=cfg.C, class_weight={1: cfg.positive_weight, -1: 1.0}, loss="hinge", dual=True,
                        intercept_scaling=10.0, max_iter=100_000, random_state=0)
        svm.fit(x, y)
        weight, bias = torch.from_numpy(svm.coef_[0].copy()), float(svm.intercept_[0])
        scores = negatives @ weight + bias
        easy = [key for key, s in zip(list(cache), scores.tolist(), strict=True) if s < cfg.easy_threshold]
        for key in easy:
            del cache[key]
        history.append({"cached": len(cache) + len(easy), "added": added, "evicted": len(easy)})

    for _ in range(cfg.epochs):
        for b, negatives in enumerate(negative_batches):
            if len(negatives) == 0:
                continue
            scores = negatives.double() @ weight + bias
            for row in torch.where(scores > cfg.hard_threshold)[0].tolist():
                if (b, row) not in cache:
                    cache[(b, row)] = negatives[row].double()
                    added_since += 1
            if added_since >= cfg.retrain_every:
                retrain(added_since)
                added_since = 0
    if added_since or not history:
        retrain(added_since)
    return SVMResult(weight.float(), bias, set(cache), history)


def fit_box_regressor(features: Tensor, targets: Tensor, alpha: float) -> tuple[Tensor, Tensor]:
    """Ridge regression of box deltas (R-CNN appendix C) with scikit-learn's Ridge.

    features [N, D] (scaled), targets [N, 4] deltas from ``BoxCoder((1, 1, 1, 1)).encode``. Targets are
    standardised before fitting, as the released code does, so one ``alpha`` suits all four coordinates; the
    result maps raw features to raw deltas: ``deltas = features @ weight.T + bias``, weight [4, D], bias [4].
    """
    from sklearn.linear_model import Ridge

    if len(features) == 0:
        return torch.zeros(4, features.shape[1]), torch.zeros(4)
    t = targets.double()
    mean = t.mean(dim=0)
    std = t.std(dim=0, unbiased=False).clamp(min=1e-6)
    ridge = Ridge(alpha=alpha).fit(features.double().numpy(), ((t - mean) / std).numpy())
    weight = torch.from_numpy(ridge.coef_) * std[:, None]
    bias = torch.from_numpy(np.asarray(ridge.intercept_)) * std + mean
    return weight.float(), bias.float()
