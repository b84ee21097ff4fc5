"""Segmentation heads on ResNet features: the FCN head, DeepLabV3 (ASPP) and PSPNet (pyramid pooling).

Every head reads its input map from the backbone's feature dict by name and returns class scores at that
map's resolution: ``forward(features) -> [N, C, h, w]`` with ``C = K + 1`` outputs (background included);
the model upsamples them to the input size. Channel numbers come from the backbone's ``feature_info``.
Legend: N images, C_in input channels, h, w the input map's size, K foreground classes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class ConvBNReLU(nn.Module):
    """Convolution (no bias, BN follows), batch norm, ReLU; ``padding = dilation`` keeps a 3x3 map's size."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 1, dilation: int = 1):
        super().__init__()
        padding = dilation * (kernel_size // 2)
        self.conv = nn.Conv2d(
            in_channels, out_channels, kernel_size, padding=padding, dilation=dilation, bias=False
        )
        self.bn = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        nn.init.kaiming_normal_(self.conv.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        return self.relu(self.bn(self.conv(x)))


def _init_classifier(conv: nn.Conv2d) -> None:
    # Small scores at the start: the first loss is close to log(K + 1) whatever the features' scale.
    nn.init.normal_(conv.weight, std=0.01)
    nn.init.zeros_(conv.bias)


class FCNHead(nn.Module):
    """The FCN head for dilated ResNets: 3x3 conv to C_in/4 channels, BN, ReLU, dropout, 1x1 class scores.

    ``[N, C_in, h, w] -> [N, C, h, w]``. Also the auxiliary head on ``c4`` (PSPNet's deep supervision).
    """

    def __init__(self, in_feature: str, in_channels: int, num_outputs: int, *, dropout: float = 0.1):
        super().__init__()
        self.in_feature = in_feature
        self.conv = ConvBNReLU(in_channels, in_channels // 4, kernel_size=3)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Conv2d(in_channels // 4, num_outputs, 1)
        _init_classifier(self.classifier)

    def forward(self, features: dict[str, Tensor]) -> Tensor:
        return self.classifier(self.dropout(self.conv(features[self.in_feature])))


class ImagePooling(ConvBNReLU):
    """ASPP's image-level branch: global average pool, 1x1 conv + BN + ReLU, broadcast back to ``h x w``.

    Needs more than one image per batch in training (batch norm over a 1x1 map)."""

    def forward(self, x: Tensor) -> Tensor:
        pooled = super().forward(F.adaptive_avg_pool2d(x, 1))
        return F.interpolate(pooled, size=x.shape[-2:], mode="bilinear", align_corners=False)


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling (Chen et al., DeepLabV3 sec. 3.3).

    Branches: one 1x1 conv, one 3x3 conv per atrous rate, and image pooling; concatenated, then projected
    to ``channels`` by 1x1 conv + BN + ReLU (+ dropout). ``[N, C_in, h, w] -> [N, channels, h, w]``.
    The paper's rates are (6, 12, 18) at output stride 16 and twice that, (12, 24, 36), at output stride 8.
    """

    def __init__(self, in_channels: int, rates: Sequence[int], *, channels: int = 256, dropout: float = 0.5):
        super().__init__()
        self.branches = nn.ModuleList([ConvBNReLU(in_channels, channels, kernel_size=1)])
        for rate in rates:
            self.branches.append(ConvBNReLU(in_channels, channels, kernel_size=3, dilation=rate))
        self.image_pool = ImagePooling(in_channels, channels, kernel_size=1)
        self.project = ConvBNReLU((len(self.branches) + 1) * channels, channels, kernel_size=1)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        outputs = [branch(x) for branch in self.branches] + [self.image_pool(x)]
        return self.dropout(self.project(torch.cat(outputs, dim=1)))


class DeepLabV3Head(nn.Module):
    """DeepLabV3: ASPP, then a 3x3 conv + BN + ReLU and 1x1 class scores. ``[N, C_in, h, w] -> [N, C, h, w]``.

    The 3x3 conv after ASPP is the one torchvision's reference model has; keeping it lets its weights load.
    """

    def __init__(
        self, in_feature: str, in_channels: int, num_outputs: int, *, rates: Sequence[int] = (12, 24, 36),
        channels: int = 256,
    ):
        super().__init__()
        self.in_feature = in_feature
        self.aspp = ASPP(in_channels, rates, channels=channels)
        self.conv = ConvBNReLU(channels, channels, kernel_size=3)
        self.classifier = nn.Conv2d(channels, num_outputs, 1)
        _init_classifier(self.classifier)

    def forward(self, features: dict[str, Tensor]) -> Tensor:
        return self.classifier(self.conv(self.aspp(features[self.in_feature])))


class DeepLabV3PlusHead(nn.Module):
    """DeepLabV3+ (Chen et al., ECCV 2018, sec. 3.1): ASPP on the last map, then a decoder that upsamples
    it to the stride-4 map (``c2``), concatenates that map reduced to 48 channels, refines with two 3x3
    convs and scores. Sharper boundaries than DeepLabV3 at output stride 16 for little extra work.

    ``{c5: [N, C5, h, w], c2: [N, C2, 4h', 4w']} -> [N, C, 4h', 4w']`` (at ``c2``'s resolution).
    """

    def __init__(
        self, in_feature: str, in_channels: int, low_feature: str, low_channels: int, num_outputs: int, *,
        rates: Sequence[int] = (6, 12, 18), channels: int = 256, low_proj: int = 48, dropout: float = 0.1,
    ):
        super().__init__()
        self.in_feature, self.low_feature = in_feature, low_feature
        self.aspp = ASPP(in_channels, rates, channels=channels, dropout=dropout)
        self.low_proj = ConvBNReLU(low_channels, low_proj, kernel_size=1)
        self.fuse = nn.Sequential(
            ConvBNReLU(channels + low_proj, channels, kernel_size=3),
            ConvBNReLU(channels, channels, kernel_size=3),
        )
        self.classifier = nn.Conv2d(channels, num_outputs, 1)
        _init_classifier(self.classifier)

    def forward(self, features: dict[str, Tensor]) -> Tensor:
        low = self.low_proj(features[self.low_feature])
        context = self.aspp(features[self.in_feature])
        context = F.interpolate(context, size=low.shape[-2:], mode="bilinear", align_corners=False)
        return self.classifier(self.fuse(torch.cat([context, low], dim=1)))


class PyramidPooling(nn.Module):
    """PSPNet's pyramid pooling module (Zhao et al., sec. 3.2).

    For each bin size b the map is average-pooled to ``b x b``, reduced by a 1x1 conv to ``C_in / len(bins)``
    channels and upsampled back; the results are concatenated with the input.
    ``[N, C_in, h, w] -> [N, 2 * C_in, h, w]`` (for C_in divisible by the number of bins).
    """

    def __init__(self, in_channels: int, bins: Sequence[int] = (1, 2, 3, 6)):
        super().__init__()
        self.bins = tuple(bins)
        self.stages = nn.ModuleList(ConvBNReLU(in_channels, in_channels // len(self.bins)) for _ in self.bins)
        self.out_channels = in_channels + len(self.bins) * (in_channels // len(self.bins))

    def forward(self, x: Tensor) -> Tensor:
        size = x.shape[-2:]
        pyramid = [x]
        for bin_size, stage in zip(self.bins, self.stages, strict=True):
            pooled = stage(F.adaptive_avg_pool2d(x, bin_size))
            pyramid.append(F.interpolate(pooled, size=size, mode="bilinear", align_corners=False))
        return torch.cat(pyramid, dim=1)


class PSPHead(nn.Module):
    """PSPNet: pyramid pooling, 3x3 conv + BN + ReLU to ``channels``, dropout, 1x1 class scores.

    ``[N, C_in, h, w] -> [N, C, h, w]``; the paper uses bins (1, 2, 3, 6), 512 channels and dropout 0.1.
    """

    def __init__(
        self, in_feature: str, in_channels: int, num_outputs: int, *, bins: Sequence[int] = (1, 2, 3, 6),
        channels: int = 512, dropout: float = 0.1,
    ):
        super().__init__()
        self.in_feature = in_feature
        self.ppm = PyramidPooling(in_channels, bins)
        self.conv = ConvBNReLU(self.ppm.out_channels, channels, kernel_size=3)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Conv2d(channels, num_outputs, 1)
        _init_classifier(self.classifier)

    def forward(self, features: dict[str, Tensor]) -> Tensor:
        return self.classifier(self.dropout(self.conv(self.ppm(features[self.in_feature]))))
