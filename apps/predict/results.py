"""The typed results of :class:`apps.predict.predictor.Predictor`: one per image, whatever the task.

Each result draws itself on the image it came from (``draw``, via apps.visualize) and turns into the
JSON-ready part of its predictions.jsonl line (``record``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from apps import visualize
from apps.predict.sources import ImageFile

__all__ = ["ClassificationResult", "DetectionResult", "Prediction", "Result", "SegmentationResult",
           "error_kind", "threshold_hint"]


def threshold_hint(best_below: float, threshold: float, control: str, *, images: int | None = None,
                   where: str | None = None) -> str:
    """The line for detections that all scored under the threshold: the highest score seen (and, for a
    folder, how many images and which one had it), and ``control``, the way to lower the threshold."""
    subject = "no detection" if images is None else f"{images} image(s) had no detection"
    highest = f"highest {best_below:.2f}" + (f", in {where}" if where else "")
    return (f"{subject} scoring {threshold:.2f} or more, but some scoring less ({highest}): lower {control} "
            "to see them")


@dataclass
class DetectionResult:
    """Detections of one image. boxes: [D, 4] float32 xyxy original pixels; scores: [D] float32;
    labels: [D] int64 in 1..K; category_ids, names: the dataset's id and name of each label."""

    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray
    category_ids: list[int]
    names: list[str]
    image_size: tuple[int, int]  # (H, W)
    # the highest score of a box under the score threshold (None: none there), so that an image without
    # detections can say whether a lower threshold would show some
    best_below: float | None = None

    def record(self) -> dict[str, Any]:
        """JSON-ready: COCO-style ``bbox`` [x, y, w, h] in pixels, score, category id and name."""
        dets = []
        for (x0, y0, x1, y1), score, cid, name in zip(
            self.boxes.tolist(), self.scores.tolist(), self.category_ids, self.names, strict=True
        ):
            bbox = [round(x0, 2), round(y0, 2), round(x1 - x0, 2), round(y1 - y0, 2)]
            dets.append({"bbox": bbox, "score": round(score, 5), "category_id": cid, "name": name})
        return {"detections": dets}

    def draw(self, image: np.ndarray) -> np.ndarray:
        """A copy of ``image`` (H, W, 3) uint8 with this result drawn on it."""
        if not len(self.labels):
            return image.copy()
        names = {int(label): name for label, name in zip(self.labels.tolist(), self.names, strict=True)}
        table = [names.get(k, str(k)) for k in range(int(self.labels.max()) + 1)]
        return visualize.draw_detections(image, self.boxes, self.labels, self.scores, table)


@dataclass
class ClassificationResult:
    """Top-k classes of one image, most likely first. labels: [k] int64 in 0..K-1; scores: [k]
    softmax probabilities; category_ids, names: the dataset's id and name of each."""

    labels: np.ndarray
    scores: np.ndarray
    category_ids: list[int]
    names: list[str]
    image_size: tuple[int, int]

    def record(self) -> dict[str, Any]:
        rows = zip(self.labels.tolist(), self.scores.tolist(), self.category_ids, self.names, strict=True)
        return {"topk": [{"label": label, "category_id": cid, "name": name, "score": round(score, 5)}
                         for label, score, cid, name in rows]}

    def draw(self, image: np.ndarray) -> np.ndarray:
        """A copy of ``image`` (H, W, 3) uint8 with this result drawn on it."""
        return visualize.draw_topk(image, list(zip(self.names, self.scores.tolist(), strict=True)))


@dataclass
class SegmentationResult:
    """Index mask of one image at its original size. mask: (H, W) uint8 (uint16 beyond 254 classes),
    0 background, label k is ``classes[k - 1]``; classes: the checkpoint's class list."""

    mask: np.ndarray
    classes: list[dict[str, Any]]
    image_size: tuple[int, int]

    def pixels_per_class(self) -> list[dict[str, Any]]:
        """Classes present in the mask with their pixel counts (background left out)."""
        counts = np.bincount(self.mask.ravel(), minlength=len(self.classes) + 1)
        return [{"category_id": self.classes[k - 1]["id"], "name": self.classes[k - 1]["name"],
                 "pixels": int(counts[k])} for k in range(1, len(counts)) if counts[k]]

    def record(self) -> dict[str, Any]:
        return {"classes": self.pixels_per_class()}

    def draw(self, image: np.ndarray) -> np.ndarray:
        """A copy of ``image`` (H, W, 3) uint8 with this result drawn on it."""
        names = ["background"] + [c["name"] for c in self.classes]
        return visualize.overlay_mask(image, self.mask, names)


Result = DetectionResult | ClassificationResult | SegmentationResult


@dataclass
class Prediction:
    """One file of :meth:`Predictor.predict_source`: its result, or the reason it could not be read.
    ``image`` is the decoded (H, W, 3) uint8 picture when asked for (``keep_images=True``)."""

    file: ImageFile
    result: Result | None
    error: str | None = None
    image: np.ndarray | None = None


def error_kind(reason: str) -> str:
    """Short category of a read failure, for grouping errors.jsonl."""
    text = reason.lower()
    for key, kind in (("empty", "empty"), ("truncated", "truncated"), ("over-size", "too many pixels"),
                      ("not an image", "not an image"), ("unsupported", "not an image")):
        if key in text:
            return kind
    return "unreadable"
