"""Two-stage detectors: Faster R-CNN (Ren et al., 2015), Fast R-CNN (Girshick, 2015) and R-CNN (Girshick et
al., 2014) from one set of parts.

    images -> DetectionTransform -> backbone (+ FPN) -> proposal source -> RoI heads -> Detections

The three generations differ in two parts: where proposals come from (a RegionProposalNetwork for Faster
R-CNN; ExternalProposals, i.e. selective search, a file or boxes passed in, for the other two) and where
features are computed (once per image and pooled per region by RoIHeads for Fast/Faster R-CNN; per warped
region by detection.rcnn.RCNNHeads for R-CNN, whose "backbone" passes the pixels through).
``build_detector(DetectorConfig)`` builds any architecture of ``DETECTOR_ARCHS`` by name.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn
from torchvision.ops import remove_small_boxes

from detection.anchors import AnchorGenerator
from detection.boxes import clip_boxes
from detection.fpn import BackboneWithFPN
from detection.generation import GENERATIONS, RCNN, Generation, generation_of
from detection.interfaces import ProposalGenerator, RegionHeads
from detection.proposals import ProposalConfig, build_proposal_source
from detection.rcnn import ImageInput, RCNNConfig, RCNNHeads, RegionCNN, SVMPredictor, WarpedRegions
from detection.roi_heads import (
    BoxPredictor,
    ConvFCHead,
    ResNetC4Head,
    RoIHeads,
    RoIPooler,
    TwoMLPHead,
    VGGBoxHead,
)
from detection.rpn import RegionProposalNetwork, RPNHead
from detection.structures import Detections, Proposals, ProposalStages, Thresholds
from detection.transform import DetectionTransform, ImageBatch, scale_boxes
from vision.backbones import ResNetFeatures, VGGFeatures, build_network
from vision.layers import IMAGENET_MEAN, IMAGENET_STD, convert_frozen_batchnorm
from vision.layers import prepare_for_inference as prepare_for_inference  # where detection users look


class TwoStageDetector(nn.Module):
    """The R-CNN family's shared skeleton (Faster R-CNN, figure 2).

    ``forward(images, targets=None, proposals=None, *, thresholds=None) -> (detections | None, losses)``:
    images: N tensors [3, H_i, W_i] in [0, 1]; targets: dicts with boxes [M, 4] xyxy and labels [M] in
    1..K (losses are computed whenever they are given); proposals: [P_i, 4] boxes per image in input
    pixels for detectors with external proposals (they may also come as ``targets[i]["proposals"]``);
    thresholds: the post-processing cuts of this call (``Thresholds``; None: ``self.thresholds``, the
    configured ones). detections: one Detections per image in its own pixels, unless training.
    ``inspect(image)`` runs the same parts on one image and keeps every intermediate result.

    Parts: ``transform`` (DetectionTransform), ``backbone`` (``forward(x) -> {name: map}`` with
    ``feature_info``), ``proposal_generator`` (a detection.interfaces.ProposalGenerator:
    RegionProposalNetwork or ExternalProposals), ``roi_heads`` (a detection.interfaces.RegionHeads: RoIHeads,
    pooling regions from the backbone's maps, or R-CNN's RCNNHeads, a CNN per warped region), and the
    ``generation`` its arch names (detection.generation: what this detector can do).

    The same forward runs eagerly and traced for export (detection.export): sizes are read from shapes and
    never turned into Python numbers on the test-time path, so a traced graph takes any image size.
    """

    def __init__(
        self,
        *,
        transform: DetectionTransform,
        backbone: nn.Module,
        proposal_generator: ProposalGenerator,
        roi_heads: RegionHeads,
        generation: Generation,
    ) -> None:
        super().__init__()
        self.generation = generation  # what this detector can do (detection.generation), from its arch
        self.transform = transform
        self.backbone = backbone
        self.proposal_generator = proposal_generator
        self.roi_heads = roi_heads

    def forward(
        self,
        images: Sequence[Tensor],
        targets: Sequence[dict[str, Tensor]] | None = None,
        proposals: Sequence[Tensor] | None = None,
        *,
        thresholds: Thresholds | None = None,
    ) -> tuple[list[Detections] | None, dict[str, Tensor]]:
        if self.training and targets is None:
            raise ValueError("a detector in training mode needs targets (call model.eval() to predict)")
        if proposals is None and targets and all("proposals" in t for t in targets):
            proposals = [t["proposals"] for t in targets]
        batch, targets, proposals = self.transform(images, targets, proposals)
        features = self.backbone(batch.tensors)
        proposals, proposal_losses = self.proposal_generator(batch, features, targets, proposals)
        boxes = [p.boxes for p in proposals]
        detections, detector_losses = self.roi_heads(features, boxes, batch.image_sizes, targets, thresholds)
        if detections is not None:
            detections = self.transform.postprocess(detections, batch)
        return detections, {**proposal_losses, **detector_losses}

    @property
    def thresholds(self) -> Thresholds:
        """The configured post-processing thresholds (what a call without ``thresholds`` uses)."""
        return self.roi_heads.thresholds

    @torch.no_grad()
    def inspect(
        self, image: Tensor, proposals: Tensor | None = None, *, thresholds: Thresholds | None = None
    ) -> Inspection:
        """One image [3, H, W] in [0, 1] through the parts ``forward`` runs at test time, keeping what each
        produced (for detection.explain); ``inspection.detections`` equals ``self([image])``'s."""
        if self.training:
            raise ValueError("inspect needs the model in eval mode (call model.eval())")
        thresholds = thresholds or self.thresholds
        batch, _, given = self.transform([image], None, [proposals] if proposals is not None else None)
        features = self.backbone(batch.tensors)
        stages = self.proposal_generator.inspect(batch, features, given)
        boxes, heads = [p.boxes for p in stages.proposals], self.roi_heads
        class_boxes, class_scores = heads.predict(features, boxes, batch.image_sizes)
        detections = heads.postprocess(class_boxes, class_scores, boxes, batch.image_sizes, thresholds)
        (detections,) = self.transform.postprocess(detections, batch)
        return Inspection(batch, stages, class_boxes, class_scores, detections, thresholds)


