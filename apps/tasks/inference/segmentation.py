"""Semantic segmentation at inference: longest side to the checkpoint's size (padded to a square so images
of any shape batch together), logits back to the original size, an index mask, a blended overlay.

The mask paints a pixel with an object class only where the model is at least that class's threshold sure
of it: the caller's score threshold (one for every class), else the checkpoint's own per class, calibrated
on its validation split after training (vision/segmentation/threshold.py), else 0 (the plain argmax)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import albumentations as A
import cv2
import numpy as np
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from apps.predict.writers import MASKS_DIR
from apps.tasks.inference.base import (
    Inference,
    Result,
    Size,
    Transform,
    as_is,
    csv_head,
    hwc_to_chw,
    rows_or_blank,
)
from vision import visualize
from vision.data.transforms import PAD_VALUE
from vision.segmentation.export import segmenter_spec
from vision.segmentation.threshold import paint

__all__ = ["SegmentationInference", "SegmentationResult"]

# Above this many logits per image ((K + 1) x H x W) the argmax is taken at the model's resolution and the
# index map enlarged instead of the logits: a 12-megapixel photo with 21 classes would otherwise need a
# 1 GB float tensor.
MAX_UPSAMPLED_LOGITS = 64_000_000


@dataclass
class SegmentationResult(Result):
    """Index mask of one image at its original size. mask: (H, W) uint8 (uint16 beyond 254 classes),
    0 background, label k is ``classes[k - 1]``; classes: the checkpoint's class list."""

    mask: np.ndarray
    classes: list[dict[str, Any]]
    image_size: Size
    best_below: float | None = None  # nothing painted: the highest object probability, under the threshold

    csv_columns = ["file", "width", "height", "mask", "category_id", "name", "pixels"]
    counts_key = "images_per_class"
    folders = (MASKS_DIR,)

    def pixels_per_class(self) -> list[dict[str, Any]]:
        """Classes present in the mask with their pixel counts (background left out)."""
        counts = np.bincount(self.mask.ravel(), minlength=len(self.classes) + 1)
        return [{"category_id": self.classes[k - 1]["id"], "name": self.classes[k - 1]["name"],
                 "pixels": int(counts[k])} for k in range(1, len(counts)) if counts[k]]

    def record(self) -> dict[str, Any]:
        return {"classes": self.pixels_per_class()}

    def draw(self, image: np.ndarray, scale: float = 1.0) -> np.ndarray:
        """The mask blended over ``image`` (resized to it when ``image`` is a copy of another size)."""
        mask = self.mask
        if mask.shape != image.shape[:2]:
            mask = cv2.resize(mask, (image.shape[1], image.shape[0]), interpolation=cv2.INTER_NEAREST)
        return visualize.overlay_mask(image, mask, ["background"] + [c["name"] for c in self.classes])

    def quiet_best(self) -> float | None:
        return self.best_below

    def table_rows(self) -> list[list[Any]]:
        """Rows ``class, pixels, % of image``, largest first (the demo's table)."""
        total = self.mask.size
        return [[c["name"], c["pixels"], round(100.0 * c["pixels"] / total, 1)]
                for c in sorted(self.pixels_per_class(), key=lambda c: -c["pixels"])]

    def save(self, output: Path, mask_name: str) -> dict[str, Any]:
        name = f"{MASKS_DIR}/{mask_name}"
        path = output / name
        path.parent.mkdir(parents=True, exist_ok=True)
        # uint8 masks are 8-bit greyscale PNGs; more than 254 classes need 16 bits.
        Image.fromarray(self.mask, mode="L" if self.mask.dtype == np.uint8 else "I;16").save(path)
        return {"mask": name}

    @classmethod
    def csv_rows(cls, record: dict[str, Any]) -> Iterator[list[Any]]:
        items = [[record["mask"], c["category_id"], c["name"], c["pixels"]] for c in record["classes"]]
        return rows_or_blank(csv_head(record), items or [[record["mask"], "", "", ""]], len(cls.csv_columns))

    @classmethod
    def counted(cls, record: dict[str, Any]) -> list[str]:
        return [c["name"] for c in record["classes"]]  # images showing the class


