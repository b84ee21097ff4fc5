"""Checkpoints to exported files, and exported files as models the Predictor can call.

``export_checkpoint`` builds the export graph of any task from a checkpoint (the task's inference says how:
vision.export for classification and segmentation, detection.export for Fast/Faster R-CNN), writes and
checks the file, and stores classes and preprocessing in it. ``cached_export`` does that once per
checkpoint into a cache folder (``$VISIONDET_CACHE`` or ``~/.cache/visiondet``), for
``predict``/``demo --backend onnxruntime``.
``ExportedModel`` wraps the exported file behind the model interface the Predictor already uses
(``model(inputs) -> (outputs, {})``), which is the whole backend seam.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from apps.tasks import LoadedModel, load_model
from detection.structures import Detections
from vision.export import SUFFIXES, ExportError, ExportReport, GraphSpec, Runner, export_graph
from vision.layers import prepare_for_inference

BACKENDS = ("pytorch", "onnxruntime")
METADATA_VERSION = 1


def build_spec(loaded: LoadedModel) -> GraphSpec:
    """The export spec of a loaded checkpoint (model prepared for inference: batch norms folded); what the
    graph is and what its caller must do first are the task's (``Inference.export_spec``)."""
    inference = loaded.task.inference
    model = prepare_for_inference(loaded.model).to(memory_format=torch.contiguous_format)
    metadata: dict[str, Any] = {
        "version": METADATA_VERSION, "task": inference.kind, "checkpoint": loaded.path.name,
        "classes": loaded.classes,
    }
    return inference.export_spec(loaded, model, metadata)


def export_checkpoint(weights: str | os.PathLike, fmt: str, out: str | os.PathLike) -> ExportReport:
    """Export the checkpoint ``weights`` to ``out`` as ``fmt`` (onnx or torchscript), checked."""
    return export_graph(build_spec(load_model(weights, "cpu")), out, fmt)


@dataclass
class ExportOptions:
    """Everything one `visiondet export` needs (the command line, as a value)."""

    weights: str
    fmt: str  # "onnx" or "torchscript"
    out: Path


def run_export(opts: ExportOptions) -> int:
    """Export, check and report; returns the exit code. Raises CheckpointError or ExportError."""
    report = export_checkpoint(opts.weights, opts.fmt, opts.out)
    print(f"wrote {report.path} ({report.format}, {report.path.stat().st_size / 1e6:.1f} MB, "
          f"traced in {report.seconds:.1f} s)")
    for line in report.checks:
        print(f"  checked against PyTorch: {line}")
    return 0


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
                 pytorch_model: Any = None, per_image: bool | None = None):
        self.runner = Runner(path, threads=threads)
        self.pytorch_model = pytorch_model  # for what needs the model's inner stages (the demo's explain tab)
        self.metadata = self.runner.metadata
        self.task = self.metadata.get("task")
        # detector graphs take one image and answer with its boxes; None: as the file's metadata says
        self.per_image = "detections_per_img" in self.metadata if per_image is None else per_image
        self.external = "proposals" in self.metadata
        self.proposal_source = proposal_source
        if self.external and proposal_source is None:
            raise ExportError(f"{path}: this Fast R-CNN file takes proposals; no proposal source was given")

    def eval(self) -> ExportedModel:
        return self

    def to(self, *args: Any, **kwargs: Any) -> ExportedModel:
        return self

    def __call__(self, inputs: list[Tensor] | Tensor) -> tuple[Any, dict[str, Tensor]]:
        if self.per_image:
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
    cuts = getattr(model, "thresholds", None)  # a detector's configured cuts: what the export keeps
    cut = getattr(cuts, "score_thresh", None)
    if score_threshold is not None and cut is not None and score_threshold < cut:
        raise ValueError(f"the onnxruntime backend keeps detections scoring {cut} or more (the threshold it "
                         f"is exported with); --score-threshold {score_threshold} needs --backend pytorch")
    source = getattr(getattr(model, "proposal_generator", None), "source", None)
    runner = ExportedModel(cached_export(loaded.path, "onnx"), proposal_source=source, pytorch_model=model,
                           per_image=loaded.task.inference.one_image_per_forward)
    return dataclasses.replace(loaded, model=runner)