@dataclass
class Inspection:
    """What ``TwoStageDetector.inspect`` keeps for one image.

    batch: the resized image (sizes for mapping boxes back); stages: the proposal source's results
    (proposals with scores; the RPN's candidates before NMS and raw predictions); class_boxes [P, K, 4] and
    class_scores [P, K]: every proposal's class-specific boxes (resized pixels) and scores before
    post-processing (column k is label k + 1); detections: the final answer in the image's pixels;
    thresholds: the ones the detections were cut with.
    """

    batch: ImageBatch
    stages: ProposalStages
    class_boxes: Tensor
    class_scores: Tensor
    detections: Detections
    thresholds: Thresholds


class ExternalProposals(ProposalGenerator):
    """Proposals from outside the network (Fast R-CNN): the ``proposals`` given to the detector (or carried
    by its targets: in training they must be, attached to each sample before augmentation), or, when none
    are given to a model in eval mode, ``source(image)`` for each input image (e.g. detection.proposals'
    selective search, which takes a [3, H, W] image in [0, 1] and returns [P, 4] boxes in its pixels): the
    path of `visiondet predict` and the demo, whose images are not augmented.

    Boxes are clipped to the image, those under ``min_box_size`` px dropped, and the first
    ``max_proposals`` kept (sources rank them best first).
    """

    def __init__(
        self,
        source: Callable[[Tensor], Tensor] | None = None,
        *,
        max_proposals: int = 2000,
        min_box_size: float = 1e-3,
    ) -> None:
        super().__init__()
        self.source = source
        self.max_proposals = max_proposals
        self.min_box_size = min_box_size

    def forward(
        self,
        batch: ImageBatch,
        features: dict[str, Tensor],
        targets: list[dict[str, Tensor]] | None = None,
        proposals: list[Tensor] | None = None,
    ) -> tuple[list[Proposals], dict[str, Tensor]]:
        if proposals is None:
            if self.training:
                # The images of a training batch are augmented: proposals computed or looked up from their
                # pixels would be recomputed every epoch, or missed (a flipped image is not in the file).
                raise ValueError(
                    "training a detector with external proposals needs them with the data: "
                    "targets[i]['proposals'] (xyxy in the augmented image's pixels), as "
                    "detection.proposal_data.ProposalDataset attaches them before augmentation"
                )
            if self.source is None:
                raise ValueError(
                    "this detector takes external proposals: pass proposals=[Tensor[P, 4], ...] (one per "
                    "image, xyxy in its pixels), put them in targets[i]['proposals'], or configure a source"
                )
            device = batch.tensors.device
            proposals = [
                scale_boxes(self.source(image).to(device=device, dtype=torch.float32), original, size)
                for image, original, size in zip(
                    batch.inputs, batch.original_sizes, batch.image_sizes, strict=True
                )
            ]
        out = []
        for boxes, size in zip(proposals, batch.image_sizes, strict=True):
            boxes = clip_boxes(boxes.to(batch.tensors), size)
            out.append(Proposals(boxes[remove_small_boxes(boxes, self.min_box_size)][: self.max_proposals]))
        return out, {}

    def inspect(
        self, batch: ImageBatch, features: dict[str, Tensor], proposals: list[Tensor] | None = None
    ) -> ProposalStages:
        """The proposals ``forward`` gives at test time (nothing happens before them here)."""
        return ProposalStages(self(batch, features, None, proposals)[0])


