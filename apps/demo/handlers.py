"""What the demo page's buttons do: decode the upload, run the cached model, return what the page shows.

Every handler turns a bad input into a ``gr.Error`` with a one-line message (the uploaded file's name and the
reason, never a server path or a traceback) and any unexpected failure into a short generic message, logged
in full on the server, which keeps serving. ``check_image`` runs before a request is queued (Gradio's
validator), so a bad upload is answered at once even while the queue is busy.
"""

from __future__ import annotations

import functools
import json
import sys
import time
import traceback
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from apps.demo import views
from apps.demo.models import DemoInputError, ModelCache, fit_size, read_upload
from apps.predict.predictor import Predictor
from apps.predict.results import threshold_hint
from apps.tasks.inference.base import Inference
from apps.tasks.inference.classification import NONE_OF_THESE, ClassificationInference
from apps.tasks.inference.detection import DetectionInference
from apps.tasks.inference.segmentation import SegmentationInference
from detection.explain import explain
from vision.data.transforms import to_tensor

__all__ = ["DemoHandlers", "upload_path"]

# gradio, imported by the first DemoHandlers rather than with this module: gradio fixes its temporary folder
# from GRADIO_TEMP_DIR when it is imported, and the Demo points that variable at a folder of its own first
# (else gradio's own files are left behind in the user's folder). A module global, so that gradio resolves
# the ``gr.SelectData`` annotation by which it passes a click's position to ``pick_position``.
gr: Any = None


def _import_gradio() -> None:
    global gr
    import gradio

    gr = gradio


