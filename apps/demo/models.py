"""The demo's side that knows nothing of Gradio: which checkpoints there are, loading each once, decoding an
upload into a clear error or an image, and turning results into the table and JSON the page shows.

Every message meant for the page names the uploaded file by its own name and never a server path.
"""

from __future__ import annotations

import dataclasses
import sys
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from apps.export import exported_backend
from apps.migrations import upgrade_checkpoint
from apps.tasks import LoadedModel, get_task, load_model
from apps.tasks.inference.base import (
    DEFAULT_SCORE_THRESH,
    Inference,
    ModelDescription,
    checkpoint_score_threshold,
)
from detection.torchvision_weights import (
    COCO_CLASSES,
    COCO_TRAINED_ON,
    TORCHVISION_COCO_FILES,
    find_torchvision_coco,
    torchvision_coco_title,
)
from vision.checkpoint import CheckpointError, is_visiondet_checkpoint, load_checkpoint
from vision.data.images import ImageError, read_image
from vision.export import ExportError
from vision.layers import prepare_for_inference

__all__ = ["DEFAULT_MAX_PIXELS", "DEFAULT_MAX_SIDE", "Checkpoint", "DemoInputError", "ModelCache",
           "find_checkpoints", "fit_size", "read_upload"]

# An upload above this is refused before it is decoded (the decoded RGB would be 120 MB at this size).
DEFAULT_MAX_PIXELS = 40_000_000
# Inference runs on a copy whose longer side is at most this (boxes are mapped back to the original pixels):
# every model here resizes its input to far less anyway, and a 12-megapixel photo as float32 is 150 MB.
DEFAULT_MAX_SIDE = 1600
TABLE_HEADERS = ["class", "score", "x", "y", "w", "h"]


class DemoInputError(ValueError):
    """An input the page cannot use; the message is shown as it is."""


# ---- checkpoints -------------------------------------------------------------------------------------------


@dataclass
class Checkpoint:
    """A checkpoint the page offers: ``label`` in the model pickers; its task's ``inference`` decides which
    tabs (a tab offers the checkpoints whose inference is its own: R-CNN's is detection's)."""

    label: str
    path: Path
    task: str
    inference: type[Inference]
    description: ModelDescription  # architecture, and a detector's NMS IoU, generation and anchors
    classes: list[dict[str, Any]]
    metrics: dict[str, float] = field(default_factory=dict)
    trained_on: str = "data its checkpoint does not name"
    synthetic: bool = False  # visiondet's generated shapes: meaningless on a real photograph
    chosen: bool = False  # passed with --weights: listed first, so its tabs open on it
    # classes learned from one photograph each (``single_photo_classes``, written by weights/slim.py): the
    # model knows that one thing, not its category in general, and the page says so
    single_photo: list[str] = field(default_factory=list)
    none_class: str | None = None  # a classifier's class of "none of these" images (``preprocess``)
    # a detector's score threshold: calibrated on its validation split after training (``preprocess``)
    score_thresh: float = DEFAULT_SCORE_THRESH

    @property
    def arch(self) -> str:
        return self.description.arch

    @property
    def nms_thresh(self) -> float | None:
        """Detectors: the per-class NMS IoU the model was trained with."""
        return self.description.nms_thresh

    @property
    def has_anchors(self) -> bool:
        """Faster R-CNN's proposals come from anchors; R-CNN's and Fast R-CNN's from selective search."""
        return self.description.has_anchors

    def is_a(self, inference_type: type[Inference]) -> bool:
        """Whether this checkpoint's results are of ``inference_type`` (a tab's inference class)."""
        return issubclass(self.inference, inference_type)

    def expectations(self) -> str:
        """One line for every tab: what the model was trained on and the classes it can answer with (a
        classifier's "none of these" class apart), and which of them it learned from a single photograph."""
        known = [c["name"] for c in self.classes if c["name"] != self.none_class]
        names = ", ".join(known[:12]) + (" ..." if len(known) > 12 else "")
        line = f"Trained on {self.trained_on}; it knows {len(known)} classes: {names}."
        if self.none_class in {c["name"] for c in self.classes}:
            line += f' Anything else is "none of these" (its class {self.none_class}).'
        if len(self.single_photo) == 1:
            line += (f" {self.single_photo[0]} was learned from a single photograph: that very thing, not "
                     "its category.")
        elif self.single_photo:
            line += (f" {_and(self.single_photo)} were each learned from a single photograph: those very "
                     "things, not their categories.")
        if self.synthetic:
            line += " It has never seen a real photograph: on one, its answers mean nothing."
        return line

    def result_note(self) -> str:
        """What to say next to a result of this model ("" when nothing needs saying)."""
        if not self.synthetic:
            return ""
        return (" *Synthetic-shapes model: it only knows drawn circles, squares and triangles; "
                "on a photograph its answers are guesses.*")

    def summary(self) -> str:
        """One line for the page: architecture and the validation metric saved with it. The classes are
        named once, by :meth:`expectations`, so the picker's lines stay short on a phone's first screen."""
        shown = [k for k in ("AP50", "AP", "top1", "mIoU") if k in self.metrics]
        metric = "; " + ", ".join(f"val {k} {self.metrics[k]:.3f}" for k in shown) if shown else ""
        return f"{self.arch}{metric}"


