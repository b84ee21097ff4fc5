"""The segmentation model as an export graph: any batch, height and width in, logits and the argmax mask out
(``vision/export.py`` traces it and checks the file against PyTorch)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from vision.export import GraphSpec, compare_dense, sample_images


class SegmenterGraph(nn.Module):
    """images [N, 3, H, W] in [0, 1] -> (logits [N, K + 1, H, W], mask [N, H, W] int64 argmax).

    The model pads to its ``size_divisor`` with a Python branch on the size; here the padding (the mean
    colour, i.e. zero after normalisation, as the model pads) comes from tensor shapes so any size works."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model.eval()

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        div = int(getattr(self.model, "size_divisor", 1))
        shape = torch._shape_as_tensor(images)
        if div > 1:
            extra = torch.remainder(-shape[2:], div)
            mean = self.model.normalize.mean.to(images.dtype)
            images = torch.cat((images, mean.expand(shape[0], 3, shape[2], extra[1])), dim=3)
            images = torch.cat((images, mean.expand(shape[0], 3, extra[0], shape[3] + extra[1])), dim=2)
        logits = self.model(images)[0][:, :, : shape[2], : shape[3]]
        return logits, logits.argmax(1)


def segmenter_spec(model: nn.Module, size: int | None, metadata: dict[str, Any]) -> GraphSpec:
    """Segmentation: dynamic batch, height and width (checked at three sizes; ``size`` is the padded
    square the predictor feeds, when the checkpoint has one)."""
    side = size or 128
    sizes = [(side, side), (side * 3 // 4 + 3, side + 17), (side + 9, side // 2 + 5)]
    images = sample_images(sizes, seed=2)
    samples = [(images[0][None],), (torch.stack([images[1]] * 2),), (images[2][None],)]
    axes = {0: "batch", 2: "height", 3: "width"}
    return GraphSpec(
        SegmenterGraph(model), ["images"], ["logits", "mask"],
        {"images": axes, "logits": axes, "mask": {0: "batch", 1: "height", 2: "width"}},
        samples, compare_dense(atol=1e-3, rtol=1e-3), metadata,
    )
