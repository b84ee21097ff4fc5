"""Feature extraction: a backbone returns named feature maps and declares each map's channels and stride.

Heads (FPN, RPN, RoI heads, segmentation decoders) read ``feature_info`` instead of hard-coding numbers.

Feature maps, for an input [N, 3, H, W]:
- ResNet: ``c2..c5`` = outputs of layer1..layer4, strides 4, 8, 16, 32. With ``output_stride`` 16 or 8
  the last stages dilate instead of striding and ``feature_info`` reports their real stride.
- VGG: ``conv1..conv5`` = last ReLU of each block (strides 1, 2, 4, 8, 16) and ``pool1..pool5`` = each
  block's max pool (strides 2, 4, 8, 16, 32).

Freezing (``freeze_at``, detectron2's convention): the network is a list of stages, [stem, res2, res3,
res4, res5] for ResNet and [block1..block5] for VGG; ``freeze_at=k`` freezes the first k of them
(ResNet: the stem and k-1 residual stages; VGG16 ``freeze_at=2`` freezes conv1_x and conv2_x as in
Faster R-CNN). Frozen parameters stop requiring gradients and frozen stages' batch norms become
``FrozenBatchNorm2d``, so their statistics stop moving too.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from vision import resnet, vgg
from vision.layers import conv_norm, convert_frozen_batchnorm
from vision.weights import load_weights

__all__ = ["BACKBONE_NAMES", "Backbone", "FeatureInfo", "ResNetFeatures", "VGGFeatures", "build_backbone",
           "build_network"]

NETWORK_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "resnet18": resnet.resnet18, "resnet34": resnet.resnet34, "resnet50": resnet.resnet50,
    "resnet101": resnet.resnet101, "resnet152": resnet.resnet152,
    "vgg11": vgg.vgg11, "vgg11_bn": vgg.vgg11_bn, "vgg13": vgg.vgg13, "vgg13_bn": vgg.vgg13_bn,
    "vgg16": vgg.vgg16, "vgg16_bn": vgg.vgg16_bn, "vgg19": vgg.vgg19, "vgg19_bn": vgg.vgg19_bn,
}
BACKBONE_NAMES: tuple[str, ...] = tuple(NETWORK_BUILDERS)
RESNET_DEFAULT_FEATURES = ("c2", "c3", "c4", "c5")
VGG_DEFAULT_FEATURES = ("conv1", "conv2", "conv3", "conv4", "conv5")


@dataclass(frozen=True)
class FeatureInfo:
    """A feature map's channel count and stride (input pixels per feature-map pixel)."""

    channels: int
    stride: int


class Backbone(nn.Module):
    """A network trunk returning named feature maps.

    Attributes:
        feature_info: name -> FeatureInfo for exactly the maps ``forward`` returns, in order.
        arch: the network's name (for named weight sources).
    """

    feature_info: dict[str, FeatureInfo]
    arch: str | None = None
    # a trunk keeps part of a network: load_weights takes just its keys from a whole network's file
    part_of_network: bool = True

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """x: [N, 3, H, W] normalised images -> {name: [N, C_name, ~H/stride, ~W/stride]}."""
        raise NotImplementedError

    def stages(self) -> list[list[tuple[nn.Module, str]]]:
        """The trunk as an ordered list of stages, the unit ``freeze`` counts in; each stage is a list of
        (parent module, child name) so that freezing can replace children in place."""
        raise NotImplementedError

    def freeze(self, freeze_at: int) -> Backbone:
        """Freeze the first ``freeze_at`` stages (0: nothing); returns self."""
        stages = self.stages()
        if not 0 <= freeze_at <= len(stages):
            raise ValueError(f"freeze_at={freeze_at}: this {self.arch or 'backbone'} keeps {len(stages)} "
                             f"stages (for the requested maps), so freeze_at must be in 0..{len(stages)}")
        for stage in stages[:freeze_at]:
            for parent, name in stage:
                child = getattr(parent, name)
                for p in child.parameters():
                    p.requires_grad_(False)
                setattr(parent, name, convert_frozen_batchnorm(child))
        return self