# ---------------------------------------------------------------------------------------------- config


@dataclass
class RPNConfig:
    """Region Proposal Network settings; defaults are the FPN paper's / torchvision's (per level pre-NMS)."""

    # per level; None: the architecture's default; "auto": fitted to the training boxes when training starts
    # (detection/anchor_fit.py), and the fitted values are what checkpoints store
    anchor_sizes: list[list[float]] | Literal["auto"] | None = None
    aspect_ratios: list[float] | Literal["auto"] = field(default_factory=lambda: [0.5, 1.0, 2.0])  # h / w
    conv_depth: int | None = None  # 3x3 convs in the head; None: 1 (2 for r50_fpn_v2, as torchvision)
    norm: Literal["gn"] | None = None  # gn: GroupNorm after each of the head's 3x3 convs; None: no norm
    fg_iou_thresh: float = 0.7
    bg_iou_thresh: float = 0.3
    batch_size_per_image: int = 256  # anchors sampled per image for the loss
    positive_fraction: float = 0.5
    pre_nms_top_n_train: int = 2000  # per level
    pre_nms_top_n_test: int = 1000
    post_nms_top_n_train: int = 2000  # per image
    post_nms_top_n_test: int = 1000
    nms_thresh: float = 0.7
    min_box_size: float = 1e-3
    smooth_l1_beta: float = 1.0 / 9  # 0: L1
    ignore_iof_thresh: float = 0.5  # negatives this far inside a crowd box (intersection / own area): ignored


@dataclass
class RoIConfig:
    """Fast R-CNN head settings (the detection half)."""

    pooler: Literal["pool", "align", "multiscale"] | None = (
        None  # RoIPool, RoIAlign, FPN levels; None: arch's
    )
    output_size: int | None = None  # pooled grid; None: 7 (14 for C4, whose res5 halves it)
    sampling_ratio: int = 2  # RoIAlign sample points per bin side (0: adaptive)
    fg_iou_thresh: float = 0.5
    bg_iou_lo: float = 0.0  # background IoU range [lo, hi); Fast R-CNN used [0.1, 0.5)
    bg_iou_hi: float = 0.5
    batch_size_per_image: int = 512  # regions sampled per image
    positive_fraction: float = 0.25
    box_coder_weights: list[float] = field(default_factory=lambda: [10.0, 10.0, 5.0, 5.0])
    smooth_l1_beta: float = 1.0 / 9  # 0: L1
    representation_size: int = 1024  # FPN's two-layer MLP head
    dropout: float = 0.5  # VGG fc6/fc7 head
    # FPN box heads (and R-CNN's ResNet fc head): gn puts GroupNorm after each fc of the MLP head (None: no
    # norm), or in place of the BatchNorms of r50_fpn_v2's conv head (None: BatchNorm)
    norm: Literal["gn"] | None = None
    mlp_dropout: float = 0.0  # the same MLP heads: dropout after fc6 and fc7, in training only (0: none)
    score_thresh: float = 0.05
    nms_thresh: float = 0.5
    detections_per_img: int = 100
    max_proposals: int = 2000  # external proposals kept per image (Fast R-CNN)
    ignore_iof_thresh: float = 0.5  # background regions this far inside a crowd box are ignored