def _page_errors(fn: Callable) -> Callable:
    """DemoInputError -> its message in the page; anything else -> a generic message, logged in full."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except DemoInputError as exc:
            raise gr.Error(str(exc), print_exception=False) from None
        except gr.Error:
            raise
        except Exception as exc:
            traceback.print_exc(file=sys.stderr)
            raise gr.Error(f"The model failed on this image ({type(exc).__name__}); the server log has the "
                           "details.", print_exception=False) from None

    return wrapper


def upload_path(value: Any) -> str | None:
    """The file of an image input read without preprocessing: Gradio's FileData as a dict (the path is one
    Gradio checked to be its own upload), or a plain path (direct calls)."""
    if value is None or isinstance(value, str):
        return value or None
    if isinstance(value, dict):
        if value.get("path"):
            return str(value["path"])
        if str(value.get("url") or "").startswith("data:"):
            raise DemoInputError("This image arrived inline (a data URL); upload it as a file instead.")
    raise DemoInputError("No image: upload one (or paste, or pick an example) first.")


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms"


class DemoHandlers:
    """The page's callbacks around one ModelCache.

    max_pixels: uploads with more pixels are refused; max_side: inference runs on a copy at most this long
    (results mapped back); files_dir: where JSON downloads are written (inside Gradio's cache folder, so
    Gradio serves them without a copy and deletes them with its other temporary files).
    """

    def __init__(self, cache: ModelCache, *, max_pixels: int, max_side: int, files_dir: str | Path):
        _import_gradio()
        self.cache = cache
        self.max_pixels = max_pixels
        self.max_side = max_side
        self.files_dir = Path(files_dir)

    # ---- shared --------------------------------------------------------------------------------------------

    def check_image(self, image: Any, *others: Any) -> list[Any]:
        """Gradio validator, one verdict per input; the decoded upload is cached for the request."""
        verdict = gr.validate(True, "")
        try:
            read_upload(upload_path(image), max_pixels=self.max_pixels)
        except DemoInputError as exc:
            verdict = gr.validate(False, str(exc))
        except Exception as exc:  # the validator must never raise: Gradio would show the raw text
            verdict = gr.validate(False, f"This file cannot be used ({type(exc).__name__}).")
        return [verdict] + [gr.validate(True, "") for _ in others]

    def _image(self, upload: Any) -> tuple[np.ndarray, np.ndarray, float]:
        """(original, inference copy, its scale)."""
        image = read_upload(upload_path(upload), max_pixels=self.max_pixels)
        small, scale = fit_size(image, self.max_side)
        return image, small, scale

    def _predictor(self, label: str, inference_type: type[Inference], **settings: Any) -> Predictor:
        """A predictor of ``label``'s model, which must give results of ``inference_type`` (the tab's)."""
        entry = self.cache.checkpoint(label)
        if not entry.is_a(inference_type):
            raise DemoInputError(f"{label} is a {entry.task} model; pick one of: "
                                 f"{', '.join(self.cache.labels(inference_type)) or 'none available'}.")
        loaded = self.cache.get(label)
        try:
            return Predictor(loaded, self.cache.device, **settings)
        except ValueError as exc:  # a class filter or threshold this model does not take
            raise DemoInputError(str(exc)) from None

    def _size_note(self, image: np.ndarray, small: np.ndarray) -> str:
        if small is image:
            return ""
        return (f" The {image.shape[1]}×{image.shape[0]} upload ran at {small.shape[1]}×{small.shape[0]}; "
                "boxes are in the original pixels.")

    # ---- detection -----------------------------------------------------------------------------------------

    def model_changed(self, label: str | None) -> tuple[Any, Any, Any, str]:
        """Detection model picked: its classes for the filter, its NMS threshold, its score threshold (the
        one calibrated on its validation split, else 0.5), a line about it."""
        if not label or label not in self.cache.checkpoints:
            return gr.update(choices=[], value=[]), gr.update(), gr.update(), ""
        entry = self.cache.checkpoint(label)
        names = [c["name"] for c in entry.classes]
        nms = gr.update(value=entry.nms_thresh) if entry.nms_thresh is not None else gr.update()
        score = gr.update(value=entry.score_thresh)
        return gr.update(choices=names, value=[]), nms, score, self.about(label)

    def about(self, label: str | None) -> str:
        """The picked model in two lines: architecture and metrics, then what it was trained on and knows."""
        if not label or label not in self.cache.checkpoints:
            return ""
        entry = self.cache.checkpoint(label)
        return f"{entry.summary()}  \n{entry.expectations()}"

    @_page_errors
    def detect(self, image: Any, label: str, score: float, nms: float, classes: list[str] | None
               ) -> tuple[np.ndarray, list[list[Any]], str, str]:
        """-> (annotated picture, table rows, JSON file path, text with the timing)."""
        original, small, scale = self._image(image)
        predictor = self._predictor(label, DetectionInference, score_thresh=float(score),
                                    nms_thresh=float(nms), classes=list(classes or []) or None)
        start = time.perf_counter()
        result = predictor.predict([small])[0]
        elapsed = time.perf_counter() - start
        result = result.scaled(scale, original.shape[:2])
        name = Path(upload_path(image)).name
        record = {"image": name, "model": label, "width": original.shape[1],
                  "height": original.shape[0], "score_threshold": float(score), "nms_threshold": float(nms),
                  "inference_ms": round(elapsed * 1000, 1), "detections": result.best_first()}
        folder = self.files_dir / uuid.uuid4().hex
        folder.mkdir(parents=True)
        json_path = folder / f"{Path(name).stem}_detections.json"
        json_path.write_text(json.dumps(record, indent=2))
        count = len(result.labels)
        info = (f"**{count} detection{'s' * (count != 1)}** at score ≥ {score:.2f} · inference "
                f"{_ms(elapsed)} on {self.cache.device.type} · {label}.{self._size_note(original, small)}"
                f"{self.cache.checkpoint(label).result_note()}")
        if not count and result.best_below is not None:
            info += "  \n" + threshold_hint(result.best_below, float(score), "the Score threshold slider")
        return views.draw_detections(small, result, scale), result.table_rows(), str(json_path), info

    # ---- segmentation and classification -------------------------------------------------------------------

    @_page_errors
    def segment(self, image: Any, label: str) -> tuple[np.ndarray, list[list[Any]], str]:
        """-> (overlay with legend, table class / pixels / share, text with the timing)."""
        original, small, _ = self._image(image)
        predictor = self._predictor(label, SegmentationInference)
        start = time.perf_counter()
        result = predictor.predict([small])[0]
        elapsed = time.perf_counter() - start
        rows = result.table_rows()
        inference = predictor.inference  # the checkpoint's pixel thresholds, calibrated after training
        where = (" where the model is as sure as each class's threshold (calibrated on held-out images)"
                 if any(inference.class_thresholds) else "")
        info = (f"**{len(rows)} class{'es' * (len(rows) != 1)} found**{where} · inference {_ms(elapsed)} "
                f"on {self.cache.device.type} · {label}.{self._size_note(original, small)}"
                f"{self.cache.checkpoint(label).result_note()}")
        if (best := result.quiet_best()) is not None:
            info += "  \n" + threshold_hint(best, inference.quiet_threshold,
                                            "`visiondet predict --score-threshold`", what="object pixel")
        return views.draw_result(small, result), rows, info

    @_page_errors
    def classify(self, image: Any, label: str) -> tuple[dict[str, float] | str, str]:
        """-> ({class name: probability} of the top 5, or "none of these"; text with the timing and, for
        "none of these", the top classes and why they were not taken)."""
        _, small, _ = self._image(image)
        predictor = self._predictor(label, ClassificationInference, top_k=5)
        start = time.perf_counter()
        result = predictor.predict([small])[0]
        elapsed = time.perf_counter() - start
        note = self.cache.checkpoint(label).result_note()
        info = f"Inference {_ms(elapsed)} on {self.cache.device.type} · {label}.{note}"
        if not result.none_of_these:
            return result.top(), info
        ranked = ", ".join(f"{name} {p:.2f}" for name, p in result.top().items())
        best = result.quiet_best()
        why = (threshold_hint(best, float(result.threshold), None, what="class") if best is not None
               else "the model's most likely answer is its class of images with none of the others")
        return NONE_OF_THESE, f"{info}  \n**None of these**: {why}. Most likely: {ranked}."

    # ---- how it works --------------------------------------------------------------------------------------

    @_page_errors
    def explain(self, image: Any, label: str, x_pct: float, y_pct: float, top_n: float, score: float
                ) -> tuple[Any, ...]:
        """-> four pictures (each with its title) and a paragraph on this image's stages."""
        _, small, _ = self._image(image)
        # checks the model gives detections, loads it once; its inference keeps what scores ``score``
        predictor = self._predictor(label, DetectionInference, score_thresh=float(score))
        model = getattr(predictor.model, "pytorch_model", predictor.model)  # stages need PyTorch's model
        height, width = small.shape[:2]
        position = (float(x_pct) / 100.0 * (width - 1), float(y_pct) / 100.0 * (height - 1))
        tensor = to_tensor(small).to(self.cache.device)
        e = explain(model, tensor, position=position, top_n=int(top_n),
                    thresholds=predictor.inference.thresholds_for(model))
        result = predictor.inference.result(e.detections, (height, width), (height, width))
        names = [c["name"] for c in predictor.classes]
        text = views.explanation_text(e, len(result.labels), float(score))
        panels = views.explanation_panels(small, e, result, 1.0, names, text["titles"])
        pictures = [gr.update(value=p, label=t) for p, t in zip(panels, text["titles"], strict=True)]
        return (*pictures, text["body"])

    def pick_position(self, label: str | None, image: Any, panel: np.ndarray | None, evt: gr.SelectData
                      ) -> tuple[Any, Any]:
        """A click on the anchors picture -> the x, y sliders (percent of the width and height).

        The panel is the picture with its caption strip below it: the picture's own height follows from the
        upload's aspect ratio, and a click on the caption, or on a detector without anchors, moves nothing.
        """
        if panel is None or evt.index is None or not self.has_anchors(label):
            return gr.update(), gr.update()
        try:
            original = read_upload(upload_path(image), max_pixels=self.max_pixels)
        except DemoInputError:
            return gr.update(), gr.update()
        width = np.asarray(panel).shape[1]
        height = round(width * original.shape[0] / original.shape[1])
        x, y = evt.index[:2]
        if y >= height:
            return gr.update(), gr.update()
        return round(100.0 * float(x) / max(width - 1, 1), 1), round(100.0 * float(y) / max(height - 1, 1), 1)

    def has_anchors(self, label: str | None) -> bool:
        """Whether the picked detector has anchors to show (Faster R-CNN; not R-CNN or Fast R-CNN)."""
        return bool(label) and label in self.cache.checkpoints and self.cache.checkpoint(label).has_anchors

