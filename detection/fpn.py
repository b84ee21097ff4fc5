"""Feature Pyramid Network (Lin et al., 2017) on top of a backbone's c2..c5 maps.

Legend: N images, C channels, H_l x W_l the size of level l.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from vision.backbones import FeatureInfo


class FPN(nn.Module):
    """Lateral 1x1 convs, a top-down pathway with nearest-neighbour 2x upsampling, 3x3 output convs, and a
    stride-2 max-pool of the coarsest output as one extra level (P6, used by the RPN only).

    ``norm=True`` puts BatchNorm after every conv (torchvision's v2 model); otherwise convs have biases.
    Inputs ``in_channels`` are listed fine to coarse; outputs are named ``p{level}`` from ``first_level``.
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        out_channels: int = 256,
        *,
        first_level: int = 2,
        extra_max_pool: bool = True,
        norm: bool = False,
    ) -> None:
        super().__init__()
        self.lateral = nn.ModuleList(_conv(c, out_channels, 1, norm) for c in in_channels)
        self.output = nn.ModuleList(_conv(out_channels, out_channels, 3, norm) for _ in in_channels)
        self.extra_max_pool = extra_max_pool
        num_out = len(in_channels) + int(extra_max_pool)
        self.names = [f"p{first_level + i}" for i in range(num_out)]
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_uniform_(m.weight, a=1)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, features: Sequence[Tensor]) -> dict[str, Tensor]:
        """features: [N, C_l, H_l, W_l] fine to coarse -> {p_l: [N, out_channels, H_l, W_l]} (+ pooled)."""
        inner = self.lateral[-1](features[-1])
        outputs = [self.output[-1](inner)]
        for level in range(len(features) - 2, -1, -1):
            lateral = self.lateral[level](features[level])
            inner = lateral + F.interpolate(inner, size=lateral.shape[-2:], mode="nearest")
            outputs.insert(0, self.output[level](inner))
        if self.extra_max_pool:
            # kernel 1, stride 2: subsampling, as in the FPN paper's P6 for the RPN
            outputs.append(F.max_pool2d(outputs[-1], kernel_size=1, stride=2))
        return dict(zip(self.names, outputs, strict=True))


def _conv(in_channels: int, out_channels: int, kernel_size: int, norm: bool) -> nn.Sequential:
    conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=not norm)
    return nn.Sequential(conv, nn.BatchNorm2d(out_channels)) if norm else nn.Sequential(conv)


class BackboneWithFPN(nn.Module):
    """A backbone (``forward(x) -> dict``, ``feature_info``) followed by an FPN over ``in_features``.

    feature_info: {"p2": FeatureInfo(out_channels, 4), ..., "p6": FeatureInfo(out_channels, 64)} for c2..c5.
    """

    def __init__(
        self,
        body: nn.Module,
        in_features: Sequence[str] = ("c2", "c3", "c4", "c5"),
        out_channels: int = 256,
        *,
        extra_max_pool: bool = True,
        norm: bool = False,
    ) -> None:
        super().__init__()
        missing = [name for name in in_features if name not in body.feature_info]
        if missing:
            raise ValueError(f"backbone has no feature maps {missing}; it has {list(body.feature_info)}")
        self.body = body
        self.in_features = list(in_features)
        infos = [body.feature_info[name] for name in in_features]
        first_level = infos[0].stride.bit_length() - 1  # stride 4 -> P2
        self.fpn = FPN(
            [i.channels for i in infos],
            out_channels,
            first_level=first_level,
            extra_max_pool=extra_max_pool,
            norm=norm,
        )
        strides = [i.stride for i in infos] + ([infos[-1].stride * 2] if extra_max_pool else [])
        self.feature_info = {
            name: FeatureInfo(out_channels, stride)
            for name, stride in zip(self.fpn.names, strides, strict=True)
        }

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        features = self.body(x)
        return self.fpn([features[name] for name in self.in_features])
