"""Classification at inference: the evaluation pipeline of training, softmax top-k, a text panel, and
"none of these" for checkpoints that name a none class (``preprocess.none_class``, e.g. background): when
that class is the most likely one, or when the most likely class scores under the threshold calibrated on
held-out data after training (``preprocess.reject_below``, see apps/tasks/classification.py)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from torch import Tensor

from apps.tasks.inference.base import Inference, Result, Size, Transform, csv_head, hwc_to_chw, rows_or_blank
from vision import visualize
from vision.classification import classifier_spec
from vision.data.transforms import build_transforms

__all__ = ["ClassificationInference", "ClassificationResult"]


NONE_OF_THESE = "none of these"


@dataclass
class ClassificationResult(Result):
    """Top-k classes of one image, most likely first. labels: [k] int64 in 0..K-1; scores: [k]
    softmax probabilities; category_ids, names: the dataset's id and name of each. ``none_of_these``: the
    image gets no label (its most likely class is the none class, or scores under ``threshold``)."""

    labels: np.ndarray
    scores: np.ndarray
    category_ids: list[int]
    names: list[str]
    image_size: Size
    none_of_these: bool = False
    threshold: float | None = None  # the calibrated top-probability threshold (None: the model has none)

    csv_columns = ["file", "width", "height", "rank", "category_id", "name", "score"]
    counts_key = "top1_per_class"

    def record(self) -> dict[str, Any]:
        rows = zip(self.labels.tolist(), self.scores.tolist(), self.category_ids, self.names, strict=True)
        record: dict[str, Any] = {
            "topk": [{"label": label, "category_id": cid, "name": name, "score": round(score, 5)}
                     for label, score, cid, name in rows]}
        if self.threshold is not None or self.none_of_these:
            record["none_of_these"] = self.none_of_these
        return record

    def draw(self, image: np.ndarray, scale: float = 1.0) -> np.ndarray:
        return visualize.draw_topk(image, list(zip(self.names, self.scores.tolist(), strict=True)))

    def top(self) -> dict[str, float]:
        """{name: probability}, most likely first (the demo's label widget)."""
        return {name: float(p) for name, p in zip(self.names, self.scores.tolist(), strict=True)}

    def quiet_best(self) -> float | None:
        """The top probability of an image answered "none of these" under the threshold (so the hint can
        say how close it came); None when it has a label, or when the none class itself won."""
        if not self.none_of_these or self.threshold is None or not len(self.scores):
            return None
        return float(self.scores[0]) if float(self.scores[0]) < self.threshold else None

    @classmethod
    def csv_rows(cls, record: dict[str, Any]) -> Iterator[list[Any]]:
        items = [[rank, c["category_id"], c["name"], c["score"]] for rank, c in enumerate(record["topk"], 1)]
        return rows_or_blank(csv_head(record), items, len(cls.csv_columns))

    @classmethod
    def counted(cls, record: dict[str, Any]) -> list[str]:
        if record.get("none_of_these"):
            return [NONE_OF_THESE]
        return [c["name"] for c in record["topk"][:1]]  # images whose top-1 is the class


class ClassificationInference(Inference):
    task = "classification"
    result_type = ClassificationResult
    label_offset = 0  # classification labels are 0..K-1: there is no background
    quiet_what = "class"

    def __init__(self, classes: Sequence[dict[str, Any]], preprocess: dict[str, Any], **choices: Any) -> None:
        super().__init__(classes, preprocess, **choices)
        names = [c["name"] for c in self.classes]
        none_class = preprocess.get("none_class")
        self.none_label = names.index(none_class) if none_class in names else None
        threshold = preprocess.get("reject_below")
        self.reject_below = float(threshold) if threshold is not None else None

    @property
    def quiet_threshold(self) -> float:
        return self.reject_below or 0.0

    def input_transform(self, preprocess: dict[str, Any]) -> Transform:
        # 224 for checkpoints without the entry, as the classification task reads them
        pipeline = build_transforms(None, "classification", False, size=int(preprocess.get("size") or 224))

        def transform(image: np.ndarray) -> tuple[Tensor, Size]:
            image = pipeline(image=image)["image"]
            return hwc_to_chw(image), image.shape[:2]

        return transform

    def result(self, logits: Tensor, valid: Size, size: Size) -> ClassificationResult:
        """logits: [K]."""
        probs = logits.float().softmax(-1)
        ranked, k = probs, self.top_k
        if self.allowed is not None:  # other classes rank below every allowed one
            ranked = probs.masked_fill(~self.allowed.to(probs.device), -1.0)
            k = min(k, int(self.allowed.sum()))
        scores, labels = ranked.topk(k)
        names, ids = self.names_and_ids(labels.tolist())
        best = int(labels[0])
        none = (best == self.none_label
                or (self.reject_below is not None and float(scores[0]) < self.reject_below))
        return ClassificationResult(labels=labels.cpu().numpy(), scores=scores.cpu().numpy(),
                                    category_ids=ids, names=names, image_size=size, none_of_these=none,
                                    threshold=self.reject_below)

    @classmethod
    def export_spec(cls, loaded: Any, model: Any, metadata: dict[str, Any]) -> Any:
        size = int(loaded.preprocess.get("size", 224))
        mean, std = model.normalize.mean.flatten().tolist(), model.normalize.std.flatten().tolist()
        metadata["preprocess"] = {
            "input": f"RGB images [N, 3, {size}, {size}] float32 in [0, 1]: short side resized to "
                     f"round({size} / 0.875) (OpenCV bilinear), then a centre crop of {size} x {size}",
            "inside": f"normalise (mean {mean}, std {std})", "size": loaded.preprocess.get("size")}
        return classifier_spec(model, size, metadata)
