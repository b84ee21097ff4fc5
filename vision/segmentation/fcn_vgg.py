"""FCN-32s, FCN-16s and FCN-8s on VGG-16 (Long, Shelhamer and Darrell, "Fully Convolutional Networks for
Semantic Segmentation", CVPR 2015).

VGG's fc6/fc7 become convolutions (7x7 and 1x1, 4096 channels), a 1x1 ``score_fr`` gives class scores at
stride 32, and skips from ``pool4`` (stride 16) and ``pool3`` (stride 8) refine them: 2x upsample, add the
skip's own 1x1 scores, repeat; a last upsampling returns to stride 1. Upsampling is a transposed convolution
initialised to bilinear interpolation; the intermediate 2x layers are learned and the final one stays fixed,
as in the paper (sec. 4.2-4.3). Score layers start at zero, as in the paper.

Crop and pad: the Caffe original pads conv1_1 by 100 pixels, runs fc6 without padding and crops every
upsampled map by hand-derived offsets. Here the model pads the input to a multiple of 32 (``size_divisor``),
fc6 pads by 3, so each map is exactly the input size over its stride, every upsampled map lines up with the
skip it is added to, and the final scores are cropped back to the input size at the top-left corner.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

VARIANTS = {"fcn32s": (), "fcn16s": ("pool4",), "fcn8s": ("pool4", "pool3")}


def bilinear_kernel(factor: int) -> Tensor:
    """``[2f, 2f]`` bilinear interpolation kernel for upsampling by ``factor`` f with stride f, padding f/2.

    Its centre sits at ``f - 0.5``, so output pixel centres fall where ``F.interpolate(..., "bilinear",
    align_corners=False)`` puts them: away from the border both give the same values.
    """
    size = 2 * factor
    centre = factor - 0.5
    taps = 1 - (torch.arange(size, dtype=torch.float32) - centre).abs() / factor
    return taps[:, None] * taps[None, :]


class BilinearUpsample(nn.Module):
    """Upsampling by an even integer factor as a transposed convolution initialised to bilinear interpolation.

    ``[N, C, h, w] -> [N, C, factor * h, factor * w]``. Learnable: a full ``C x C`` kernel starting as
    per-channel bilinear interpolation (the paper's in-network upsampling). Fixed: a per-channel buffer.
    """

    def __init__(self, channels: int, factor: int, *, learnable: bool):
        super().__init__()
        if factor < 2 or factor % 2:
            raise ValueError(f"upsampling factor must be an even integer >= 2, got {factor}")
        self.factor = factor
        self.learnable = learnable
        kernel = bilinear_kernel(factor)
        if learnable:
            weight = torch.zeros(channels, channels, *kernel.shape)
            weight[range(channels), range(channels)] = kernel
            self.weight = nn.Parameter(weight)
        else:
            self.register_buffer("weight", kernel.expand(channels, 1, *kernel.shape).clone())

    def forward(self, x: Tensor) -> Tensor:
        groups = 1 if self.learnable else x.shape[1]
        return F.conv_transpose2d(x, self.weight, stride=self.factor, padding=self.factor // 2, groups=groups)


class FCNVGGHead(nn.Module):
    """fc6/fc7 as convolutions, class scoring, skip fusion and upsampling of FCN-32s/16s/8s.

    Reads ``pool5`` (and ``pool4``, ``pool3`` for the skip variants) from the VGG feature dict; returns class
    scores ``[N, C, H, W]`` at the (padded) input size ``H = 32 * h5``, ``C = K + 1``.
    """

    size_divisor = 32

    def __init__(
        self, feature_info: dict, num_outputs: int, *, variant: str = "fcn8s", fc_channels: int = 4096,
        dropout: float = 0.5, learnable_upsampling: bool = True,
    ):
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"unknown FCN variant {variant!r}; expected one of {sorted(VARIANTS)}")
        self.variant = variant
        top = feature_info["pool5"]
        self.fc6 = nn.Conv2d(top.channels, fc_channels, 7, padding=3)
        self.fc7 = nn.Conv2d(fc_channels, fc_channels, 1)
        self.relu = nn.ReLU(inplace=True)
        self.drop6 = nn.Dropout(dropout)
        self.drop7 = nn.Dropout(dropout)
        self.score_fr = nn.Conv2d(fc_channels, num_outputs, 1)

        skips = VARIANTS[variant]
        stride = top.stride
        self.score_pool4 = self.upscore2 = self.score_pool3 = self.upscore_pool4 = None
        if "pool4" in skips:
            info = feature_info["pool4"]
            self.score_pool4 = nn.Conv2d(info.channels, num_outputs, 1)
            self.upscore2 = BilinearUpsample(
                num_outputs, stride // info.stride, learnable=learnable_upsampling
            )
            stride = info.stride
        if "pool3" in skips:
            info = feature_info["pool3"]
            self.score_pool3 = nn.Conv2d(info.channels, num_outputs, 1)
            self.upscore_pool4 = BilinearUpsample(
                num_outputs, stride // info.stride, learnable=learnable_upsampling
            )
            stride = info.stride
        # The paper's upscore32 / upscore16 / upscore8: fixed bilinear back to the input resolution.
        self.upscore = BilinearUpsample(num_outputs, stride, learnable=False)
        for layer in (self.score_fr, self.score_pool4, self.score_pool3):
            if layer is not None:
                nn.init.zeros_(layer.weight)
                nn.init.zeros_(layer.bias)

    @torch.no_grad()
    def load_fc_from_classifier(self, fc6: nn.Linear, fc7: nn.Linear) -> None:
        """Copy an ImageNet VGG's fully connected fc6/fc7 into the convolutional ones (sec. 3.1)."""
        if fc6.weight.numel() != self.fc6.weight.numel() or fc7.weight.numel() != self.fc7.weight.numel():
            raise ValueError(
                f"VGG classifier shapes {tuple(fc6.weight.shape)}, {tuple(fc7.weight.shape)} do not fit fc6 "
                f"{tuple(self.fc6.weight.shape)} / fc7 {tuple(self.fc7.weight.shape)}"
            )
        self.fc6.weight.copy_(fc6.weight.view_as(self.fc6.weight))
        self.fc6.bias.copy_(fc6.bias)
        self.fc7.weight.copy_(fc7.weight.view_as(self.fc7.weight))
        self.fc7.bias.copy_(fc7.bias)

    def forward(self, features: dict[str, Tensor]) -> Tensor:
        x = self.drop6(self.relu(self.fc6(features["pool5"])))
        x = self.drop7(self.relu(self.fc7(x)))
        scores = self.score_fr(x)
        if self.score_pool4 is not None:
            scores = self.upscore2(scores) + self.score_pool4(features["pool4"])
        if self.score_pool3 is not None:
            scores = self.upscore_pool4(scores) + self.score_pool3(features["pool3"])
        return self.upscore(scores)
