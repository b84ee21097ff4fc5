"""Inside the model, before the backbone: normalise, resize, pad into one batch; after the heads: map back.

Legend: N images, M boxes in an image, H x W an image's size.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from detection.boxes import as_size
from detection.structures import Detections
from vision.layers import IMAGENET_MEAN, IMAGENET_STD

# Target entries that hold xyxy boxes in the image's pixels: ground truth, crowd (ignore) regions, and the
# external proposals a data pipeline attached to the sample.
BOX_KEYS = ("boxes", "crowd_boxes", "proposals")


@dataclass
class ImageBatch:
    """Images resized and padded into one tensor.

    tensors: [N, 3, H_pad, W_pad] normalised; image_sizes: (h, w) of each image after resizing, before
    padding; original_sizes: (h, w) of each input image; inputs: the input images themselves ([3, h, w] in
    [0, 1]), for proposal sources that work on the picture (selective search). Sizes are read from shapes:
    ints when the detector runs, 0-d tensors while it is traced for export (detection.export), so that
    every size computed from them stays in the exported graph.
    """

    tensors: Tensor
    image_sizes: list[tuple[int, int]]
    original_sizes: list[tuple[int, int]]
    inputs: list[Tensor] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.image_sizes)


def scale_boxes(boxes: Tensor, from_size: tuple[int, int], to_size: tuple[int, int]) -> Tensor:
    """Boxes [M, 4] xyxy in an image of ``from_size`` (h, w) to the same image resized to ``to_size``
    (float32 ratios; sizes as ints or traced 0-d tensors, see ImageBatch)."""
    ratio = as_size(to_size).to(torch.float32) / as_size(from_size).to(torch.float32)
    return boxes * torch.stack((ratio[1], ratio[0], ratio[1], ratio[0])).to(boxes.device)


def resized_size(size: Tensor, short_side: int, max_size: int) -> Tensor:
    """The size [2] int64 an image of ``size`` [2] (h, w) is resized to: short side ``short_side`` unless
    the long side would pass ``max_size``, each side floor(side * scale) (what ``F.interpolate``'s
    ``recompute_scale_factor`` gives, so converted torchvision models see the same pixels).

    In float64 throughout, as Python computes the scale: one 1-D float64 division, because the ONNX exporter
    turns a Python number (or a 0-d tensor) divided by a float64 tensor into float32 arithmetic, and
    floor(500 * 0.32) would become 159 instead of 160."""
    sides = size.to(torch.float64)
    limits = sides.new_tensor([float(short_side), float(max_size)])
    scale = (limits / torch.stack((sides.min(), sides.max()))).min()
    return torch.floor(sides * scale).to(torch.int64)


class DetectionTransform(nn.Module):
    """Normalise with mean/std, resize so the short side is ``min_size`` unless the long side would pass
    ``max_size``, and zero-pad to a common size divisible by ``size_divisible``.

    ``min_size`` may be a list: in training one is drawn per image (multi-scale training); at test time the
    last one is used. None keeps every image at its own size (R-CNN, which warps regions of the original
    pixels). Every box a target carries (``BOX_KEYS``: its boxes, crowd regions and proposals) and
    the given proposals are scaled with their image.
    """

    def __init__(
        self,
        min_size: int | Sequence[int] | None = 800,
        max_size: int = 1333,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        size_divisible: int = 32,
    ) -> None:
        super().__init__()
        self.keep_size = min_size is None
        if min_size is None:
            min_size = max_size  # unused: kept so that min_size[-1] reads as a size
        self.min_size = (
            (int(min_size),) if isinstance(min_size, int | float) else tuple(int(s) for s in min_size)
        )
        if not self.min_size or min(self.min_size) <= 0 or max_size <= 0:
            raise ValueError(f"min_size and max_size must be positive, got {min_size} and {max_size}")
        self.max_size = int(max_size)
        self.size_divisible = int(size_divisible)
        self.register_buffer(
            "mean", torch.tensor(mean, dtype=torch.float32).reshape(3, 1, 1), persistent=False
        )
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).reshape(3, 1, 1), persistent=False)

    def forward(
        self,
        images: Sequence[Tensor],
        targets: Sequence[dict[str, Tensor]] | None = None,
        proposals: Sequence[Tensor] | None = None,
    ) -> tuple[ImageBatch, list[dict[str, Tensor]] | None, list[Tensor] | None]:
        """images: N float tensors [3, H_i, W_i] in [0, 1]; targets: dicts with boxes [M, 4] xyxy float and
        labels [M] int64; proposals: [P_i, 4] xyxy boxes per image. Returns the batch and scaled copies."""
        check_inputs(images, targets, proposals)
        resized: list[Tensor] = []
        out_targets = [dict(t) for t in targets] if targets is not None else None
        out_proposals = list(proposals) if proposals is not None else None
        original_sizes = [_size(img) for img in images]
        for i, image in enumerate(images):
            image = self.resize(self.normalize(image))
            resized.append(image)
            new_size = _size(image)
            if out_targets is not None:
                for key in BOX_KEYS:
                    if key in out_targets[i]:
                        out_targets[i][key] = scale_boxes(out_targets[i][key], original_sizes[i], new_size)
            if out_proposals is not None:
                out_proposals[i] = scale_boxes(out_proposals[i], original_sizes[i], new_size)
        image_sizes = [_size(img) for img in resized]
        batch = ImageBatch(self.pad(resized), image_sizes, original_sizes, list(images))
        return batch, out_targets, out_proposals

    def normalize(self, image: Tensor) -> Tensor:
        return (image - self.mean.to(image)) / self.std.to(image)

    def resize(self, image: Tensor) -> Tensor:
        """[3, H, W] -> [3, H', W'] bilinear, keeping the aspect ratio (unchanged with ``keep_size``)."""
        if self.keep_size:
            return image
        if self.training and len(self.min_size) > 1:
            target = self.min_size[int(torch.randint(len(self.min_size), ()).item())]
        else:
            target = self.min_size[-1]
        # the sampling grid follows the output size exactly (torchvision's recompute_scale_factor)
        size = resized_size(torch._shape_as_tensor(image)[-2:], target, self.max_size)
        return F.interpolate(image[None], size=(size[0], size[1]), mode="bilinear", align_corners=False)[0]

    def pad(self, images: list[Tensor]) -> Tensor:
        """Zero-pad (after normalisation, i.e. the mean colour) on the bottom/right to a common size, a
        multiple of ``size_divisible`` (sizes as tensors: traced, they stay the input's)."""
        div = self.size_divisible
        sizes = torch.stack([torch._shape_as_tensor(img)[-2:] for img in images])
        padded = torch.div(sizes.max(dim=0).values + (div - 1), div, rounding_mode="floor") * div
        extra = padded - sizes
        out = [F.pad(img, (0, extra[i, 1], 0, extra[i, 0])) for i, img in enumerate(images)]
        return out[0][None] if len(out) == 1 else torch.stack(out)

    def postprocess(self, detections: list[Detections], batch: ImageBatch) -> list[Detections]:
        """Map each image's boxes from its resized size back to its original size."""
        return [
            Detections(scale_boxes(det.boxes, size, original), det.scores, det.labels)
            for det, size, original in zip(detections, batch.image_sizes, batch.original_sizes, strict=True)
        ]


def _size(image: Tensor) -> tuple[int, int]:
    """(h, w) of an image [..., H, W], as its shape gives them (ints; 0-d tensors while traced)."""
    height, width = image.shape[-2:]
    return height, width


def check_inputs(
    images: Sequence[Tensor],
    targets: Sequence[dict[str, Tensor]] | None,
    proposals: Sequence[Tensor] | None,
) -> None:
    """Raise a ValueError/TypeError that says which image or target is wrong and why."""
    if isinstance(images, Tensor) and images.dim() == 4:
        raise TypeError("detectors take a list of [3, H, W] image tensors, not one [N, 3, H, W] tensor")
    if len(images) == 0:
        raise ValueError("detectors need at least one image")
    for i, img in enumerate(images):
        if not isinstance(img, Tensor) or img.dim() != 3 or img.shape[0] != 3:
            shape = tuple(img.shape) if isinstance(img, Tensor) else type(img).__name__
            raise ValueError(f"image {i}: expected a [3, H, W] tensor, got {shape}")
        if not img.is_floating_point():
            raise TypeError(f"image {i}: expected float values in [0, 1], got dtype {img.dtype}")
        if img.shape[1] == 0 or img.shape[2] == 0:
            raise ValueError(f"image {i}: empty image of size {tuple(img.shape)}")
    if targets is not None:
        if len(targets) != len(images):
            raise ValueError(f"got {len(images)} images but {len(targets)} targets")
        for i, t in enumerate(targets):
            boxes, labels = t.get("boxes"), t.get("labels")
            if boxes is None or labels is None:
                raise ValueError(f"target {i}: needs 'boxes' and 'labels', got keys {sorted(t)}")
            if boxes.dim() != 2 or boxes.shape[1] != 4 or not boxes.is_floating_point():
                raise ValueError(
                    f"target {i}: boxes must be float [M, 4] xyxy, got {boxes.dtype} {tuple(boxes.shape)}"
                )
            if labels.shape != boxes.shape[:1] or labels.dtype != torch.int64:
                raise ValueError(
                    f"target {i}: labels must be int64 [M] matching boxes, got {labels.dtype} "
                    f"{tuple(labels.shape)} for {boxes.shape[0]} boxes"
                )
            for key in BOX_KEYS[1:]:
                extra = t.get(key)
                if extra is not None and (extra.dim() != 2 or extra.shape[1] != 4
                                          or not extra.is_floating_point()):
                    raise ValueError(
                        f"target {i}: {key} must be float [C, 4] xyxy, got {extra.dtype} {tuple(extra.shape)}"
                    )
            if boxes.numel() and not bool(((boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])).all()):
                bad = torch.where((boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1]))[0].tolist()
                raise ValueError(
                    f"target {i}: boxes {bad} have zero or negative width/height (xyxy expected)"
                )
    if proposals is not None:
        if len(proposals) != len(images):
            raise ValueError(f"got {len(images)} images but {len(proposals)} proposal sets")
        for i, p in enumerate(proposals):
            if p.dim() != 2 or p.shape[1] != 4:
                raise ValueError(f"proposals {i}: expected [P, 4] xyxy boxes, got {tuple(p.shape)}")