def _check_names(out_features: Sequence[str], available: dict[str, FeatureInfo], arch: str) -> None:
    unknown = [name for name in out_features if name not in available]
    if unknown or not out_features:
        raise ValueError(f"{arch}: unknown feature map(s) {unknown or '(none requested)'}; "
                         f"available: {', '.join(available)}")


class ResNetFeatures(Backbone):
    """ResNet trunk returning any of ``c2..c5``; stages after the last requested map are dropped.

    Wraps ``net`` (its modules are shared, not copied) under torchvision's child names, so the
    network's weights load into it by key.
    """

    conv_bn_pairs = (("conv1", "bn1"),)

    def __init__(self, net: resnet.ResNet, out_features: Sequence[str] = RESNET_DEFAULT_FEATURES) -> None:
        super().__init__()
        self.arch = getattr(net, "arch", None)
        available = {f"c{i + 2}": FeatureInfo(c, s)
                     for i, (c, s) in enumerate(zip(net.stage_channels, net.stage_strides, strict=True))}
        _check_names(out_features, available, self.arch or "ResNet")
        self.out_features = [name for name in available if name in out_features]
        self.feature_info = {name: available[name] for name in self.out_features}
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.num_stages = max(int(name[1]) - 1 for name in self.out_features)
        for i in range(1, self.num_stages + 1):
            setattr(self, f"layer{i}", getattr(net, f"layer{i}"))

    def stages(self) -> list[list[tuple[nn.Module, str]]]:
        stem = [(self, "conv1"), (self, "bn1")]
        return [stem] + [[(self, f"layer{i}")] for i in range(1, self.num_stages + 1)]

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """x: [N, 3, H, W] -> {"c2": [N, C2, H/4, W/4], ..., "c5": [N, C5, H/32, W/32]} (those requested)."""
        if self.training and torch.is_grad_enabled() and x.device.type == "cpu":
            # oneDNN's CPU convolutions (and their backward) run fastest channels-last; the maps keep that
            # layout, same values within float rounding (R50 trunk training step: 0.86x). Inference gets
            # it from prepare_for_inference's channels-last weights.
            x = x.contiguous(memory_format=torch.channels_last)
        x = self.maxpool(self.relu(conv_norm(self.conv1, self.bn1, x)))
        out = {}
        for i in range(1, self.num_stages + 1):
            x = getattr(self, f"layer{i}")(x)
            if f"c{i + 1}" in self.feature_info:
                out[f"c{i + 1}"] = x
        return out


class VGGFeatures(Backbone):
    """VGG trunk returning any of ``conv1..conv5`` and ``pool1..pool5``.

    Keeps ``net.features`` up to the last requested map (indices unchanged, so ``features.N`` keys
    still match torchvision's) and drops the rest, avgpool and the classifier. For Faster R-CNN VGG16,
    take ``conv5`` here and ``net.classifier[:-1]`` as fc6/fc7.
    """

    def __init__(self, net: vgg.VGG, out_features: Sequence[str] = VGG_DEFAULT_FEATURES) -> None:
        super().__init__()
        self.arch = getattr(net, "arch", None)
        index, available = {}, {}
        for i, (channels, relu_i, pool_i) in enumerate(
            zip(net.block_channels, net.block_relu_index, net.block_pool_index, strict=True)
        ):
            available[f"conv{i + 1}"] = FeatureInfo(channels, 2**i)
            available[f"pool{i + 1}"] = FeatureInfo(channels, 2 ** (i + 1))
            index[f"conv{i + 1}"], index[f"pool{i + 1}"] = relu_i, pool_i
        _check_names(out_features, available, self.arch or "VGG")
        self.out_features = sorted((n for n in available if n in out_features), key=index.__getitem__)
        self.feature_info = {name: available[name] for name in self.out_features}
        self._index = {index[name]: name for name in self.out_features}
        last = max(self._index)
        self.features = net.features[: last + 1]
        # Stage k (for freezing) = features up to and including block k's pool.
        self._stage_ends = [p for p in net.block_pool_index if p <= last]
        if not self._stage_ends or self._stage_ends[-1] < last:
            self._stage_ends.append(last)

    def stages(self) -> list[list[tuple[nn.Module, str]]]:
        starts = [0] + [end + 1 for end in self._stage_ends[:-1]]
        return [[(self.features, str(i)) for i in range(a, b + 1)]
                for a, b in zip(starts, self._stage_ends, strict=True)]

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """x: [N, 3, H, W] -> {"conv1": [N, 64, H, W], ..., "pool5": [N, 512, H/32, W/32]} (as requested)."""
        out = {}
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in self._index:
                out[self._index[i]] = x
        return out