def _and(names: Sequence[str]) -> str:
    """ "a", "a and b", "a, b and c"."""
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"


SHAPE_NAMES = {"circle", "square", "triangle"}  # what `visiondet synth` draws


def _trained_on(ckpt: dict[str, Any]) -> tuple[str, bool]:
    """(the training data in a few words, whether it is visiondet's synthetic shapes).

    New checkpoints may say it themselves (``trained_on``); otherwise the training set's folder is named (the
    last two parts only: the page never shows a server path), and a model whose classes are nothing but
    `visiondet synth`'s shape names is taken for a synthetic-shapes model, as the shipped defaults are (their
    data folders are build-script paths that say nothing).
    """
    if ckpt.get("trained_on"):
        text = str(ckpt["trained_on"])
        return text, "synthetic" in text.lower()
    train = (((ckpt.get("config") or {}).get("data") or {}).get("train") or {})
    source = train.get("annotations") or train.get("root") or train.get("images")
    names = {str(c.get("name")) for c in ckpt.get("classes") or []}
    if len(names) >= 2 and names <= SHAPE_NAMES:
        return "visiondet's synthetic shapes (`visiondet synth`)", True
    if not source:
        return "data its checkpoint does not name", False
    folder = Path(str(source))
    folder = folder.parent if folder.suffix else folder
    return f"the dataset in {'/'.join(folder.parts[-2:])}", False


def _pt_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("*.pt") if p.is_file()) if folder.is_dir() else []


def _label(path: Path, ckpt: dict[str, Any], taken: set[str]) -> str:
    """A checkpoint the user passed, by a name that says which: its run folder's and the file's, and the
    data it was trained on when the checkpoint names it ("exp1/best.pt · shapes_det (train)"), not a bare
    best.pt beside the shipped models."""
    label = f"{path.parent.name}/{path.name}" if path.parent.name not in ("", ".") else path.name
    if ckpt.get("trained_on"):
        label += f" · {ckpt['trained_on']}"
    return label if label not in taken else str(path)


