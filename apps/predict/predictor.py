"""Prediction with any visiondet checkpoint: one typed result per image, for arrays or streamed from files.

    predictor = Predictor("weights/detector.pt", device="auto")  # score_thresh: the checkpoint's
    results = predictor.predict([image])                 # (H, W, 3) uint8 RGB arrays -> list[Result]
    for item in predictor.predict_source(["photos/"], batch_size=8, workers=2):
        item.file.name, item.result or item.error         # files decoded by DataLoader worker processes

A result is the checkpoint's task's result type (apps/tasks/inference/): a :class:`DetectionResult` (boxes
xyxy in original pixels, scores, labels, category ids and names), a :class:`ClassificationResult` (top-k) or
a :class:`SegmentationResult` (an index mask at the original size); each one can ``draw(image)`` itself and
turn into a predictions.jsonl ``record()``. The checkpoint alone defines model, preprocessing and classes;
the task's ``inference`` does everything that differs by task, so nothing here asks which task it is.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator, Sequence
from functools import partial
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from apps.engine.distributed import resolve_device
from apps.engine.loader import parent_bound_init
from apps.export import exported_backend, exported_score_cut
from apps.predict.results import Prediction
from apps.predict.sources import ImageFile, find_images
from apps.tasks import load_model
from apps.tasks.inference.base import Inference, Result, Transform, checkpoint_score_threshold
from apps.tasks.inference.classification import ClassificationResult
from apps.tasks.inference.detection import DetectionResult
from apps.tasks.inference.segmentation import SegmentationResult
from vision.data.images import DEFAULT_MAX_PIXELS, ImageError, read_image
from vision.layers import prepare_for_inference

__all__ = ["ClassificationResult", "DetectionResult", "Prediction", "Predictor", "Result",
           "SegmentationResult"]


class _ImageFiles(Dataset):
    """Decodes and preprocesses one file per item, inside DataLoader workers; failures come back as values
    so that one bad file never stops the stream."""

    def __init__(self, files: Sequence[ImageFile], transform: Transform, *, max_pixels: int,
                 keep_images: bool):
        # A numpy string array, not a list of str: forked workers touching Python objects would copy
        # their pages (refcounts), and memory would grow with the number of files.
        self.paths = np.array([f.path for f in files], dtype=str)
        self.transform = transform
        self.max_pixels = max_pixels
        self.keep_images = keep_images

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict[str, Any]:
        path = str(self.paths[index])
        item: dict[str, Any] = {"index": index, "input": None, "valid": None, "size": None, "image": None,
                                "error": None}
        try:
            image = read_image(path, exif=True, max_pixels=self.max_pixels)
            item["input"], item["valid"] = self.transform(image)
        except ImageError as exc:
            item["error"] = exc.reason
            return item
        except Exception as exc:  # a decoder bug on one odd file must not end a run over thousands
            item["error"] = f"unreadable ({type(exc).__name__}: {exc})"
            return item
        item["size"] = image.shape[:2]
        if self.keep_images:
            item["image"] = image
        return item


def _collate(items: list[dict[str, Any]], stack: bool = True) -> dict[str, Any]:
    """A batch keeps its items apart (each may have failed); inputs of one shape are stacked here, in the
    worker, so the main process receives one tensor (not for detectors, which take a list)."""
    inputs = [it["input"] for it in items if it["input"] is not None]
    same = stack and len(inputs) > 1 and all(t.shape == inputs[0].shape for t in inputs)
    return {"items": items, "stacked": torch.stack(inputs) if same else None}


class Predictor:
    """Runs a checkpoint's model on images and returns one typed result per image.

    Args:
        weights: a checkpoint path, or a model already loaded by ``apps.tasks.load_model``.
        device: ``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda``, ``cuda:1``.
        score_thresh: detection: keep boxes scoring at least this; None: the checkpoint's calibrated
            threshold (``preprocess["score_threshold"]``), else 0.5. ``self.score_thresh`` is the one used.
        nms_thresh: detection: IoU threshold of the per-class NMS; None keeps the model's own.
        classes: keep only these classes (names or dataset category ids); None keeps all. Detection drops
            other boxes, classification ranks only these, segmentation chooses among them and background.
        top_k: classification: how many classes each result lists (at most the number of classes).
        max_pixels: refuse larger image files (decompression bombs).
        backend: ``pytorch``, or ``onnxruntime``: the checkpoint's ONNX export (made, checked against
            PyTorch and cached on first use, see apps.export) run by ONNX Runtime on the CPU.
    """

    def __init__(
        self,
        weights: str | os.PathLike | Any,
        device: str | torch.device = "auto",
        *,
        score_thresh: float | None = None,
        nms_thresh: float | None = None,
        classes: Sequence[str | int] | None = None,
        top_k: int = 5,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        backend: str = "pytorch",
        int8: str | os.PathLike | None = None,
    ):
        self.device = resolve_device(str(device))
        if isinstance(weights, str | os.PathLike):
            loaded = load_model(weights, self.device)
            # Batch norms folded, channels-last: same outputs within float rounding, faster on every device
            self.loaded = dataclasses.replace(loaded, model=prepare_for_inference(loaded.model))
        else:  # the caller's model, as it is (the demo prepares the ones it caches)
            self.loaded = weights
            self.loaded.model.to(self.device).eval()
        cut = exported_score_cut(self.loaded)  # a detector's: the exported file drops what scores under it
        if score_thresh is None and backend == "onnxruntime" and cut is not None:
            # a checkpoint's threshold under the cut rises to it (only the caller's is refused there)
            score_thresh = max(checkpoint_score_threshold(self.loaded.preprocess), cut)
        # the task's inference checks the thresholds and the class filter before any export below
        self.inference: Inference = self.loaded.task.inference(
            self.loaded.classes, self.loaded.preprocess, score_thresh=score_thresh,
            nms_thresh=nms_thresh, only=classes, top_k=top_k)
        if int8 is not None and backend != "onnxruntime":
            raise ValueError("int8 runs the quantised ONNX export: use it with the onnxruntime backend")
        if backend == "onnxruntime":  # the seam: an object with the model's call signature, on the CPU
            self.device = torch.device("cpu")
            self.loaded = exported_backend(self.loaded, self.inference.score_thresh, int8=int8)
        elif backend != "pytorch":
            raise ValueError(f"unknown backend {backend!r}; choose pytorch or onnxruntime")
        self.task: str = self.inference.task  # what run.json and summary.json call it
        self.classes: list[dict[str, Any]] = self.loaded.classes
        self.model = self.loaded.model
        self.score_thresh: float = self.inference.score_thresh  # (detection) the one in use
        self.nms_thresh = nms_thresh
        self.max_pixels = max_pixels
        self.transform = self.inference.transform

    @torch.inference_mode()
    def _run(self, inputs: list[torch.Tensor], valid: list[tuple[int, int]], sizes: list[tuple[int, int]],
             stacked: torch.Tensor | None = None) -> list[Result]:
        """inputs: preprocessed uint8 [3, h, w] per image; valid: the (h', w') of each input that is image
        (the rest is padding); sizes: original (H, W) of each; stacked: the inputs as one [N, 3, h, w]."""
        return self.inference.run(self.model, inputs, valid, sizes, stacked, self.device)

    # ---- public entry points -------------------------------------------------------------------------------

    def predict(self, images: Sequence[np.ndarray]) -> list[Result]:
        """One result per (H, W, 3) uint8 RGB image, in order, run as one batch."""
        for i, image in enumerate(images):
            if not isinstance(image, np.ndarray):
                got = type(image).__name__
                raise ValueError(f"image {i}: expected an (H, W, 3) uint8 RGB array, got {got}")
            if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
                got = f"{image.dtype} {image.shape}"
                raise ValueError(f"image {i}: expected an (H, W, 3) uint8 RGB array, got {got}")
        prepared = [self.transform(image) for image in images]
        return self._run([p[0] for p in prepared], [p[1] for p in prepared], [im.shape[:2] for im in images])

    def loader(self, files: Sequence[ImageFile], *, batch_size: int = 8, workers: int = 2,
               keep_images: bool = False) -> DataLoader:
        """Batches of decoded, preprocessed files (see :class:`_ImageFiles`) in file order."""
        dataset = _ImageFiles(files, self.transform, max_pixels=self.max_pixels, keep_images=keep_images)
        return DataLoader(
            dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
            collate_fn=partial(_collate, stack=not self.inference.one_image_per_forward),
            pin_memory=self.device.type == "cuda", persistent_workers=False,
            prefetch_factor=2 if workers > 0 else None,
            worker_init_fn=parent_bound_init() if workers > 0 else None,  # no orphans after a kill -9
        )

    def predict_source(
        self,
        source: str | os.PathLike | Sequence[str | os.PathLike] | Sequence[ImageFile],
        *,
        batch_size: int = 8,
        workers: int = 2,
        keep_images: bool = False,
        exclude: str | os.PathLike | None = None,
    ) -> Iterator[Prediction]:
        """Stream :class:`Prediction` items over image files, in sorted name order.

        ``source``: a folder, glob, image or list file, several of them, or ImageFile items already found
        (``apps.predict.sources.find_images``). Files are decoded by ``workers`` processes while the model
        runs; nothing is kept once yielded, so memory does not depend on the number of files.
        """
        if isinstance(source, str | os.PathLike):
            source = [source]
        files = list(source)
        if files and not isinstance(files[0], ImageFile):
            files = find_images(files, exclude=exclude).files
        for batch in self.loader(files, batch_size=batch_size, workers=workers, keep_images=keep_images):
            good = [it for it in batch["items"] if it["error"] is None]
            results = iter(self._run([it["input"] for it in good], [tuple(it["valid"]) for it in good],
                                     [tuple(it["size"]) for it in good], stacked=batch["stacked"]))
            for it in batch["items"]:
                file = files[it["index"]]
                if it["error"] is not None:
                    yield Prediction(file, None, error=it["error"])
                else:
                    yield Prediction(file, next(results), image=it["image"])

