"""The inference side of a task: one :class:`Inference` subclass and one :class:`Result` type per task.

An ``Inference`` is made per use (a predictor, a demo request) with the checkpoint's classes and
preprocess entry and the caller's choices (thresholds, class filter, top-k). It turns a decoded image into
the model's input (``transform``), runs the model (``forward``: batched, or one image per call) and turns
each output into a :class:`Result`. A result draws itself, gives its predictions.jsonl record, and its
class reads those records back for the CSV export and the per-class counts (a resumed run only has the
records).

Adding a task with a new sort of output means one ``Inference`` subclass with its ``Result`` type; a task
whose output is an existing task's (R-CNN: detection) reuses that task's inference.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

__all__ = ["DEFAULT_SCORE_THRESH", "Inference", "ModelDescription", "Result", "Size", "Transform",
           "checkpoint_score_threshold", "hwc_to_chw"]

DEFAULT_SCORE_THRESH = 0.5  # a detector's threshold when neither the caller nor its checkpoint gives one

Size = tuple[int, int]  # (H, W)
# (H, W, 3) uint8 RGB -> (uint8 [3, h, w] model input, (h', w') part of it that is image)
Transform = Callable[[np.ndarray], tuple[Tensor, Size]]


def checkpoint_score_threshold(preprocess: dict[str, Any], default: float = DEFAULT_SCORE_THRESH) -> float:
    """The score threshold a checkpoint recommends: the one calibrated on its validation split after
    training (``preprocess["score_threshold"]``: a detector's, apps.tasks.detection; a segmenter's pixel
    threshold, apps.tasks.segmentation), else ``default``."""
    return float(preprocess.get("score_threshold", default))


def hwc_to_chw(image: np.ndarray) -> Tensor:
    """uint8 (H, W, 3) -> uint8 [3, H, W]. Inputs stay uint8 until they reach the model's device (4x less to
    move between DataLoader workers and the main process, and to the GPU)."""
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).contiguous()


def as_is(image: np.ndarray) -> tuple[Tensor, Size]:
    """The transform of models that take any size (detectors resize and pad inside)."""
    return hwc_to_chw(image), image.shape[:2]


@dataclass(frozen=True)
class ModelDescription:
    """What the demo shows about a checkpoint before loading it (read from its model config)."""

    arch: str
    nms_thresh: float | None = None  # detectors: the per-class NMS IoU the model was trained with
    generation: int = 0  # detectors: Generation.newness, 0 for Faster R-CNN (the demo lists newest first)
    has_anchors: bool = False  # what the demo's "how it works" tab can show at a clicked position


class Result(ABC):
    """One image's result. Subclasses are dataclasses with ``image_size`` (H, W) among their fields."""

    csv_columns: ClassVar[list[str]]  # predictions.csv header
    counts_key: ClassVar[str]  # summary.json key of the per-class totals
    folders: ClassVar[tuple[str, ...]] = ()  # output sub-folders :meth:`save` writes into

    image_size: Size

    @abstractmethod
    def record(self) -> dict[str, Any]:
        """The JSON-ready part of this image's predictions.jsonl line."""

    @abstractmethod
    def draw(self, image: np.ndarray, scale: float = 1.0) -> np.ndarray:
        """A copy of ``image`` (H, W, 3) uint8 with this result drawn on it; ``image`` may be a copy of the
        original resized by ``scale`` (a display copy), and the drawing follows it."""

    def save(self, output: Path, mask_name: str) -> dict[str, Any]:
        """Write this result's own files under ``output`` (default: none); returns record fields naming them.
        ``mask_name``: the image's name for a mask file (``apps.predict.sources.ImageFile.mask_name``)."""
        return {}

    def quiet_best(self) -> float | None:
        """The best score under the threshold when nothing was kept (so a hint can say "lower it")."""
        return None

    @classmethod
    @abstractmethod
    def csv_rows(cls, record: dict[str, Any]) -> Iterator[list[Any]]:
        """predictions.csv rows of one journal record (every image gets at least one row)."""

    @classmethod
    @abstractmethod
    def counted(cls, record: dict[str, Any]) -> list[str]:
        """Class names one journal record adds to the summary's per-class totals."""


def csv_head(record: dict[str, Any]) -> list[Any]:
    return [record["file"], record["width"], record["height"]]


def rows_or_blank(head: list[Any], items: list[list[Any]], columns: int) -> Iterator[list[Any]]:
    """``head + item`` per item; an image with nothing found still gets its row (every input appears)."""
    for item in items or [[""] * (columns - len(head))]:
        yield head + item