def find_checkpoints(folders: Iterable[str | Path], files: Iterable[str | Path] = ()
                     ) -> tuple[list[Checkpoint], list[str]]:
    """The checkpoints the user passed (``files``: checkpoints, or folders of ``*.pt``), then those ``*.pt``
    in ``folders`` (not recursive), then torchvision's COCO Faster R-CNN files found in ``folders`` or
    torch's hub cache. A picker opens on its first entry (:func:`_picker_order`): the user's own come first,
    in the order given, named by their run folder (:func:`_label`); then models of real data before the
    synthetic-shapes ones; then detectors newest R-CNN generation first (Faster, Fast, then R-CNN), the one
    a first-time user should see.

    Returns (usable checkpoints, one problem line per file that is not one). A file is read in full once
    here (for its task, classes and metrics) and again when first used; the weights are not kept.
    """
    folders = [Path(f) for f in folders]
    chosen: list[Path] = []
    for item in map(Path, files):
        chosen += _pt_files(item) if item.is_dir() else [item]
    paths = list(chosen)
    for folder in folders:
        paths += _pt_files(folder)
    paths += find_torchvision_coco(folders)
    chosen_keys = {p.resolve() for p in chosen}
    found: list[Checkpoint] = []
    problems: list[str] = []
    seen: set[Path] = set()
    for path in paths:
        key = path.resolve()
        if key in seen:
            continue
        seen.add(key)
        title = torchvision_coco_title(path)
        if title is not None:  # converted on first use (apps.tasks.load_model): listing it reads nothing
            task = get_task("detection")
            arch = TORCHVISION_COCO_FILES[path.name][0]
            found.append(Checkpoint(title, path, task.name, task.inference,
                                    task.inference.describe({"arch": arch}), list(COCO_CLASSES),
                                    trained_on=COCO_TRAINED_ON, chosen=key in chosen_keys))
            continue
        try:
            ckpt = load_checkpoint(path, map_location="cpu")
        except CheckpointError as exc:
            problems.append(str(exc))
            continue
        if not is_visiondet_checkpoint(ckpt) or "task" not in ckpt or "classes" not in ckpt:
            problems.append(f"{path}: not a visiondet checkpoint (no task, classes and model config)")
            continue
        ckpt = upgrade_checkpoint(ckpt)  # files of the former "rcnn" task list as the detectors they are
        try:
            task = get_task(str(ckpt["task"]))
        except KeyError as exc:
            problems.append(f"{path}: {exc.args[0]}")
            continue
        taken = {c.label for c in found}
        mine = key in chosen_keys
        label = _label(path, ckpt, taken) if mine else path.name if path.name not in taken else str(path)
        trained_on, synthetic = _trained_on(ckpt)
        preprocess = ckpt.get("preprocess") or {}
        found.append(Checkpoint(label, path, task.name, task.inference,
                                task.inference.describe(ckpt.get("model") or {}), list(ckpt["classes"]),
                                dict(ckpt.get("metrics") or {}), trained_on, synthetic, chosen=mine,
                                single_photo=[str(n) for n in ckpt.get("single_photo_classes") or []],
                                none_class=preprocess.get("none_class"),
                                # to the score slider's step (0.01): 0.89, not 0.8932247
                                score_thresh=round(checkpoint_score_threshold(preprocess), 2)))
    found.sort(key=_picker_order)
    return found, problems


def _picker_order(entry: Checkpoint) -> tuple[bool, bool, int]:
    """Where a checkpoint stands in its tab's picker, whose first entry the tab opens on: the user's own
    first, as given; then models that know photographs before the synthetic-shapes demonstrations (a
    shipped real-photo model is what a visitor's picture needs; the shapes models stay offered after it);
    then detectors newest generation first (0 for every non-detector). Stable: discovery order otherwise.
    What decides is what each checkpoint says of its data (:func:`_trained_on`), never its file name."""
    if entry.chosen:
        return (False, False, 0)
    return (True, entry.synthetic, entry.description.generation)