@dataclass
class DetectorConfig:
    """Everything needed to rebuild a detector (stored in its checkpoints).

    arch: one of ``DETECTOR_ARCHS``: ``faster_rcnn_<body>`` (RPN proposals) or ``fast_rcnn_<body>``
    (external proposals) with body r18/r34/r50/r101 + ``_fpn`` or ``_c4``, ``r50_fpn_v2`` or ``vgg16``;
    ``rcnn_<network>`` (external proposals, a CNN per warped region) with network r18/r34/r50/r101 or
    vgg16. A section the architecture does not use (``rpn`` without an RPN, ``rcnn`` outside R-CNN) is an
    error when the model is built.
    """

    arch: str = "faster_rcnn_r50_fpn"
    num_classes: int = 80  # K object classes; label 0 is background
    void_classes: int = 0  # logits that stay in the softmax but are never predicted (torchvision's "N/A")
    backbone_weights: str | None = None  # "imagenet", a .pth/.pt path, or None (random init)
    frozen_bn: bool = True  # backbone batch norms use fixed statistics (pretrained backbones, small batches)
    freeze_at: int = 2  # backbone stages frozen from the input, 0..5 (vision/backbones.py): stem and res2
    min_size: int | list[int] = 800  # short side; a list draws one per training image
    max_size: int = 1333
    size_divisible: int = 32
    mean: list[float] = field(default_factory=lambda: list(IMAGENET_MEAN))
    std: list[float] = field(default_factory=lambda: list(IMAGENET_STD))
    fpn_channels: int = 256
    rpn: RPNConfig | None = None  # faster_rcnn_* only: the RPN (RPNConfig's defaults when not given)
    roi: RoIConfig = field(default_factory=RoIConfig)
    proposals: ProposalConfig | None = None  # fast_rcnn_*, rcnn_*: where proposals come from (none given)
    rcnn: RCNNConfig | None = None  # rcnn_* only: warping, SVMs, box regression (None: the paper's defaults)

    def __post_init__(self) -> None:
        # An arch with an RPN always has its section (the defaults when none is given), so code may set
        # ``cfg.rpn.<field>`` on any Faster R-CNN config; the other archs keep None (an error if set).
        if self.rpn is None and self.arch in DETECTOR_ARCHS and generation_of(self.arch).learned_proposals:
            self.rpn = RPNConfig()


@dataclass(frozen=True)
class _Body:
    network: str
    layout: str  # "fpn", "c4" or "vgg"
    v2: bool = False  # torchvision's fasterrcnn_resnet50_fpn_v2: BN in FPN and head, 2-conv RPN head


_BODIES = {
    **{f"r{d}_fpn": _Body(f"resnet{d}", "fpn") for d in (18, 34, 50, 101)},
    **{f"r{d}_c4": _Body(f"resnet{d}", "c4") for d in (18, 34, 50, 101)},
    "r50_fpn_v2": _Body("resnet50", "fpn", v2=True),
    "vgg16": _Body("vgg16", "vgg"),
}
_RCNN_NETWORKS = {"vgg16": "vgg16", **{f"r{d}": f"resnet{d}" for d in (18, 34, 50, 101)}}
DETECTOR_ARCHS = tuple(f"{g.prefix}_{body}" for g in GENERATIONS
                       for body in (_RCNN_NETWORKS if g.features_per_region else _BODIES))
_RPN_STRIDES = {"fpn": [4, 8, 16, 32, 64], "c4": [16], "vgg": [16]}  # of the maps the RPN reads
_LAYOUT_DEFAULTS = {  # anchor sizes, pooler, pooled size
    "fpn": ([[32], [64], [128], [256], [512]], "multiscale", 7),
    "c4": ([[32, 64, 128, 256, 512]], "align", 14),
    "vgg": ([[128, 256, 512]], "pool", 7),
}


def split_arch(arch: str) -> tuple[Generation, str]:
    """``arch`` -> (its Generation, body); ValueError for an unknown one."""
    if arch not in DETECTOR_ARCHS:
        raise ValueError(f"unknown detector arch {arch!r}; choose one of {', '.join(DETECTOR_ARCHS)}")
    generation = generation_of(arch)
    return generation, arch[len(generation.prefix) + 1:]


def unused_sections(cfg: DetectorConfig) -> list[str]:
    """The sections of ``cfg`` its architecture would ignore: ``rpn`` (set to anything but the defaults)
    without an RPN, ``proposals`` with one, ``rcnn`` outside R-CNN."""
    generation, _ = split_arch(cfg.arch)
    unused = []
    if not generation.learned_proposals and cfg.rpn not in (None, RPNConfig()):
        unused.append("rpn")
    if generation.learned_proposals and cfg.proposals is not None:
        unused.append("proposals")
    if not generation.features_per_region and cfg.rcnn is not None:
        unused.append("rcnn")
    return unused