class Inference(ABC):
    """A task's inference for one checkpoint and one set of caller choices.

    Args:
        classes: the checkpoint's ``[{"id", "name"}, ...]`` in label order.
        preprocess: the checkpoint's ``preprocess`` entry.
        score_thresh, nms_thresh: detection: keep boxes scoring at least this, segmentation: paint an object
            where its probability is at least this (None: the checkpoint's calibrated threshold, else
            :attr:`default_score_thresh`; see :func:`checkpoint_score_threshold`); the IoU of the
            per-class NMS (None keeps the model's own).
        only: keep only these classes (names or dataset ids); None keeps all.
        top_k: classification: classes per result.
    """

    task: ClassVar[str]  # the task whose results these are, as run.json / summary.json say ("detection" ...)
    result_type: ClassVar[type[Result]]  # what :meth:`result` returns; it also reads the journal back
    label_offset: ClassVar[int] = 1  # model label of ``classes[0]`` (0 is background)
    one_image_per_forward: ClassVar[bool] = False
    coco_results: ClassVar[bool] = False  # results can be written as COCO results (image ids needed)
    takes_thresholds: ClassVar[bool] = False  # a score threshold the caller may set (--score-threshold)
    default_score_thresh: ClassVar[float] = DEFAULT_SCORE_THRESH  # without the caller's or the checkpoint's
    quiet_what: ClassVar[str] = "detection"  # what a result under the threshold lacks (the hint's words)

    def __init__(self, classes: Sequence[dict[str, Any]], preprocess: dict[str, Any], *,
                 score_thresh: float | None = None, nms_thresh: float | None = None,
                 only: Sequence[str | int] | None = None, top_k: int = 5) -> None:
        if score_thresh is None:
            score_thresh = checkpoint_score_threshold(preprocess, self.default_score_thresh)
        if not 0.0 <= score_thresh <= 1.0:
            raise ValueError(f"score threshold {score_thresh} outside [0, 1]")
        if nms_thresh is not None and not 0.0 < nms_thresh <= 1.0:
            raise ValueError(f"NMS threshold {nms_thresh} outside (0, 1]")
        self.classes = list(classes)
        self.score_thresh = score_thresh
        self.nms_thresh = nms_thresh
        self.top_k = max(1, min(top_k, len(self.classes)))
        self.allowed = self._class_mask(only)
        self.transform: Transform = self.input_transform(preprocess)

    def _class_mask(self, wanted: Sequence[str | int] | None) -> Tensor | None:
        """Boolean mask over the model's labels (background always allowed); None: every class."""
        if not wanted:
            return None
        offset = self.label_offset
        by_name = {c["name"]: i for i, c in enumerate(self.classes)}
        by_id = {str(c["id"]): i for i, c in enumerate(self.classes)}
        allowed = torch.zeros(len(self.classes) + offset, dtype=torch.bool)
        allowed[:offset] = True
        for w in wanted:
            index = by_name.get(str(w), by_id.get(str(w)))
            if index is None:
                known = ", ".join(f"{c['id']}:{c['name']}" for c in self.classes)
                raise ValueError(f"class {w!r} is not one of the checkpoint's classes ({known})")
            allowed[index + offset] = True
        return allowed

    def thresholds_in_use(self) -> dict[str, Any]:
        """What run.json and summary.json record of the thresholds in use (tasks that take them)."""
        return {"score_threshold": self.score_thresh if self.takes_thresholds else None}

    @property
    def quiet_threshold(self) -> float:
        """The threshold :meth:`Result.quiet_best` scores fell under (the hint names it)."""
        return self.score_thresh

    def names_and_ids(self, labels: Sequence[int]) -> tuple[list[str], list[int]]:
        """The classes' names and dataset ids of model labels."""
        entries = [self.classes[k - self.label_offset] for k in labels]
        return [c["name"] for c in entries], [c["id"] for c in entries]

    # ---- per task ------------------------------------------------------------------------------------------

    @abstractmethod
    def input_transform(self, preprocess: dict[str, Any]) -> Transform:
        """What happens to a decoded image before the model, as the checkpoint's ``preprocess`` says."""

    @abstractmethod
    def result(self, output: Any, valid: Size, size: Size) -> Result:
        """One image's model output -> its result in the original image's pixels ``size``; ``valid`` is the
        part of the model input that was image (the rest padding)."""

    def forward(self, model: Any, inputs: list[Tensor], stacked: Tensor | None,
                to_model: Callable[[Tensor], Tensor]) -> list[Any]:
        """Per-image outputs of ``model`` on uint8 ``inputs`` (``stacked``: the same as one batch, when they
        share a shape). Inputs of different sizes run as one forward per group of equal size rather than
        padded together, which would change the outputs near the borders."""
        if stacked is not None:
            out, _ = model(to_model(stacked))
            return list(out)
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, t in enumerate(inputs):
            groups.setdefault(tuple(t.shape), []).append(i)
        outputs: list[Any] = [None] * len(inputs)
        for members in groups.values():
            out, _ = model(to_model(torch.stack([inputs[i] for i in members])))
            for i, one in zip(members, out, strict=True):
                outputs[i] = one
        return outputs

    def run(self, model: Any, inputs: list[Tensor], valid: list[Size], sizes: list[Size],
            stacked: Tensor | None, device: torch.device) -> list[Result]:
        """Results of uint8 model ``inputs`` (see :meth:`forward`) for images of original ``sizes``."""
        if not inputs:
            return []
        to_model = lambda t: t.to(device, non_blocking=True).float().div_(255.0)  # noqa: E731
        outputs = self.forward(model, inputs, stacked, to_model)
        return [self.result(out, v, s) for out, v, s in zip(outputs, valid, sizes, strict=True)]

    # ---- what the demo and export need ---------------------------------------------------------------------

    @classmethod
    def describe(cls, model_cfg: dict[str, Any]) -> ModelDescription:
        """The checkpoint's architecture (and detector settings) from its stored model config."""
        return ModelDescription(str(model_cfg.get("arch") or model_cfg.get("backbone") or cls.task))

    @classmethod
    @abstractmethod
    def export_spec(cls, loaded: Any, model: Any, metadata: dict[str, Any]) -> Any:
        """``vision.export.GraphSpec`` of ``model`` (``loaded``'s, prepared for inference); ``metadata`` gets
        what the exported file must carry."""
