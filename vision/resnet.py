"""ResNet (He et al., "Deep Residual Learning for Image Recognition", 2015), torchvision layout.

Module names match torchvision's, so its state dicts load unchanged. Bottleneck blocks put the
stride on the 3x3 conv ("ResNet v1.5"), as torchvision and most modern weights do.

Shapes: N images; an input [N, 3, H, W] gives stage outputs at strides 4, 8, 16, 32
(c2..c5, with channels 64/128/256/512 times the block expansion), unless dilation replaces
the stride of the last stages.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from vision.layers import conv_norm

__all__ = ["BasicBlock", "Bottleneck", "ResNet", "resnet18", "resnet34", "resnet50", "resnet101", "resnet152"]

NormLayer = Callable[[int], nn.Module]


def _conv3x3(in_ch: int, out_ch: int, stride: int = 1, dilation: int = 1) -> nn.Conv2d:
    # padding = dilation keeps the spatial size for stride 1 at any dilation.
    return nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=dilation, dilation=dilation, bias=False)


def _conv1x1(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convs and an identity (or projection) shortcut; ResNet-18/34."""

    expansion = 1
    conv_bn_pairs = (("conv1", "bn1"), ("conv2", "bn2"))

    def __init__(self, in_ch: int, width: int, stride: int = 1, downsample: nn.Module | None = None,
                 dilation: int = 1, norm_layer: NormLayer = nn.BatchNorm2d) -> None:
        super().__init__()
        self.conv1 = _conv3x3(in_ch, width, stride, dilation)
        self.bn1 = norm_layer(width)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(width, width, 1, dilation)
        self.bn2 = norm_layer(width)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(conv_norm(self.conv1, self.bn1, x))
        out = conv_norm(self.conv2, self.bn2, out)
        return self.relu(out + shortcut)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (strided, possibly dilated), 1x1 expand by 4; ResNet-50/101/152."""

    expansion = 4
    conv_bn_pairs = (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3"))

    def __init__(self, in_ch: int, width: int, stride: int = 1, downsample: nn.Module | None = None,
                 dilation: int = 1, norm_layer: NormLayer = nn.BatchNorm2d) -> None:
        super().__init__()
        self.conv1 = _conv1x1(in_ch, width)
        self.bn1 = norm_layer(width)
        self.conv2 = _conv3x3(width, width, stride, dilation)
        self.bn2 = norm_layer(width)
        self.conv3 = _conv1x1(width, width * self.expansion)
        self.bn3 = norm_layer(width * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(conv_norm(self.conv1, self.bn1, x))
        out = self.relu(conv_norm(self.conv2, self.bn2, out))
        out = conv_norm(self.conv3, self.bn3, out)
        return self.relu(out + shortcut)


Block = type[BasicBlock] | type[Bottleneck]


class ResNet(nn.Module):
    """Stem (7x7/2 conv, BN, ReLU, 3x3/2 max pool), four residual stages, global pooling, linear head.

    Args:
        block: BasicBlock or Bottleneck.
        layers: number of blocks in each of the four stages, e.g. (3, 4, 6, 3) for ResNet-50.
        num_classes: size of the linear head.
        replace_stride_with_dilation: for layer2..layer4, keep the resolution and dilate instead of
            striding (DeepLab's output stride 16 = (False, False, True), 8 = (False, True, True)).
        norm_layer: called with a channel count; default ``nn.BatchNorm2d``.
        zero_init_residual: start each residual branch at zero (last BN weight 0), from Goyal et al.

    Attributes:
        stage_channels: output channels of layer1..layer4.
        stage_strides: real output stride of layer1..layer4 (dilation taken into account).
    """

    conv_bn_pairs = (("conv1", "bn1"),)

    def __init__(self, block: Block, layers: Sequence[int], num_classes: int = 1000, *,
                 replace_stride_with_dilation: Sequence[bool] = (False, False, False),
                 norm_layer: NormLayer | None = None, zero_init_residual: bool = False) -> None:
        super().__init__()
        if len(layers) != 4:
            raise ValueError(f"ResNet: layers needs 4 stage depths, got {tuple(layers)}")
        if len(replace_stride_with_dilation) != 3:
            raise ValueError("ResNet: replace_stride_with_dilation needs 3 flags (for layer2..layer4), "
                             f"got {tuple(replace_stride_with_dilation)}")
        norm = norm_layer or nn.BatchNorm2d
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = norm(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)

        in_ch, out_stride, dilation = 64, 4, 1
        stage_strides = []
        widths, strides, dilate = (64, 128, 256, 512), (1, 2, 2, 2), (False, *replace_stride_with_dilation)
        for i, (width, depth, stride, dil) in enumerate(zip(widths, layers, strides, dilate, strict=True)):
            # The first block of a dilated stage keeps the previous dilation and the rest use the new
            # one, so the receptive field grows as it would have with the stride.
            first_dilation = dilation
            if dil:
                dilation, stride = dilation * stride, 1
            out_stride *= stride
            out_ch = width * block.expansion
            downsample = None
            if stride != 1 or in_ch != out_ch:
                downsample = nn.Sequential(_conv1x1(in_ch, out_ch, stride), norm(out_ch))
            blocks = [block(in_ch, width, stride, downsample, first_dilation, norm)]
            blocks += [block(out_ch, width, 1, None, dilation, norm) for _ in range(depth - 1)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
            in_ch = out_ch
            stage_strides.append(out_stride)
        self.stage_channels: tuple[int, ...] = tuple(w * block.expansion for w in widths)
        self.stage_strides: tuple[int, ...] = tuple(stage_strides)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * block.expansion, num_classes)
        self._init_weights(zero_init_residual)

    def _init_weights(self, zero_init_residual: bool) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d | nn.GroupNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            if zero_init_residual and isinstance(m, BasicBlock | Bottleneck):
                last_norm = m.bn3 if isinstance(m, Bottleneck) else m.bn2
                if getattr(last_norm, "weight", None) is not None:
                    nn.init.zeros_(last_norm.weight)

    def forward_stem(self, x: Tensor) -> Tensor:
        """[N, 3, H, W] -> [N, 64, H/4, W/4]."""
        return self.maxpool(self.relu(conv_norm(self.conv1, self.bn1, x)))

    def forward(self, x: Tensor) -> Tensor:
        """[N, 3, H, W] normalised images -> [N, num_classes] logits."""
        x = self.forward_stem(x)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


# Architecture table: name -> (block, blocks per stage). Parameter counts with a 1000-class head:
# 18: 11,689,512; 34: 21,797,672; 50: 25,557,032; 101: 44,549,160; 152: 60,192,808.
RESNET_ARCHS: dict[str, tuple[Block, tuple[int, int, int, int]]] = {
    "resnet18": (BasicBlock, (2, 2, 2, 2)),
    "resnet34": (BasicBlock, (3, 4, 6, 3)),
    "resnet50": (Bottleneck, (3, 4, 6, 3)),
    "resnet101": (Bottleneck, (3, 4, 23, 3)),
    "resnet152": (Bottleneck, (3, 8, 36, 3)),
}
NO_DILATION = (False, False, False)


def _resnet(arch: str, num_classes: int, replace_stride_with_dilation: Sequence[bool],
            norm_layer: NormLayer | None) -> ResNet:
    block, layers = RESNET_ARCHS[arch]
    net = ResNet(block, layers, num_classes, replace_stride_with_dilation=replace_stride_with_dilation,
                 norm_layer=norm_layer)
    net.arch = arch  # lets weight loading find the named sources for this architecture
    return net


def resnet18(num_classes: int = 1000, *, replace_stride_with_dilation: Sequence[bool] = NO_DILATION,
             norm_layer: NormLayer | None = None) -> ResNet:
    """ResNet-18: basic blocks (2, 2, 2, 2)."""
    return _resnet("resnet18", num_classes, replace_stride_with_dilation, norm_layer)


def resnet34(num_classes: int = 1000, *, replace_stride_with_dilation: Sequence[bool] = NO_DILATION,
             norm_layer: NormLayer | None = None) -> ResNet:
    """ResNet-34: basic blocks (3, 4, 6, 3)."""
    return _resnet("resnet34", num_classes, replace_stride_with_dilation, norm_layer)


def resnet50(num_classes: int = 1000, *, replace_stride_with_dilation: Sequence[bool] = NO_DILATION,
             norm_layer: NormLayer | None = None) -> ResNet:
    """ResNet-50: bottleneck blocks (3, 4, 6, 3)."""
    return _resnet("resnet50", num_classes, replace_stride_with_dilation, norm_layer)


def resnet101(num_classes: int = 1000, *, replace_stride_with_dilation: Sequence[bool] = NO_DILATION,
              norm_layer: NormLayer | None = None) -> ResNet:
    """ResNet-101: bottleneck blocks (3, 4, 23, 3)."""
    return _resnet("resnet101", num_classes, replace_stride_with_dilation, norm_layer)


def resnet152(num_classes: int = 1000, *, replace_stride_with_dilation: Sequence[bool] = NO_DILATION,
              norm_layer: NormLayer | None = None) -> ResNet:
    """ResNet-152: bottleneck blocks (3, 8, 36, 3)."""
    return _resnet("resnet152", num_classes, replace_stride_with_dilation, norm_layer)