def build_network(name: str, num_classes: int = 1000, *, weights: str | os.PathLike | None = None,
                  classifier_head: bool = True, **kwargs) -> nn.Module:
    """The full network ``name`` (one of ``BACKBONE_NAMES``), optionally with weights.

    ``weights``: None (random init), a named source (``"imagenet"``), or a path to a torchvision ``.pth``
    or a visiondet checkpoint. With ``num_classes`` other than the file's, or ``classifier_head=False``
    (the caller uses the network's features only, as detectors do), the classification head (``fc`` /
    fc8 = ``classifier.6``) keeps its fresh init and everything else is loaded: a file without that head,
    such as a visiondet classifier's trunk, then fits. ``kwargs`` go to the builder (ResNet:
    ``replace_stride_with_dilation``, ``norm_layer``; VGG: ``dropout``).
    """
    if name not in NETWORK_BUILDERS:
        raise ValueError(f"unknown network {name!r}; choose from {', '.join(BACKBONE_NAMES)}")
    net = NETWORK_BUILDERS[name](num_classes, **kwargs)
    if weights is not None:
        head = "fc." if isinstance(net, resnet.ResNet) else "classifier.6."
        keep_head = classifier_head and num_classes == 1000
        load_weights(net, weights, arch=name, ignore=() if keep_head else (head,))
    return net


def build_backbone(name: str, *, weights: str | os.PathLike | None = None,
                   out_features: Sequence[str] | None = None, frozen_bn: bool = False, freeze_at: int = 0,
                   output_stride: int = 32) -> Backbone:
    """A ``Backbone`` for network ``name``.

    Args:
        weights: None, a named source (``"imagenet"``) or a path; see ``build_network``.
        out_features: maps to return; default ``c2..c5`` (ResNet) or ``conv1..conv5`` (VGG).
        frozen_bn: replace every BatchNorm2d by FrozenBatchNorm2d (small-batch detection training).
        freeze_at: freeze the first k stages (see the module docstring); 0 freezes nothing.
        output_stride: 32, or 16 / 8 for ResNet (dilated last stages, for segmentation).
    """
    if name.startswith("vgg"):
        if output_stride != 32:
            raise ValueError(f"{name}: output_stride must be 32 (no dilated VGG), got {output_stride}")
        net = build_network(name, weights=weights, classifier_head=False)
        backbone: Backbone = VGGFeatures(net, out_features or VGG_DEFAULT_FEATURES)
    else:
        dilation = {32: (False, False, False), 16: (False, False, True), 8: (False, True, True)}
        if output_stride not in dilation:
            raise ValueError(f"{name}: output_stride must be 32, 16 or 8, got {output_stride}")
        # features only: a file without the ImageNet head (a visiondet classifier's trunk) fits
        net = build_network(name, weights=weights, classifier_head=False,
                            replace_stride_with_dilation=dilation[output_stride])
        backbone = ResNetFeatures(net, out_features or RESNET_DEFAULT_FEATURES)
    if frozen_bn:
        convert_frozen_batchnorm(backbone)
    return backbone.freeze(freeze_at)
