"""Semantic segmentation models: config, the model that joins backbone and heads, the builder, prediction.

Every model follows the segmentation contract of docs/ARCHITECTURE.md::

    forward(images [N, 3, H, W] float in [0, 1], targets [N, H, W] int64 (255 = ignore) | None)
        -> (logits [N, K + 1, H, W] at input size, or None while training;
            {"loss_seg", "loss_aux" (with an auxiliary head)} when targets are given, else {})

Legend: N images, H x W input size, K foreground classes (label 0 is background, so K + 1 outputs).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vision.backbones import VGGFeatures, build_backbone, build_network
from vision.layers import IMAGENET_MEAN, IMAGENET_STD, Normalize
from vision.segmentation.fcn_vgg import FCNVGGHead
from vision.segmentation.heads import DeepLabV3Head, DeepLabV3PlusHead, FCNHead, PSPHead
from vision.segmentation.metrics import IGNORE_INDEX

Arch = Literal[
    "fcn32s_vgg16", "fcn16s_vgg16", "fcn8s_vgg16",
    "fcn_resnet18", "fcn_resnet34", "fcn_resnet50", "fcn_resnet101",
    "deeplabv3_resnet18", "deeplabv3_resnet34", "deeplabv3_resnet50", "deeplabv3_resnet101",
    "deeplabv3plus_resnet18", "deeplabv3plus_resnet34", "deeplabv3plus_resnet50", "deeplabv3plus_resnet101",
    "pspnet_resnet18", "pspnet_resnet34", "pspnet_resnet50", "pspnet_resnet101",
]
ARCHS: tuple[str, ...] = get_args(Arch)

# DeepLabV3 sec. 3.3: rates (6, 12, 18) at output stride 16, doubled when the stride halves.
ASPP_RATES = {16: (6, 12, 18), 8: (12, 24, 36)}


@dataclass
class SegmentationConfig:
    """Everything needed to rebuild a segmentation model (saved in checkpoints as ``model``).

    ``arch`` is ``<head>_<backbone>``: FCN-32s/16s/8s on VGG-16 (Long et al.), or an FCN head, DeepLabV3,
    DeepLabV3+ or PSPNet on a dilated ResNet.
    """

    arch: Arch = "deeplabv3_resnet50"
    num_classes: int | None = None  # K foreground classes (the model adds background); None: from the dataset
    backbone_weights: str | None = None  # None (random init), "imagenet", or a .pth / checkpoint path
    output_stride: Literal[8, 16] = 8  # ResNet archs: dilation replaces the last strides; FCN-VGG ignores it
    aux_loss: bool = False  # auxiliary FCN head on c4 (ResNet archs), as in PSPNet
    aux_weight: float = 0.4  # weight of loss_aux (PSPNet: 0.4)
    frozen_bn: bool = False  # backbone batch norm with fixed statistics (for very small per-device batches)
    head_channels: int | None = None  # ASPP / PSP width; None: the papers' 256 (DeepLabV3/V3+), 512 (PSPNet)
    aspp_rates: tuple[int, ...] | None = None  # None: (6, 12, 18) at output stride 16, (12, 24, 36) at 8
    psp_bins: tuple[int, ...] = (1, 2, 3, 6)
    learnable_upsampling: bool = True  # FCN-VGG: learn the 2x upsamplings (the final one stays bilinear)
    # loss weight per label (background first, K + 1 values); "auto": ENet's weights, fitted to the training
    # masks when training starts (vision/segmentation/class_weights.py); None: every pixel counts alike
    class_weights: tuple[float, ...] | Literal["auto"] | None = None
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD


def segmentation_loss(logits: Tensor, targets: Tensor, ignore_index: int = IGNORE_INDEX,
                      weight: Tensor | None = None) -> Tensor:
    """Cross-entropy averaged over the pixels that are not ``ignore_index``, each counted with its class's
    ``weight`` when given (the weighted mean); 0 (not NaN) when no pixel is labelled.

    logits: [N, C, H, W]; targets: [N, H, W] int64 in 0..C-1 or ``ignore_index``; weight: [C].
    """
    total = F.cross_entropy(logits, targets, weight=weight, ignore_index=ignore_index, reduction="sum")
    labelled = targets != ignore_index
    # Dividing by a clamped count keeps an all-ignore batch finite without a host sync.
    if weight is None:
        return total / labelled.sum().clamp(min=1)
    count = (weight[targets.masked_fill(~labelled, 0)] * labelled).sum()
    return total / count.clamp(min=torch.finfo(count.dtype).tiny)


def _resize_to(x: Tensor, size: tuple[int, int]) -> Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class SegmentationModel(nn.Module):
    """Normalise, (pad), backbone features, head scores upsampled to the input size, losses.

    Args:
        backbone: returns a dict of named feature maps (vision.backbones.Backbone).
        head: reads the feature dict, returns class scores ``[N, K + 1, h, w]``.
        aux_head: optional second head (on an earlier stage) trained with ``aux_weight``.
        class_weights: the loss weight of each of the K + 1 labels (None: every pixel alike).
        size_divisor: the input is zero-padded (after normalisation, so with the mean colour) at the
            bottom and right to a multiple of this; the scores are cropped back. FCN-VGG needs 32.
    """

    def __init__(
        self, backbone: nn.Module, head: nn.Module, *, aux_head: nn.Module | None = None,
        aux_weight: float = 0.4, mean: tuple[float, ...] = IMAGENET_MEAN,
        std: tuple[float, ...] = IMAGENET_STD, size_divisor: int = 1,
        class_weights: tuple[float, ...] | None = None,
    ):
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.backbone = backbone
        self.head = head
        self.aux_head = aux_head
        self.aux_weight = aux_weight
        self.size_divisor = size_divisor
        # not persistent: the config rebuilds it, and state dicts stay those of the unweighted model
        weights = None if class_weights is None else torch.tensor(class_weights, dtype=torch.float32)
        self.register_buffer("class_weights", weights, persistent=False)

    def forward(
        self, images: Tensor, targets: Tensor | None = None
    ) -> tuple[Tensor | None, dict[str, Tensor]]:
        """images: [N, 3, H, W] in [0, 1]; targets: [N, H, W] int64 (255 ignore) or None."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be [N, 3, H, W], got {tuple(images.shape)}")
        num, _, height, width = images.shape
        if targets is not None and tuple(targets.shape) != (num, height, width):
            raise ValueError(
                f"targets must be [N, H, W] = {(num, height, width)}, got {tuple(targets.shape)}"
            )
        x = self.normalize(images)
        pad_h, pad_w = (-height) % self.size_divisor, (-width) % self.size_divisor
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h))
        features = self.backbone(x)
        logits = _resize_to(self.head(features), x.shape[-2:])[..., :height, :width]

        losses: dict[str, Tensor] = {}
        if targets is not None:
            weight = self.class_weights
            losses["loss_seg"] = segmentation_loss(logits, targets, weight=weight)
            if self.aux_head is not None:
                aux = _resize_to(self.aux_head(features), x.shape[-2:])[..., :height, :width]
                losses["loss_aux"] = self.aux_weight * segmentation_loss(aux, targets, weight=weight)
        return (None if self.training else logits), losses