class ModelCache:
    """Loads each checkpoint on first use and keeps it (one copy per checkpoint, whatever the requests).

    Requests share a model freely: thresholds are arguments of each call (detection.structures.Thresholds),
    never written into the model, so no per-model lock is needed. ``loads[label]`` counts how often a
    checkpoint was read from disk (once).
    """

    def __init__(self, checkpoints: Sequence[Checkpoint], device: str | torch.device = "cpu",
                 backend: str = "pytorch"):
        self.checkpoints = {c.label: c for c in checkpoints}
        self.device = torch.device(device)
        self.backend = backend  # "onnxruntime": models run from their exported files (apps.export)
        self.int8: str | None = None  # calibration images: Faster R-CNN files quantised to int8
        self.loads: dict[str, int] = {}
        self._models: dict[str, LoadedModel] = {}
        self._loading = threading.Lock()

    def labels(self, inference_type: type[Inference]) -> list[str]:
        """Labels of the checkpoints whose results are of ``inference_type``, in discovery order."""
        return [label for label, c in self.checkpoints.items() if c.is_a(inference_type)]

    def checkpoint(self, label: str | None) -> Checkpoint:
        if not label or label not in self.checkpoints:
            known = ", ".join(self.checkpoints) or "none"
            raise DemoInputError(f"Unknown model {label!r}; choose one of: {known}.")
        return self.checkpoints[label]

    def get(self, label: str) -> LoadedModel:
        """The model of ``label``, loaded on first use (errors are DemoInputError naming the file)."""
        entry = self.checkpoint(label)
        with self._loading:
            if label not in self._models:
                try:
                    loaded = load_model(entry.path, self.device)
                except (CheckpointError, KeyError, ValueError) as exc:
                    print(f"visiondet demo: {exc}", file=sys.stderr)
                    reason = _without_paths(exc, entry.path)
                    raise DemoInputError(f"Model {label} could not be loaded: {reason}") from None
                self._models[label] = dataclasses.replace(loaded, model=prepare_for_inference(loaded.model))
                if self.backend == "onnxruntime":
                    self._models[label] = self._exported(label, self._models[label])
                self.loads[label] = self.loads.get(label, 0) + 1
        return self._models[label]

    def _exported(self, label: str, loaded: LoadedModel) -> LoadedModel:
        """``loaded`` run by ONNX Runtime from its exported file (exported, checked and cached on first
        use; with ``int8``, Faster R-CNN files quantised to int8, the others float); a model that cannot be
        exported (R-CNN) stays on PyTorch, and the console says so."""
        try:
            if self.int8 is not None:
                try:
                    return exported_backend(loaded, int8=self.int8)
                except ExportError as exc:  # not a Faster R-CNN: its float file
                    print(f"visiondet demo: {label} runs in float32: {exc}", file=sys.stderr)
            return exported_backend(loaded)
        except ExportError as exc:
            print(f"visiondet demo: {label} runs on PyTorch: {exc}", file=sys.stderr)
            return loaded


def _without_paths(exc: Exception, path: Path) -> str:
    text = str(exc)
    for p in (str(path.resolve()), str(path)):
        text = text.replace(p, path.name)
    return text


# ---- uploads -----------------------------------------------------------------------------------------------


def read_upload(path: str | Path | None, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """An uploaded file -> (H, W, 3) uint8 RGB, or DemoInputError "<file name>: <reason>".

    Gradio keeps uploads as ``<cache>/<hash>/<original name>``, so the file's own name is what the user
    uploaded; the folder is ours and never appears in a message.
    """
    if path is None or str(path) == "":
        raise DemoInputError("No image: upload one (or paste, or pick an example) first.")
    path = Path(path)
    try:
        stat = path.stat()
    except OSError:
        raise DemoInputError(f"{path.name}: the upload is gone from the server; upload it again.") from None
    try:
        return _decode(str(path), stat.st_mtime_ns, stat.st_size, max_pixels).copy()
    except ImageError as exc:
        reason = exc.reason.replace(str(path.parent), "").replace(str(path), path.name)
        raise DemoInputError(f"{path.name}: {reason}") from None
    except Exception as exc:  # a decoder failure on one odd file must not reach the page as a traceback
        raise DemoInputError(f"{path.name}: cannot be decoded as an image ({type(exc).__name__})") from None


@lru_cache(maxsize=2)
def _decode(path: str, mtime_ns: int, size: int, max_pixels: int) -> np.ndarray:
    # The page checks an upload before queueing it and decodes it again to run the model: the cache (keyed
    # on the file's identity) makes that one decode. Two entries: one request in flight, one being checked.
    image = read_image(path, exif=True, max_pixels=max_pixels)
    image.setflags(write=False)  # callers get copies: the cached one stays as decoded
    return image


def fit_size(image: np.ndarray, max_side: int) -> tuple[np.ndarray, float]:
    """(image, 1.0) if its longer side is at most ``max_side``, else (an area-downscaled copy, its scale)."""
    height, width = image.shape[:2]
    if max(height, width) <= max_side:
        return image, 1.0
    scale = max_side / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA), scale
