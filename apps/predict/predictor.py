"""Prediction with any visiondet checkpoint: one typed result per image, for arrays or streamed from files.

    predictor = Predictor("weights/detector.pt", device="auto", score_threshold=0.5)
    results = predictor.predict([image])                 # (H, W, 3) uint8 RGB arrays -> list[Result]
    for item in predictor.predict_source(["photos/"], batch_size=8, workers=2):
        item.file.name, item.result or item.error         # files decoded by DataLoader worker processes

A result is a :class:`DetectionResult` (boxes xyxy in original pixels, scores, labels, category ids and
names), a :class:`ClassificationResult` (top-k) or a :class:`SegmentationResult` (an index mask at the
original size), whatever the task of the checkpoint; each one can ``draw(image)`` itself and turn into a
predictions.jsonl ``record()``. The checkpoint alone defines model, preprocessing and classes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterator, Sequence
from functools import partial
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torchvision.ops import batched_nms

from apps.engine.loader import parent_bound_init
from apps.predict.results import (
    ClassificationResult,
    DetectionResult,
    Prediction,
    Result,
    SegmentationResult,
)
from apps.predict.sources import ImageFile, find_images
from apps.predict.transform import InputTransform
from vision.data.images import DEFAULT_MAX_PIXELS, ImageError, read_image
from vision.layers import prepare_for_inference

__all__ = ["ClassificationResult", "DetectionResult", "Prediction", "Predictor", "Result",
           "SegmentationResult"]

# Above this many logits per image ((K + 1) x H x W) segmentation takes the argmax at the model's
# resolution and enlarges the index map instead of the logits: a 12-megapixel photo with 21 classes
# would otherwise need a 1 GB float tensor.
_MAX_UPSAMPLED_LOGITS = 64_000_000


class _ImageFiles(Dataset):
    """Decodes and preprocesses one file per item, inside DataLoader workers; failures come back as values
    so that one bad file never stops the stream."""

    def __init__(self, files: Sequence[ImageFile], transform: InputTransform, *, max_pixels: int,
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
        score_threshold: detection: keep boxes scoring at least this.
        nms_threshold: detection: IoU threshold of the per-class NMS; None keeps the model's own.
        classes: keep only these classes (names or dataset category ids); None keeps all. Detection drops
            other boxes, classification ranks only these, segmentation chooses among them and background.
        top_k: classification: how many classes each result lists.
        max_pixels: refuse larger image files (decompression bombs).
        backend: ``pytorch``, or ``onnxruntime``: the checkpoint's ONNX export (made, checked against
            PyTorch and cached on first use, see apps.deploy) run by ONNX Runtime on the CPU.
    """

    def __init__(
        self,
        weights: str | os.PathLike | Any,
        device: str | torch.device = "auto",
        *,
        score_threshold: float = 0.5,
        nms_threshold: float | None = None,
        classes: Sequence[str | int] | None = None,
        top_k: int = 5,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        backend: str = "pytorch",
    ):
        from apps.engine.distributed import resolve_device
        from apps.tasks import load_model

        self.device = resolve_device(str(device))
        if isinstance(weights, str | os.PathLike):
            loaded = load_model(weights, self.device)
            # Batch norms folded, channels-last: same outputs within float rounding, faster on every device
            self.loaded = dataclasses.replace(loaded, model=prepare_for_inference(loaded.model))
        else:  # the caller's model, as it is (the demo prepares the ones it caches)
            self.loaded = weights
            self.loaded.model.to(self.device).eval()
        if backend == "onnxruntime":  # the seam: an object with the model's call signature, on the CPU
            from apps.deploy import exported_backend

            self.device = torch.device("cpu")
            self.loaded = exported_backend(self.loaded, score_threshold)
        elif backend != "pytorch":
            raise ValueError(f"unknown backend {backend!r}; choose pytorch or onnxruntime")
        self.task: str = self.loaded.task.output  # R-CNN predicts as a detector
        self.classes: list[dict[str, Any]] = self.loaded.classes
        self.model = self.loaded.model
        if not 0.0 <= score_threshold <= 1.0:
            raise ValueError(f"score threshold {score_threshold} outside [0, 1]")
        if nms_threshold is not None and not 0.0 < nms_threshold <= 1.0:
            raise ValueError(f"NMS threshold {nms_threshold} outside (0, 1]")
        self.score_threshold = score_threshold
        self.nms_threshold = nms_threshold
        self.top_k = max(1, min(top_k, len(self.classes)))
        self.max_pixels = max_pixels
        self.transform = InputTransform.from_checkpoint(self.task, self.loaded.preprocess)
        # Boolean mask over labels of the model's outputs (detection/segmentation: 0 is background).
        offset = 0 if self.task == "classification" else 1
        self.allowed = self._class_mask(classes, offset)

    def _class_mask(self, wanted: Sequence[str | int] | None, offset: int) -> Tensor | None:
        if not wanted:
            return None
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

    # ---- running the model -------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _detector_settings(self):
        """Lower the detector's own score cut to ours and apply our NMS threshold for one call.

        The box head drops boxes below its training-time threshold (0.05) before NMS, so a lower
        ``score_threshold`` here needs the model's cut lowered too; restored afterwards.
        """
        heads = getattr(self.model, "roi_heads", None)
        if heads is None or not hasattr(heads, "score_thresh") or not hasattr(heads, "nms_thresh"):
            yield False
            return
        saved = heads.score_thresh, heads.nms_thresh
        heads.score_thresh = min(heads.score_thresh, self.score_threshold)
        if self.nms_threshold is not None:
            heads.nms_thresh = self.nms_threshold
        try:
            yield True
        finally:
            heads.score_thresh, heads.nms_thresh = saved

    @torch.inference_mode()
    def _run(self, inputs: list[Tensor], valid: list[tuple[int, int]], sizes: list[tuple[int, int]],
             stacked: Tensor | None = None) -> list[Result]:
        """inputs: preprocessed uint8 [3, h, w] per image; valid: the (h', w') of each input that is image
        (the rest is padding); sizes: original (H, W) of each; stacked: the inputs as one [N, 3, h, w]."""
        if not inputs:
            return []
        to_float = lambda t: t.to(self.device, non_blocking=True).float().div_(255.0)  # noqa: E731
        if self.task == "detection":
            # One image per forward: a detector pads the images of a batch to a common size, and both that
            # padding and batched kernels' rounding would make an image's boxes depend on its batch
            # companions (so on --batch-size, --workers, file order and --resume). Alone, it gets the same
            # detections every time; on a CPU this costs little (see README, predict speed).
            with self._detector_settings() as applied:
                outputs = [self.model([to_float(t)])[0][0] for t in inputs]
            return [self._detections(d, size, nms_in_model=applied) for d, size in zip(outputs, sizes,
                                                                                       strict=True)]
        if stacked is not None:
            logits, _ = self.model(to_float(stacked))
        else:
            # Sizes differ (segmentation at each image's own size): one forward per group of equal
            # size rather than padding, which would change the logits near the borders.
            groups: dict[tuple[int, ...], list[int]] = {}
            for i, t in enumerate(inputs):
                groups.setdefault(tuple(t.shape), []).append(i)
            logits = [None] * len(inputs)
            for members in groups.values():
                out, _ = self.model(to_float(torch.stack([inputs[i] for i in members])))
                for i, lg in zip(members, out, strict=True):
                    logits[i] = lg
        if self.task == "classification":
            return [self._classification(lg, size) for lg, size in zip(logits, sizes, strict=True)]
        return [self._segmentation(lg[:, :vh, :vw], size) for lg, (vh, vw), size in zip(logits, valid, sizes,
                                                                                         strict=True)]

    def _detections(self, det: Any, size: tuple[int, int], *, nms_in_model: bool) -> DetectionResult:
        keep = det.scores >= self.score_threshold
        if self.allowed is not None:
            allowed = self.allowed.to(det.labels.device)[det.labels]
            below, keep = det.scores[allowed & ~keep], keep & allowed
        else:
            below = det.scores[~keep]
        boxes, scores, labels = det.boxes[keep], det.scores[keep], det.labels[keep]
        if self.nms_threshold is not None and not nms_in_model:
            order = batched_nms(boxes.float(), scores.float(), labels, self.nms_threshold)
            boxes, scores, labels = boxes[order], scores[order], labels[order]
        labels_list = labels.tolist()
        return DetectionResult(
            boxes=boxes.float().cpu().numpy(), scores=scores.float().cpu().numpy(),
            labels=labels.cpu().numpy(), category_ids=[self.classes[k - 1]["id"] for k in labels_list],
            names=[self.classes[k - 1]["name"] for k in labels_list], image_size=size,
            best_below=float(below.max()) if len(below) else None,
        )

    def _classification(self, logits: Tensor, size: tuple[int, int]) -> ClassificationResult:
        """logits: [K]."""
        probs = logits.float().softmax(-1)
        ranked, k = probs, self.top_k
        if self.allowed is not None:  # other classes rank below every allowed one
            ranked = probs.masked_fill(~self.allowed.to(probs.device), -1.0)
            k = min(k, int(self.allowed.sum()))
        scores, labels = ranked.topk(k)
        labels_list = labels.tolist()
        return ClassificationResult(
            labels=labels.cpu().numpy(), scores=scores.cpu().numpy(),
            category_ids=[self.classes[k]["id"] for k in labels_list],
            names=[self.classes[k]["name"] for k in labels_list], image_size=size,
        )

    def _segmentation(self, logits: Tensor, size: tuple[int, int]) -> SegmentationResult:
        """logits: [K + 1, h, w] at the model's input size -> index mask at the original (H, W)."""
        upsample = logits.shape[0] * size[0] * size[1] <= _MAX_UPSAMPLED_LOGITS
        if upsample:
            logits = F.interpolate(logits[None].float(), size=size, mode="bilinear", align_corners=False)[0]
        if self.allowed is not None:  # after interpolating: -inf would turn into NaN there
            logits = logits.masked_fill(~self.allowed.to(logits.device)[:, None, None], float("-inf"))
        labels = logits.argmax(0)
        if not upsample:
            labels = F.interpolate(labels[None, None].float(), size=size, mode="nearest")[0, 0].long()
        dtype = np.uint8 if len(self.classes) < 255 else np.uint16
        return SegmentationResult(labels.cpu().numpy().astype(dtype), self.classes, size)

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
            collate_fn=partial(_collate, stack=self.task != "detection"),
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

