"""Checkpoints to exported files, and exported files as models the Predictor can call.

``export_checkpoint`` builds the export graph of any task from a checkpoint (vision.export for
classification and segmentation, detection.export for Fast/Faster R-CNN), writes and checks the file, and
stores classes and preprocessing in it. ``cached_export`` does that once per checkpoint into a cache folder
(``$VISIONDET_CACHE`` or ``~/.cache/visiondet``), for ``predict``/``demo --backend onnxruntime``.
``ExportedModel`` wraps the exported file behind the model interface the Predictor already uses
(``model(inputs) -> (outputs, {})``), which is the whole backend seam.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from apps.tasks import LoadedModel, load_model
from detection.structures import Detections
from vision.export import (
    SUFFIXES,
    ExportError,
    ExportReport,
    GraphSpec,
    Runner,
    classifier_spec,
    export_graph,
    segmenter_spec,
)
from vision.layers import prepare_for_inference

BACKENDS = ("pytorch", "onnxruntime")
METADATA_VERSION = 1


def _preprocess_text(loaded: LoadedModel) -> dict[str, Any]:
    """What the caller must do before the exported graph, and what the graph does itself."""
    task = loaded.task.output
    size = loaded.preprocess.get("size")
    if task == "detection":
        t = loaded.model.transform
        mean, std = t.mean.flatten().tolist(), t.std.flatten().tolist()
        return {"input": "one RGB image [3, H, W] float32 in [0, 1], any size",
                "inside": f"normalise (mean {mean}, std {std}), resize (short side {t.min_size[-1]}, long "
                          f"side at most {t.max_size}, bilinear), pad to a multiple of {t.size_divisible}; "
                          "boxes come back in the input's pixels", "size": size}
    mean, std = loaded.model.normalize.mean.flatten().tolist(), loaded.model.normalize.std.flatten().tolist()
    inside = f"normalise (mean {mean}, std {std})"
    if task == "classification":
        return {"input": f"RGB images [N, 3, {size}, {size}] float32 in [0, 1]: short side resized to "
                         f"round({size} / 0.875) (OpenCV bilinear), then a centre crop of {size} x {size}",
                "inside": inside, "size": size}
    before = (f"longest side resized to {size} (OpenCV), padded at the bottom/right to {size} x {size}"
              if size else "any size")
    return {"input": f"RGB images [N, 3, H, W] float32 in [0, 1]: {before}",
            "inside": f"{inside}, padding to the model's stride, scores upsampled to H x W; mask = argmax",
            "size": size}


def build_spec(loaded: LoadedModel) -> GraphSpec:
    """The export spec of a loaded checkpoint (model prepared for inference: batch norms folded)."""
    task = loaded.task.output
    if getattr(loaded.task, "name", None) == "rcnn" or type(loaded.model).__name__ == "RCNN":
        raise ExportError(
            f"{loaded.path}: R-CNN is not exported: it warps every selective-search region and runs the CNN "
            "once per region, with SVM scoring; use a Fast R-CNN (proposals as an input) or Faster R-CNN")
    model = prepare_for_inference(loaded.model).to(memory_format=torch.contiguous_format)
    metadata: dict[str, Any] = {
        "version": METADATA_VERSION, "task": task, "checkpoint": loaded.path.name,
        "classes": loaded.classes, "preprocess": _preprocess_text(loaded),
    }
    if task == "detection":
        from detection.export import detector_spec

        heads = model.roi_heads
        metadata.update(score_thresh=heads.score_thresh, nms_thresh=heads.nms_thresh,
                        detections_per_img=heads.detections_per_img, label_offset=1)
        spec = detector_spec(model, metadata)
        if spec.module.external:
            metadata["proposals"] = ("input 'proposals' [P, 4] xyxy in the image's pixels (selective search "
                                     "is OpenCV code outside the graph)")
        return spec
    if task == "classification":
        return classifier_spec(model, int(loaded.preprocess.get("size", 224)), metadata)
    if task == "segmentation":
        size = loaded.preprocess.get("size")
        return segmenter_spec(model, int(size) if size else None, metadata)
    raise ExportError(f"{loaded.path}: no export for task {task!r}")


def export_checkpoint(weights: str | os.PathLike, fmt: str, out: str | os.PathLike) -> ExportReport:
    """Export the checkpoint ``weights`` to ``out`` as ``fmt`` (onnx or torchscript), checked."""
    return export_graph(build_spec(load_model(weights, "cpu")), out, fmt)


def cache_dir() -> Path:
    return Path(os.environ.get("VISIONDET_CACHE") or Path.home() / ".cache" / "visiondet") / "export"


def cached_export(weights: str | os.PathLike, fmt: str = "onnx") -> Path:
    """The exported file of ``weights``, written (and checked) on first use. The cache key is the
    checkpoint's absolute path, size and modification time, so a retrained file is exported again."""
    path = Path(weights).resolve()
    if not path.is_file():
        loaded = load_model(weights, "cpu")  # bare names of torchvision files, or the error message
        path = loaded.path.resolve()
    stat = path.stat()
    key = hashlib.sha1(f"{path}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    out = cache_dir() / f"{path.stem}-{key}{SUFFIXES[fmt]}"
    if not out.is_file():
        export_checkpoint(path, fmt, out)
    return out


class ExportedModel:
    """An exported file as the Predictor's model: ``model(inputs) -> (outputs, {})`` with the outputs the
    PyTorch model gives (one ``Detections`` per image for detectors; logits for classification and
    segmentation). Runs on the CPU. Fast R-CNN files take proposals: ``proposal_source(image)`` makes them
    (the checkpoint's selective search) when the caller gives none."""

    def __init__(self, path: str | os.PathLike, proposal_source: Any = None, threads: int | None = None,
                 pytorch_model: Any = None):
        self.runner = Runner(path, threads=threads)
        self.pytorch_model = pytorch_model  # for what needs the model's inner stages (the demo's explain tab)
        self.metadata = self.runner.metadata
        self.task = self.metadata.get("task")
        self.external = "proposals" in self.metadata
        self.proposal_source = proposal_source
        if self.external and proposal_source is None:
            raise ExportError(f"{path}: this Fast R-CNN file takes proposals; no proposal source was given")

    def eval(self) -> ExportedModel:
        return self

    def to(self, *args: Any, **kwargs: Any) -> ExportedModel:
        return self

    def __call__(self, inputs: list[Tensor] | Tensor) -> tuple[Any, dict[str, Tensor]]:
        if self.task == "detection":
            out = []
            for image in inputs:
                image = image.float().cpu()
                args = (image, self.proposal_source(image).float()) if self.external else (image,)
                if self.external and len(args[1]) == 0:
                    out.append(Detections.empty())
                    continue
                boxes, labels, scores = self.runner(*args)
                out.append(Detections(boxes, scores, labels.long()))
            return out, {}
        images = inputs if isinstance(inputs, Tensor) else torch.stack(list(inputs))
        return self.runner(images.float().cpu())[0], {}


def exported_backend(loaded: LoadedModel, score_threshold: float | None = None) -> LoadedModel:
    """``loaded`` with its model replaced by the ONNX Runtime run of its exported file (exported, checked
    and cached on first use). The file's thresholds are fixed: a detection ``score_threshold`` below the
    one exported is refused rather than silently not honoured."""
    model = loaded.model
    cut = getattr(getattr(model, "roi_heads", None), "score_thresh", None)  # what the export keeps
    if score_threshold is not None and cut is not None and score_threshold < cut:
        raise ValueError(f"the onnxruntime backend keeps detections scoring {cut} or more (the threshold it "
                         f"is exported with); --score-threshold {score_threshold} needs --backend pytorch")
    source = getattr(getattr(model, "proposal_generator", None), "source", None)
    runner = ExportedModel(cached_export(loaded.path, "onnx"), proposal_source=source, pytorch_model=model)
    return dataclasses.replace(loaded, model=runner)
