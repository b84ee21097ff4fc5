"""A grid of dataset samples as the model receives them (after augmentation), with their labels drawn.

``visiondet data preview`` writes it so a user can see what a pipeline does before training on it:
boxes, instance masks and crowd regions for detection, the label map for segmentation (ignore pixels
hatched), the class name for classification. Colours and box labels come from vision.visualize, the one
drawing module: a class has the same colour here as in `visiondet predict --save-images` and the demo.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from vision import visualize
from vision.data.coco import AnnotationError, CocoDetection, CocoSegmentation
from vision.data.folder import ImageFolderDataset

__all__ = ["make_preview", "preview_dataset", "render_sample"]

_BACKGROUND = (40, 40, 40)


def preview_dataset(task: str, pipeline: Any, *, images: str | None = None, annotations: str | None = None,
                    root: str | None = None) -> Any:
    """The dataset ``data preview`` draws for a pipeline of ``task`` (as ``build_transforms`` takes it):
    an ImageFolder tree (``root``) for classification, else a COCO file with its images (detection draws
    instance masks too when every annotation has one)."""
    if task == "classification":
        if not root:
            raise ValueError("classification preview needs --root (an ImageFolder tree)")
        return ImageFolderDataset(root, transforms=pipeline)
    if not (annotations and images):
        raise ValueError(f"{task} preview needs --annotations and --images")
    if task == "segmentation":
        return CocoSegmentation(images, annotations, transforms=pipeline)
    try:
        return CocoDetection(images, annotations, transforms=pipeline, with_masks=True)
    except AnnotationError as exc:
        if "segmentation" not in exc.reason:
            raise
        return CocoDetection(images, annotations, transforms=pipeline)


def make_preview(
    dataset: Any,
    out_path: str | os.PathLike,
    *,
    num_samples: int = 16,
    columns: int = 4,
    cell: int = 256,
    seed: int = 0,
) -> Path:
    """Render ``num_samples`` random items of ``dataset`` into a PNG grid and return its path.

    Works with ``CocoDetection`` (target dict), ``CocoSegmentation`` / ``MaskFolderSegmentation`` (label
    map) and ``ImageFolderDataset`` (class index). The samples and their augmentations depend on ``seed``
    only; the caller's random state is left as it was.
    """
    if len(dataset) == 0:
        raise ValueError("the dataset is empty: nothing to preview")
    classes = list(getattr(dataset, "classes", []))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        order = torch.randperm(len(dataset))[:num_samples].tolist()
        tiles = [_fit(render_sample(*dataset[i], classes), cell) for i in order]
    rows = []
    for start in range(0, len(tiles), columns):
        row = tiles[start : start + columns]
        row += [np.full_like(tiles[0], _BACKGROUND)] * (columns - len(row))
        rows.append(np.concatenate(row, axis=1))
    grid = np.concatenate(rows, axis=0)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(out_path), cv2.cvtColor(grid, cv2.COLOR_RGB2BGR)):
        raise OSError(f"{out_path}: could not write the preview (is the extension an image format?)")
    return out_path


def render_sample(image: torch.Tensor, target: Any, classes: Sequence[dict[str, Any]]) -> np.ndarray:
    """Draw one item (float ``[3, H, W]`` image + target) into an ``(H, W, 3)`` uint8 RGB array."""
    canvas = (image.clamp(0, 1) * 255 + 0.5).to(torch.uint8).permute(1, 2, 0).contiguous().numpy()
    if isinstance(target, dict):
        return _draw_detection(canvas, target, classes)
    if isinstance(target, torch.Tensor) and target.ndim == 2:
        return _draw_label_map(canvas, target.numpy())
    name = _name(classes, int(target), offset=0)
    _caption(canvas, name, (0, 0), (255, 255, 255))
    return canvas


def _draw_detection(canvas: np.ndarray, target: dict[str, Any], classes: Sequence[dict[str, Any]]):
    labels = target["labels"].tolist()
    masks = target.get("masks")
    if masks is not None and len(masks):
        overlay = canvas.copy()
        for label, mask in zip(labels, masks.numpy().astype(bool), strict=True):
            overlay[mask] = visualize.color_of(label)
        canvas = cv2.addWeighted(overlay, 0.45, canvas, 0.55, 0)
    for x1, y1, x2, y2 in target.get("crowd_boxes", torch.zeros(0, 4)).round().int().tolist():
        cv2.rectangle(canvas, (x1, y1), (x2, y2), (160, 160, 160), 1, lineType=cv2.LINE_4)
    if not labels:
        return canvas
    names = [_name(classes, k, offset=1) for k in range(max(labels) + 1)]
    return visualize.draw_detections(canvas, target["boxes"].numpy(), np.array(labels), None, names)


def _draw_label_map(canvas: np.ndarray, label_map: np.ndarray) -> np.ndarray:
    overlay = canvas.copy()
    for label in np.unique(label_map):
        if label == 0:
            continue
        region = label_map == label
        if label == 255:  # ignore: diagonal hatching, so it reads as "not counted" rather than a class
            yy, xx = np.nonzero(region)
            stripes = ((yy + xx) % 6) < 2
            overlay[yy[stripes], xx[stripes]] = (255, 255, 255)
        else:
            overlay[region] = visualize.color_of(int(label))
    return cv2.addWeighted(overlay, 0.5, canvas, 0.5, 0)


def _name(classes: Sequence[dict[str, Any]], label: int, offset: int) -> str:
    index = label - offset
    return str(classes[index]["name"]) if 0 <= index < len(classes) else str(label)


def _caption(canvas: np.ndarray, text: str, corner: tuple[int, int], colour: tuple[int, int, int]) -> None:
    font, scale = cv2.FONT_HERSHEY_SIMPLEX, 0.4
    (w, h), base = cv2.getTextSize(text, font, scale, 1)
    x, y = max(corner[0], 0), max(corner[1] - h - base, 0)
    cv2.rectangle(canvas, (x, y), (x + w + 2, y + h + base), colour, -1)
    luminance = 0.299 * colour[0] + 0.587 * colour[1] + 0.114 * colour[2]
    ink = (0, 0, 0) if luminance > 140 else (255, 255, 255)
    cv2.putText(canvas, text, (x + 1, y + h), font, scale, ink, 1, cv2.LINE_AA)


def _fit(image: np.ndarray, cell: int) -> np.ndarray:
    """Scale to fit a ``cell`` x ``cell`` tile (aspect ratio kept), centred on a dark background."""
    h, w = image.shape[:2]
    scale = cell / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_NEAREST
    resized = cv2.resize(image, size, interpolation=interpolation)
    tile = np.full((cell, cell, 3), _BACKGROUND, np.uint8)
    top, left = (cell - size[1]) // 2, (cell - size[0]) // 2
    tile[top : top + size[1], left : left + size[0]] = resized
    return tile