def check_sections(cfg: DetectorConfig) -> None:
    """ValueError naming the sections ``cfg.arch`` ignores (a typo'd arch or a section inherited from a
    base config would otherwise be dropped without a word)."""
    unused = unused_sections(cfg)
    if unused:
        why = {"rpn": "it has no RPN", "proposals": "its RPN makes the proposals",
               "rcnn": "only rcnn_* archs read it"}
        listed = "; ".join(f"model.{name} ({why[name]})" for name in unused)
        raise ValueError(f"{cfg.arch} ignores {listed}: remove it, or set it to null where a base config "
                         "sets it")


def rpn_levels(cfg: DetectorConfig) -> tuple[list[list[float]], list[int]]:
    """The anchor sizes the RPN of ``cfg`` uses per level (the architecture's default for None or "auto")
    and the stride of each level, without building the model."""
    generation, body = split_arch(cfg.arch)
    if not generation.learned_proposals:
        raise ValueError(f"{cfg.arch} has no RPN")
    layout = _BODIES[body].layout
    rpn = cfg.rpn or RPNConfig()
    sizes = rpn.anchor_sizes if isinstance(rpn.anchor_sizes, list) else _LAYOUT_DEFAULTS[layout][0]
    return [list(s) for s in sizes], list(_RPN_STRIDES[layout])


def build_detector(cfg: DetectorConfig, *, load_pretrained: bool = True) -> TwoStageDetector:
    """The detector ``cfg`` describes. ``load_pretrained=False`` reads no backbone weights (the caller
    loads a checkpoint next)."""
    generation, body_name = split_arch(cfg.arch)
    if cfg.num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {cfg.num_classes}")
    check_sections(cfg)
    if generation.features_per_region:
        return _build_rcnn(cfg, _RCNN_NETWORKS[body_name], load_pretrained)
    body = _BODIES[body_name]
    if body.layout != "fpn" and (cfg.roi.norm is not None or cfg.roi.mlp_dropout):
        raise ValueError(f"roi.norm and roi.mlp_dropout are options of the FPN box heads; {cfg.arch}'s head "
                         "has no place for them (roi.dropout is the VGG head's)")
    rpn = cfg.rpn or RPNConfig()
    if "auto" in (rpn.anchor_sizes, rpn.aspect_ratios):
        raise ValueError("rpn.anchor_sizes / rpn.aspect_ratios 'auto' are fitted to the training data when "
                         "training starts; give numbers to build a model outside training")
    anchor_sizes, pooler_method, pooled = _LAYOUT_DEFAULTS[body.layout]
    anchor_sizes = rpn.anchor_sizes or anchor_sizes
    pooler_method = cfg.roi.pooler or pooler_method
    pooled = cfg.roi.output_size or pooled

    backbone, box_head_factory, roi_features = _build_features(cfg, body, load_pretrained)
    strides = [backbone.feature_info[name].stride for name in roi_features]
    pooler = RoIPooler(
        pooler_method, roi_features, strides, output_size=pooled, sampling_ratio=cfg.roi.sampling_ratio
    )
    box_head = box_head_factory(pooled)
    roi_heads = RoIHeads(
        pooler,
        box_head,
        BoxPredictor(box_head.out_channels, cfg.num_classes, void_classes=cfg.void_classes),
        fg_iou_thresh=cfg.roi.fg_iou_thresh,
        bg_iou_range=(cfg.roi.bg_iou_lo, cfg.roi.bg_iou_hi),
        batch_size_per_image=cfg.roi.batch_size_per_image,
        positive_fraction=cfg.roi.positive_fraction,
        box_coder_weights=cfg.roi.box_coder_weights,
        smooth_l1_beta=cfg.roi.smooth_l1_beta,
        score_thresh=cfg.roi.score_thresh,
        nms_thresh=cfg.roi.nms_thresh,
        detections_per_img=cfg.roi.detections_per_img,
        ignore_iof_thresh=cfg.roi.ignore_iof_thresh,
    )
    if generation.learned_proposals:
        proposal_generator: nn.Module = _build_rpn(cfg, rpn, backbone, anchor_sizes)
    else:
        source = build_proposal_source(cfg.proposals) if cfg.proposals is not None else None
        proposal_generator = ExternalProposals(source, max_proposals=cfg.roi.max_proposals)
    transform = DetectionTransform(cfg.min_size, cfg.max_size, cfg.mean, cfg.std, cfg.size_divisible)
    return TwoStageDetector(
        transform=transform, backbone=backbone, proposal_generator=proposal_generator, roi_heads=roi_heads,
        generation=generation,
    )