def _most_sure_object(probs: Tensor) -> float | None:
    """The highest probability of the pixels whose most probable class is an object (None: no such pixel)."""
    top, labels = probs.max(0)
    objects = top[labels > 0]
    return float(objects.max()) if objects.numel() else None


class SegmentationInference(Inference):
    task = "segmentation"
    result_type = SegmentationResult
    takes_thresholds = True
    default_score_thresh = 0.0  # a checkpoint without calibrated thresholds: the argmax, as evaluated
    quiet_what = "object pixel"

    def __init__(self, classes: Sequence[dict[str, Any]], preprocess: dict[str, Any], *,
                 score_thresh: float | None = None, **settings: Any) -> None:
        super().__init__(classes, preprocess, score_thresh=score_thresh, **settings)
        calibrated = preprocess.get("class_thresholds") if score_thresh is None else None
        per_class = [float(t) for t in calibrated] if calibrated else [self.score_thresh] * len(self.classes)
        if len(per_class) != len(self.classes) or not all(0.0 <= t <= 1.0 for t in per_class):
            raise ValueError(f"class_thresholds {calibrated}: expected {len(self.classes)} values in [0, 1]")
        self.class_thresholds: list[float] = per_class  # what each object class needs, in label order
        self.calibrated = bool(calibrated)

    @property
    def quiet_threshold(self) -> float:
        """Nothing painted: no object pixel reached its class's threshold, so none reached the highest."""
        return max(self.class_thresholds, default=0.0)

    def thresholds_in_use(self) -> dict[str, Any]:
        if not self.calibrated:
            return super().thresholds_in_use()
        by_name = dict(zip([c["name"] for c in self.classes], self.class_thresholds, strict=True))
        return {"score_threshold": None, "class_thresholds": by_name}

    def input_transform(self, preprocess: dict[str, Any]) -> Transform:
        size = preprocess.get("size")
        if size is None:
            return as_is  # each image at its own size, as evaluation ran
        resize = A.LongestMaxSize(max_size=int(size))
        pad = A.PadIfNeeded(min_height=int(size), min_width=int(size), position="top_left",
                            border_mode=cv2.BORDER_CONSTANT, fill=PAD_VALUE)

        def transform(image: np.ndarray) -> tuple[Tensor, Size]:
            image = resize(image=image)["image"]
            return hwc_to_chw(pad(image=image)["image"]), image.shape[:2]

        return transform

    def result(self, logits: Tensor, valid: Size, size: Size) -> SegmentationResult:
        """logits: [K + 1, h, w] at the model's input size -> index mask at the original (H, W)."""
        logits = logits[:, :valid[0], :valid[1]]
        upsample = logits.shape[0] * size[0] * size[1] <= MAX_UPSAMPLED_LOGITS
        if upsample:
            logits = F.interpolate(logits[None].float(), size=size, mode="bilinear", align_corners=False)[0]
        if self.allowed is not None:  # after interpolating: -inf would turn into NaN there
            logits = logits.masked_fill(~self.allowed.to(logits.device)[:, None, None], float("-inf"))
        if any(self.class_thresholds):
            probs = logits.float().softmax(0)
            labels = paint(probs, self.class_thresholds)
            best_below = None if labels.any() else _most_sure_object(probs)
        else:  # the argmax needs no probabilities
            labels, best_below = logits.argmax(0), None
        if not upsample:
            labels = F.interpolate(labels[None, None].float(), size=size, mode="nearest")[0, 0].long()
        dtype = np.uint8 if len(self.classes) < 255 else np.uint16
        return SegmentationResult(labels.cpu().numpy().astype(dtype), self.classes, size, best_below)

    @classmethod
    def export_spec(cls, loaded: Any, model: Any, metadata: dict[str, Any]) -> Any:
        size = loaded.preprocess.get("size")
        mean, std = model.normalize.mean.flatten().tolist(), model.normalize.std.flatten().tolist()
        before = (f"longest side resized to {size} (OpenCV), padded at the bottom/right to {size} x {size}"
                  if size else "any size")
        metadata["preprocess"] = {
            "input": f"RGB images [N, 3, H, W] float32 in [0, 1]: {before}",
            "inside": f"normalise (mean {mean}, std {std}), padding to the model's stride, scores upsampled "
                      "to H x W; mask = argmax", "size": size}
        return segmenter_spec(model, int(size) if size else None, metadata)
