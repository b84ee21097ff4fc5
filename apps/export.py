"""Checkpoints to exported files, and exported files as models the Predictor can call.

``export_checkpoint`` builds the export graph of any task from a checkpoint (the task's inference says how;
each graph lives beside its model), writes and checks the file, and stores classes and preprocessing in it.
``cached_export`` does that once per checkpoint into the cache's ``export/`` folder (vision/cache.py), for
``predict``/``demo --backend onnxruntime``. With ``int8`` (a folder of calibration images) a Faster R-CNN
file is then quantised to int8 by ``vision.quantize`` (``export --int8 DIR``, ``predict``/``demo --int8``).
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
from vision.cache import cache_dir
from vision.data.images import IMAGE_EXTENSIONS, ImageError, read_image
from vision.export import SUFFIXES, ExportError, ExportReport, GraphSpec, Runner, export_graph
from vision.layers import prepare_for_inference
from vision.quantize import detection_agreement, quantize_onnx

BACKENDS = ("pytorch", "onnxruntime")
METADATA_VERSION = 1


def build_spec(loaded: LoadedModel) -> GraphSpec:
    """The export spec of a loaded checkpoint (model prepared for inference: batch norms folded); what the
    graph is and what its caller must do first are the task's (``Inference.export_spec``)."""
    inference = loaded.task.inference
    model = prepare_for_inference(loaded.model).to(memory_format=torch.contiguous_format)
    metadata: dict[str, Any] = {
        "version": METADATA_VERSION, "task": inference.task, "checkpoint": loaded.path.name,
        "classes": loaded.classes,
    }
    return inference.export_spec(loaded, model, metadata)


CALIBRATION_IMAGES = 32  # images the int8 activation ranges are measured on (spread over the folder)
AGREEMENT_IMAGES = 8  # of those, images the int8 file's detections are compared with PyTorch's on


def export_checkpoint(weights: str | os.PathLike, fmt: str, out: str | os.PathLike, *,
                      int8: str | os.PathLike | None = None,
                      calibration_images: int = CALIBRATION_IMAGES) -> ExportReport:
    """Export the checkpoint ``weights`` to ``out`` as ``fmt`` (onnx or torchscript), checked. With ``int8``
    (a folder of images like the training data) the float file is then quantised to int8 (a Faster R-CNN
    checkpoint, ONNX only): its check lines say how many of PyTorch's detections it keeps."""
    spec = build_spec(load_model(weights, "cpu"))
    if int8 is None:
        return export_graph(spec, out, fmt)
    if fmt != "onnx":
        raise ExportError(f"--int8 writes ONNX files (ONNX Runtime runs them); not {fmt}")
    if spec.input_names != ["image"] or spec.output_names != ["boxes", "labels", "scores"]:
        raise ExportError(f"{weights}: --int8 is for Faster R-CNN checkpoints (one image in, boxes out); "
                          f"this {spec.metadata.get('task')} file takes {', '.join(spec.input_names)}")
    images = calibration_set(int8, calibration_images)
    out = Path(out)
    fp32 = out.with_name(f".{out.stem}-fp32.{os.getpid()}.onnx")
    try:
        report = export_graph(spec, fp32, "onnx")
        quantized = quantize_onnx(fp32, out, [(image,) for image in images], note={"calibration": str(int8)})
    finally:
        fp32.unlink(missing_ok=True)
    runner, found, total = Runner(out), 0, 0
    for image in images[:AGREEMENT_IMAGES]:
        with torch.no_grad():
            expected = spec.module(image)
        f, t = detection_agreement(runner(image), expected)
        found, total = found + f, total + t
    checks = [*report.checks,
              f"int8: {quantized.nodes} Conv/Gemm/MatMul weights quantised, activation ranges from "
              f"{len(images)} images of {int8}; on {min(len(images), AGREEMENT_IMAGES)} of them it finds "
              f"{found} of PyTorch's {total} detections scoring >= 0.5 (same label, IoU >= 0.5)"]
    return ExportReport(out, "onnx", report.seconds + quantized.seconds, checks)


