"""Anchors: reference boxes at every feature-map position (Faster R-CNN, section 3.1.1).

Legend: L feature levels, A anchors per position on a level, H x W a level's size.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn


class AnchorGenerator(nn.Module):
    """Anchors of ``sizes[l] x aspect_ratios[l]`` at every position of level ``l``.

    The paper's default is one stride-16 map with 3 sizes (128, 256, 512) x 3 ratios (0.5, 1, 2) = 9 anchors
    per position; FPN uses one size per level: ``sizes=((32,), (64,), (128,), (256,), (512,))``.
    An aspect ratio is height / width; an anchor of size ``s`` and ratio ``r`` has area about ``s^2``
    (width ``s / sqrt(r)``, height ``s * sqrt(r)``), and its corners are rounded to whole pixels.

    The anchor of position ``(i, j)`` is centred on pixel ``(j * stride, i * stride)``, with the stride
    inferred as ``padded image size // level size`` per axis. These two conventions are torchvision's, so a
    model converted from torchvision sees exactly the anchors it was trained with.
    """

    def __init__(
        self,
        sizes: Sequence[Sequence[float]] = ((128, 256, 512),),
        aspect_ratios: Sequence[Sequence[float]] = ((0.5, 1.0, 2.0),),
    ) -> None:
        super().__init__()
        sizes = [tuple(float(s) for s in level) for level in sizes]
        aspect_ratios = [tuple(float(r) for r in level) for level in aspect_ratios]
        if len(aspect_ratios) == 1 and len(sizes) > 1:
            aspect_ratios = aspect_ratios * len(sizes)
        if len(sizes) != len(aspect_ratios) or not all(sizes) or not all(aspect_ratios):
            raise ValueError(
                f"AnchorGenerator needs one non-empty list of sizes and of aspect ratios per level, "
                f"got sizes={sizes} aspect_ratios={aspect_ratios}"
            )
        self.sizes = sizes
        self.aspect_ratios = aspect_ratios

    def num_anchors_per_location(self) -> list[int]:
        """A for each level."""
        return [len(s) * len(r) for s, r in zip(self.sizes, self.aspect_ratios, strict=True)]

    def cell_anchors(self, level: int, device: torch.device | str = "cpu") -> Tensor:
        """Zero-centred anchors [A, 4] of one level, ratio-major (all sizes of ratio 0, then ratio 1 ...)."""
        sizes = torch.tensor(self.sizes[level], dtype=torch.float32, device=device)
        ratios = torch.tensor(self.aspect_ratios[level], dtype=torch.float32, device=device)
        h_factor = torch.sqrt(ratios)
        w_factor = 1 / h_factor
        widths = (w_factor[:, None] * sizes[None, :]).reshape(-1)
        heights = (h_factor[:, None] * sizes[None, :]).reshape(-1)
        return (torch.stack((-widths, -heights, widths, heights), dim=1) / 2).round()

    def forward(
        self, image_size: tuple[int, int], feature_sizes: Sequence[tuple[int, int]], device=None
    ) -> list[Tensor]:
        """Anchors for a padded batch of size ``image_size`` (H, W) with levels of ``feature_sizes``.

        Returns one tensor per level, [H_l * W_l * A_l, 4] xyxy float32, ordered by row, then column, then
        anchor, which is the order RPNHead's outputs are flattened in. All images of a batch share them.
        """
        if len(feature_sizes) != len(self.sizes):
            raise ValueError(
                f"AnchorGenerator has {len(self.sizes)} levels but got {len(feature_sizes)} feature maps"
            )
        device = torch.device(device or "cpu")
        return [
            self._grid_anchors(level, image_size, size, device) for level, size in enumerate(feature_sizes)
        ]

    def _grid_anchors(self, level: int, image_size: tuple[int, int], size: tuple[int, int], device) -> Tensor:
        # sizes are ints, or 0-d tensors while traced for export: no int() here, so they stay in the graph
        grid_h, grid_w = size
        stride_h, stride_w = image_size[0] // grid_h, image_size[1] // grid_w
        ys = torch.arange(grid_h, dtype=torch.float32, device=device) * stride_h
        xs = torch.arange(grid_w, dtype=torch.float32, device=device) * stride_w
        ys, xs = torch.meshgrid(ys, xs, indexing="ij")
        shifts = torch.stack((xs, ys, xs, ys), dim=-1).reshape(-1, 1, 4)
        return (shifts + self.cell_anchors(level, device)[None]).reshape(-1, 4)