def _build_rcnn(cfg: DetectorConfig, network: str, load_pretrained: bool) -> TwoStageDetector:
    """R-CNN: images at their own size, nothing computed over the whole image, selective-search proposals,
    the CNN on each warped region: VGG keeps its ImageNet fc6/fc7 as the head (as the paper does); ResNets
    get two fresh FC layers of ``roi.representation_size`` or, with ``rcnn.head: res5``, their own res5
    stage (the network of Fast/Faster R-CNN's C4 models, run per warped region instead of per image)."""
    r = cfg.rcnn or RCNNConfig()
    net = build_network(network, weights=cfg.backbone_weights if load_pretrained else None,
                        classifier_head=False)
    pool_size = cfg.roi.output_size or 7
    if network.startswith("vgg"):
        feature_map = r.feature_map or "conv5"
        if r.head != "fc" or pool_size != 7:
            raise ValueError(f"{cfg.arch}: the head is fc6/fc7 on a 7x7 pool5 (rcnn.head: fc, "
                             "roi.output_size: 7)")
        trunk: nn.Module = VGGFeatures(net, [feature_map])
        head: nn.Module = _vgg_fc_head(net, cfg)
    else:
        feature_map = r.feature_map or "c4"
        trunk = ResNetFeatures(net, [feature_map])
        if r.head == "res5":
            if feature_map != "c4":
                raise ValueError(f"rcnn.head res5 runs on the c4 map, got rcnn.feature_map {feature_map!r}")
            head = _res5_head(net, cfg)
        else:
            channels = trunk.feature_info[feature_map].channels
            head = _mlp_head(channels * pool_size**2, cfg)
    if not isinstance(head, TwoMLPHead) and (cfg.roi.norm is not None or cfg.roi.mlp_dropout):
        raise ValueError(f"roi.norm and roi.mlp_dropout are options of the fc head; {cfg.arch}'s "
                         f"{type(head).__name__} has no place for them")
    _freeze(trunk, cfg)
    cnn = RegionCNN(trunk, head, feature_map, pool_size, r.input_size)
    predictor = SVMPredictor(head.out_channels, cnn.pool_channels, cfg.num_classes, r.bbox.features)
    roi_heads = RCNNHeads(
        WarpedRegions(r.input_size, r.context_padding), cnn, predictor,
        fg_iou_thresh=cfg.roi.fg_iou_thresh, batch_size=r.batch_size,
        positive_fraction=cfg.roi.positive_fraction, ignore_iof_thresh=cfg.roi.ignore_iof_thresh,
        region_batch=r.region_batch,
        score_thresh=cfg.roi.score_thresh, nms_thresh=cfg.roi.nms_thresh,
        detections_per_img=cfg.roi.detections_per_img,
    )
    source = build_proposal_source(cfg.proposals) if cfg.proposals is not None else None
    proposal_generator = ExternalProposals(source, max_proposals=cfg.roi.max_proposals)
    # no resize (min_size None) and no padding beyond the batch's largest image: the warp reads each image
    # at its own size, without padding
    transform = DetectionTransform(None, cfg.max_size, cfg.mean, cfg.std, size_divisible=1)
    return TwoStageDetector(transform=transform, backbone=ImageInput(), proposal_generator=proposal_generator,
                            roi_heads=roi_heads, generation=RCNN)