def calibration_set(folder: str | os.PathLike, limit: int) -> list[Tensor]:
    """Up to ``limit`` images of ``folder`` (recursive, spread evenly over its sorted files) as float
    [3, H, W] tensors in [0, 1]; ExportError when there is no such folder or no readable image in it."""
    root = Path(folder)
    if not root.is_dir():
        raise ExportError(f"{root}: no such folder of calibration images")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not files:
        raise ExportError(f"{root}: no images to calibrate on (looked for {', '.join(IMAGE_EXTENSIONS)})")
    step = max(1, len(files) // max(limit, 1))
    images = []
    for path in files[::step][:limit]:
        try:
            array = read_image(path)
        except ImageError as exc:
            raise ExportError(f"calibration image {exc}") from None
        images.append(torch.from_numpy(array).permute(2, 0, 1).float().div(255).contiguous())
    return images


@dataclass
class ExportOptions:
    """Everything one `visiondet export` needs (the command line, as a value)."""

    weights: str
    fmt: str  # "onnx" or "torchscript"
    out: Path
    int8: Path | None = None  # calibration images: quantise the ONNX file to int8
    calibration_images: int = CALIBRATION_IMAGES


def run_export(opts: ExportOptions) -> int:
    """Export, check and report; returns the exit code. Raises CheckpointError or ExportError."""
    report = export_checkpoint(opts.weights, opts.fmt, opts.out, int8=opts.int8,
                               calibration_images=opts.calibration_images)
    print(f"wrote {report.path} ({report.format}, {report.path.stat().st_size / 1e6:.1f} MB, "
          f"traced in {report.seconds:.1f} s)")
    for line in report.checks:
        print(f"  checked against PyTorch: {line}")
    return 0


def cached_export(weights: str | os.PathLike, fmt: str = "onnx",
                  int8: str | os.PathLike | None = None) -> Path:
    """The exported file of ``weights``, written (and checked) on first use (see ``cache_path``)."""
    out = cache_path(weights, fmt, int8)
    if not out.is_file():
        export_checkpoint(_checkpoint_file(weights), fmt, out, int8=int8)
    return out


def _checkpoint_file(weights: str | os.PathLike) -> Path:
    path = Path(weights).resolve()
    if not path.is_file():
        loaded = load_model(weights, "cpu")  # bare names of torchvision files, or the error message
        path = loaded.path.resolve()
    return path


def cache_path(weights: str | os.PathLike, fmt: str = "onnx", int8: str | os.PathLike | None = None) -> Path:
    """Where ``cached_export`` keeps the file of ``weights``. The key is the checkpoint's absolute path, size
    and modification time, so a retrained file is exported again; with ``int8`` (calibration images) also the
    folder's path and its files' names, sizes and times."""
    path = _checkpoint_file(weights)
    stat = path.stat()
    text = f"{path}|{stat.st_size}|{stat.st_mtime_ns}"
    if int8 is not None:
        folder = Path(int8).resolve()
        files = sorted(folder.rglob("*")) if folder.is_dir() else []
        text += f"|int8|{folder}|" + "|".join(f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}"
                                             for p in files if p.is_file())
    key = hashlib.sha1(text.encode()).hexdigest()[:12]
    return cache_dir("export") / f"{path.stem}-{key}{'-int8' if int8 is not None else ''}{SUFFIXES[fmt]}"


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


def exported_score_cut(loaded: LoadedModel) -> float | None:
    """The score cut ``loaded``'s exported file keeps fixed (a detector's configured one); None otherwise."""
    cuts = getattr(loaded.model, "thresholds", None)  # a detector's configured cuts: what the export keeps
    return getattr(cuts, "score_thresh", None)


def exported_backend(loaded: LoadedModel, score_thresh: float | None = None,
                     int8: str | os.PathLike | None = None) -> LoadedModel:
    """``loaded`` with its model replaced by the ONNX Runtime run of its exported file (exported, checked
    and cached on first use; with ``int8``, the file quantised to int8 on those calibration images). The
    file's thresholds are fixed: a detection ``score_thresh`` below the one exported is refused rather
    than silently not honoured."""
    model = loaded.model
    cut = exported_score_cut(loaded)
    if score_thresh is not None and cut is not None and score_thresh < cut:
        raise ValueError(f"the onnxruntime backend keeps detections scoring {cut} or more (the threshold it "
                         f"is exported with); --score-threshold {score_thresh} needs --backend pytorch")
    source = getattr(getattr(model, "proposal_generator", None), "source", None)
    runner = ExportedModel(cached_export(loaded.path, "onnx", int8=int8), proposal_source=source,
                           pytorch_model=model,
                           per_image=loaded.task.inference.one_image_per_forward)
    return dataclasses.replace(loaded, model=runner)
