"""R-CNN's region warping: each proposal, grown by a margin of context, resized to the CNN's square input.

R-CNN (Girshick et al., 2014, appendix A) warps every region anisotropically to 227x227 after dilating it
"so that at the warped size there are exactly p = 16 pixels of warped image context around the original
box"; context that falls outside the image is filled with the image mean. Both follow from one
``torchvision.ops.roi_align`` call on the mean-subtracted image: roi_align bilinearly resamples any box to a
fixed grid (averaging several samples per output pixel when it shrinks, so small outputs do not alias) and
returns 0, i.e. the mean, for samples outside the image.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import box_convert, roi_align

__all__ = ["context_boxes", "warp_regions"]


def context_boxes(boxes: Tensor, out_size: int, padding: int) -> Tensor:
    """Grow boxes [N, 4] xyxy around their centres so that, warped to ``out_size`` pixels, the original box
    fills the inner ``out_size - 2 * padding`` pixels: each side grows by ``out_size / (out_size - 2p)``."""
    if not 0 <= 2 * padding < out_size:
        raise ValueError(f"context padding {padding} leaves nothing of a {out_size}-pixel warp")
    scale = out_size / (out_size - 2 * padding)
    centred = box_convert(boxes, "xyxy", "cxcywh")
    return box_convert(torch.cat([centred[:, :2], centred[:, 2:] * scale], dim=1), "cxcywh", "xyxy")


def warp_regions(image: Tensor, boxes: Tensor, out_size: int, padding: int = 16) -> Tensor:
    """Crop and warp regions of one image for an R-CNN.

    Args:
        image: [C, H, W], already mean-subtracted (so that outside-image context reads as the mean, 0).
        boxes: [N, 4] xyxy in the image's pixels.
        out_size: the CNN's input side S (227 for AlexNet, 224 for VGG-16).
        padding: warped pixels of context around each box (16 in the paper, 0 for a tight warp).

    Returns:
        [N, C, S, S] warped regions.
    """
    if len(boxes) == 0:
        return image.new_zeros((0, image.shape[0], out_size, out_size))
    grown = context_boxes(boxes.to(image.dtype), out_size, padding)
    # aligned=True puts pixel centres at half-integers, so a box [0, W] covers exactly the W pixels;
    # sampling_ratio=0 takes ceil(box side / S) samples per output pixel: an area average when shrinking.
    return roi_align(image[None], [grown], output_size=(out_size, out_size), spatial_scale=1.0,
                     sampling_ratio=0, aligned=True)