def _build_rpn(
    cfg: DetectorConfig, r: RPNConfig, backbone: nn.Module, anchor_sizes: list[list[float]]
) -> RegionProposalNetwork:
    names = list(backbone.feature_info)
    if len(anchor_sizes) != len(names):
        raise ValueError(
            f"rpn.anchor_sizes has {len(anchor_sizes)} levels but {cfg.arch} gives the RPN {len(names)} "
            f"feature maps ({', '.join(names)})"
        )
    anchors = AnchorGenerator(anchor_sizes, [r.aspect_ratios])
    channels = {backbone.feature_info[n].channels for n in names}
    conv_depth = r.conv_depth or (2 if cfg.arch.endswith("_v2") else 1)
    head = RPNHead(channels.pop(), anchors.num_anchors_per_location()[0], conv_depth=conv_depth, norm=r.norm)
    return RegionProposalNetwork(
        anchors,
        head,
        in_features=names,
        fg_iou_thresh=r.fg_iou_thresh,
        bg_iou_thresh=r.bg_iou_thresh,
        batch_size_per_image=r.batch_size_per_image,
        positive_fraction=r.positive_fraction,
        pre_nms_top_n_train=r.pre_nms_top_n_train,
        pre_nms_top_n_test=r.pre_nms_top_n_test,
        post_nms_top_n_train=r.post_nms_top_n_train,
        post_nms_top_n_test=r.post_nms_top_n_test,
        nms_thresh=r.nms_thresh,
        min_box_size=r.min_box_size,
        smooth_l1_beta=r.smooth_l1_beta,
        ignore_iof_thresh=r.ignore_iof_thresh,
    )


def _build_features(
    cfg: DetectorConfig, body: _Body, load_pretrained: bool
) -> tuple[nn.Module, Callable[[int], nn.Module], list[str]]:
    """Backbone (all its maps feed the RPN), a box-head factory taking the pooled size, RoI feature names."""
    weights = cfg.backbone_weights if load_pretrained else None
    if body.layout == "vgg":
        net = build_network(body.network, weights=weights, classifier_head=False)
        trunk = VGGFeatures(net, ["conv5"])
        _freeze(trunk, cfg)
        return trunk, lambda size: _vgg_fc_head(net, cfg), ["conv5"]
    net = build_network(body.network, weights=weights, classifier_head=False)
    if body.layout == "c4":
        trunk = ResNetFeatures(net, ["c4"])
        _freeze(trunk, cfg)
        return trunk, lambda size: _res5_head(net, cfg), ["c4"]
    trunk = ResNetFeatures(net, ["c2", "c3", "c4", "c5"])
    _freeze(trunk, cfg)
    backbone = BackboneWithFPN(trunk, ["c2", "c3", "c4", "c5"], cfg.fpn_channels, norm=body.v2)
    roi_features = [n for n in backbone.feature_info if n != "p6"]
    channels = cfg.fpn_channels
    if body.v2:

        def head(size: int) -> nn.Module:
            return ConvFCHead(channels, size, [256, 256, 256, 256], [cfg.roi.representation_size],
                              norm=cfg.roi.norm or "bn")
    else:

        def head(size: int) -> nn.Module:
            return _mlp_head(channels * size * size, cfg)

    return backbone, head, roi_features


def _mlp_head(in_features: int, cfg: DetectorConfig) -> TwoMLPHead:
    return TwoMLPHead(in_features, cfg.roi.representation_size, norm=cfg.roi.norm,
                      dropout=cfg.roi.mlp_dropout)


def _vgg_fc_head(net: nn.Module, cfg: DetectorConfig) -> nn.Module:
    """VGG-16's own fc6/fc7 (from its classifier, ImageNet-trained when the network is) as the per-region
    head: Fast R-CNN's on RoI-pooled conv5, R-CNN's on each warped region's pool5."""
    return VGGBoxHead(net.classifier[0], net.classifier[3], cfg.roi.dropout)


def _res5_head(net: nn.Module, cfg: DetectorConfig) -> nn.Module:
    """ResNet's res5 stage run per region (He et al., appendix A): the C4 models' head, and R-CNN's with
    ``rcnn.head: res5``."""
    res5 = convert_frozen_batchnorm(net.layer4) if cfg.frozen_bn else net.layer4
    return ResNetC4Head(res5, net.stage_channels[3])


def _freeze(trunk: nn.Module, cfg: DetectorConfig) -> None:
    if not 0 <= cfg.freeze_at <= 5:
        raise ValueError(f"freeze_at must be in 0..5, got {cfg.freeze_at}")
    if cfg.frozen_bn:
        convert_frozen_batchnorm(trunk)
    # a C4 trunk stops at res4 (res5 is the box head), so it has fewer stages to freeze
    trunk.freeze(min(cfg.freeze_at, len(trunk.stages())))