def _check_config(cfg: SegmentationConfig) -> None:
    if cfg.arch not in ARCHS:
        raise ValueError(f"unknown segmentation arch {cfg.arch!r}; expected one of {', '.join(ARCHS)}")
    if cfg.num_classes is None or cfg.num_classes < 1:
        raise ValueError(f"num_classes must be the number of foreground classes (>= 1): {cfg.num_classes}")
    if cfg.output_stride not in ASPP_RATES:
        raise ValueError(f"output_stride must be 8 or 16, got {cfg.output_stride}")
    if cfg.arch.endswith("_vgg16") and cfg.aux_loss:
        raise ValueError(f"{cfg.arch}: the auxiliary head is for the ResNet archs (it reads c4)")
    if cfg.class_weights == "auto":
        raise ValueError("class_weights 'auto' are fitted to the training masks when training starts; give "
                         "numbers to build a model outside training")
    if cfg.class_weights is not None:
        weights = cfg.class_weights
        if len(weights) != cfg.num_classes + 1 or min(weights) <= 0:
            raise ValueError(f"class_weights: expected {cfg.num_classes + 1} positive numbers (background "
                             f"and {cfg.num_classes} classes), got {list(weights)}")


def build_segmentation_model(cfg: SegmentationConfig, *, load_pretrained: bool = True) -> SegmentationModel:
    """The model ``cfg`` describes, with ``cfg.num_classes + 1`` outputs.

    ``load_pretrained=False`` ignores ``cfg.backbone_weights`` (rebuilding a model whose weights come from
    a checkpoint must not read or download anything).
    """
    _check_config(cfg)
    head_name, network = cfg.arch.split("_", 1)
    num_outputs = cfg.num_classes + 1
    weights = cfg.backbone_weights if load_pretrained else None

    if network == "vgg16":
        net = build_network("vgg16", weights=weights)
        backbone = VGGFeatures(net, ["pool3", "pool4", "pool5"])
        head = FCNVGGHead(backbone.feature_info, num_outputs, variant=head_name,
                          learnable_upsampling=cfg.learnable_upsampling)
        if weights is not None:
            # Long et al. start fc6/fc7 from the ImageNet classifier, reshaped into convolutions.
            head.load_fc_from_classifier(*_vgg_fc(net))
        return SegmentationModel(backbone, head, mean=cfg.mean, std=cfg.std,
                                 size_divisor=FCNVGGHead.size_divisor, class_weights=cfg.class_weights)

    out_features = ["c4", "c5"] if cfg.aux_loss else ["c5"]
    if head_name == "deeplabv3plus":
        out_features.insert(0, "c2")
    backbone = build_backbone(network, weights=weights, out_features=out_features, frozen_bn=cfg.frozen_bn,
                              output_stride=cfg.output_stride)
    c5 = backbone.feature_info["c5"]
    rates = cfg.aspp_rates or ASPP_RATES[cfg.output_stride]
    if head_name == "fcn":
        head = FCNHead("c5", c5.channels, num_outputs)
    elif head_name == "deeplabv3":
        head = DeepLabV3Head("c5", c5.channels, num_outputs, rates=rates, channels=cfg.head_channels or 256)
    elif head_name == "deeplabv3plus":
        head = DeepLabV3PlusHead("c5", c5.channels, "c2", backbone.feature_info["c2"].channels, num_outputs,
                                 rates=rates, channels=cfg.head_channels or 256)
    else:
        head = PSPHead("c5", c5.channels, num_outputs, bins=cfg.psp_bins, channels=cfg.head_channels or 512)
    aux_head = None
    if cfg.aux_loss:
        aux_head = FCNHead("c4", backbone.feature_info["c4"].channels, num_outputs)
    return SegmentationModel(backbone, head, aux_head=aux_head, aux_weight=cfg.aux_weight, mean=cfg.mean,
                             std=cfg.std, class_weights=cfg.class_weights)


def _vgg_fc(net: nn.Module) -> tuple[nn.Linear, nn.Linear]:
    """fc6 and fc7 of a VGG classifier (its first two Linear layers)."""
    linears = [m for m in net.classifier if isinstance(m, nn.Linear)]
    return linears[0], linears[1]


@torch.no_grad()
def predict_mask(model: nn.Module, images: Tensor) -> tuple[Tensor, Tensor]:
    """Index map and class probabilities of one image ``[3, H, W]`` or a batch ``[N, 3, H, W]`` in [0, 1].

    Returns ``(labels [H, W] int64, probabilities [K + 1, H, W] float)`` for one image, with a leading N for
    a batch. The model is put in eval mode (and left there).
    """
    single = images.dim() == 3
    batch = images[None] if single else images
    model.eval()
    logits, _ = model(batch)
    probabilities = logits.float().softmax(dim=1)
    labels = probabilities.argmax(dim=1)
    return (labels[0], probabilities[0]) if single else (labels, probabilities)
