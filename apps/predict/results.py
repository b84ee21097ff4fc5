"""What :meth:`apps.predict.predictor.Predictor.predict_source` yields per file, and the texts about results.

The results themselves are the tasks' (apps/tasks/inference/): each draws itself (``draw``, via
vision.visualize) and turns into the JSON-ready part of its predictions.jsonl line (``record``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from apps.predict.sources import ImageFile
from apps.tasks.inference.base import Result

__all__ = ["Prediction", "error_type", "threshold_hint"]


def threshold_hint(best_below: float, threshold: float, control: str | None, *, images: int | None = None,
                   where: str | None = None, what: str = "detection") -> str:
    """The line for results that all scored under the threshold: the highest score seen (and, for a
    folder, how many images and which one had it), and ``control``, the way to lower the threshold.

    Detections: ``what="detection"`` with the control that lowers the threshold. A classifier's calibrated
    "none of these": ``what="class"`` and no control (the threshold is the checkpoint's)."""
    subject = f"no {what}" if images is None else f"{images} image(s) had no {what}"
    highest = f"highest {best_below:.2f}" + (f", in {where}" if where else "")
    if control is None:
        return (f"{subject} scoring {threshold:.2f} or more ({highest}): answered \"none of these\" (the "
                "model's threshold, calibrated on held-out images with none of its classes)")
    return (f"{subject} scoring {threshold:.2f} or more, but some scoring less ({highest}): lower {control} "
            "to see them")


@dataclass
class Prediction:
    """One file of :meth:`Predictor.predict_source`: its result, or the reason it could not be read.
    ``image`` is the decoded (H, W, 3) uint8 picture when asked for (``keep_images=True``)."""

    file: ImageFile
    result: Result | None
    error: str | None = None
    image: np.ndarray | None = None


def error_type(reason: str) -> str:
    """Short category of a read failure, for grouping errors.jsonl."""
    text = reason.lower()
    for key, name in (("empty", "empty"), ("truncated", "truncated"), ("over-size", "too many pixels"),
                      ("not an image", "not an image"), ("unsupported", "not an image")):
        if key in text:
            return name
    return "unreadable"
