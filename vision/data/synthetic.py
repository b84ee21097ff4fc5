"""Synthetic shapes datasets (``visiondet synth``): circles, squares and triangles on textured backgrounds.

Small enough to train on a CPU in minutes, hard enough that a model must learn shape rather than colour:
every class takes every colour and size, backgrounds carry smooth shading, noise and stray lines, objects
overlap, and every tenth image is empty (a negative). Everything depends on ``seed`` alone.

Layouts written under ``out_dir``:

- detection / segmentation: ``{train,val}/images/NNNNNN.png`` + ``{train,val}/annotations.json``
  (COCO instances: polygon ``segmentation``, ``bbox``, ``area``, ``iscrowd`` 0; categories 1 circle,
  2 square, 3 triangle). Objects are drawn in annotation order, so where two overlap the later one is on
  top, which is also how ``CocoSegmentation`` paints its label map.
- classification: ``{train,val}/<class>/NNNNNN.png``, one shape per image (ImageFolder layout).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from pycocotools import mask as mask_utils
from torchvision.ops import box_convert

__all__ = ["SHAPES", "make_shapes"]

SHAPES = ("circle", "square", "triangle")
_DEFAULT_SIZES = {"detection": (160, 256), "segmentation": (160, 256), "classification": (64, 96)}
_OBJECT_SIZE = (16, 80)  # detection/segmentation object side in pixels (capped by the image)
_VERSION = 1  # of the drawing code: a change that alters the images bumps it
_SUBPIXEL = 4  # cv2 fixed-point bits: polygons are drawn at 1/16 px, as recorded in the JSON


def make_shapes(
    task: str,
    out_dir: str | os.PathLike,
    *,
    num_images: int,
    seed: int,
    image_size: int | tuple[int, int] | None = None,
    val_fraction: float = 0.2,
) -> dict[str, Path]:
    """Write a shapes dataset for ``task`` and return ``{"train": dir, "val": dir}``.

    Args:
        task: "detection", "segmentation" or "classification".
        out_dir: created if needed. A folder this function filled with the same arguments is reused as it
            is; one holding anything else is refused (ValueError), so that no stale image from another
            run can end up in a split (an ImageFolder reads every file it finds).
        num_images: total over both splits.
        seed: the only source of randomness.
        image_size: side length, or (smallest, largest) side; each image draws its width and height
            from that range. Default (160, 256) for detection/segmentation, (64, 96) for classification.
        val_fraction: share of the images in ``val`` (at least one when there are two images or more).
    """
    if task not in _DEFAULT_SIZES:
        raise ValueError(f"unknown task {task!r}; expected one of {', '.join(_DEFAULT_SIZES)}")
    if num_images < 1:
        raise ValueError(f"num_images must be at least 1, got {num_images}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    size = image_size if image_size is not None else _DEFAULT_SIZES[task]
    low, high = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    if not 32 <= low <= high:
        raise ValueError(f"image_size must be at least 32 px and (smallest, largest) ordered, got {size}")
    num_val = round(num_images * val_fraction)
    if val_fraction > 0 and num_images >= 2:
        num_val = max(num_val, 1)
    out = Path(out_dir)
    splits = {"train": out / "train", "val": out / "val"}
    request = {"task": task, "num_images": num_images, "seed": seed, "image_size": [low, high],
               "val_fraction": val_fraction, "version": _VERSION}
    manifest = out / "synth.json"
    if manifest.is_file() and _read_json(manifest) == request:
        return splits
    taken = [str(p) for p in splits.values() if p.is_dir() and any(p.iterdir())]
    if taken:
        raise ValueError(f"{', '.join(taken)}: not empty (another dataset, or other settings); "
                         f"choose an empty --out folder or delete these")
    manifest.unlink(missing_ok=True)
    rng = np.random.default_rng(seed)
    counts = {"train": num_images - num_val, "val": num_val}
    first = 0
    for split, folder in splits.items():
        indices = range(first, first + counts[split])
        if task == "classification":
            _write_classification(folder, indices, rng, low, high)
        else:
            _write_coco(folder, indices, rng, low, high)
        first += counts[split]
    manifest.write_text(json.dumps(request), encoding="utf-8")  # last: a half-written set has none
    return splits


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _write_coco(folder: Path, indices: range, rng: np.random.Generator, low: int, high: int) -> None:
    (folder / "images").mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for image_id, index in enumerate(indices, start=1):
        width, height = (int(v) for v in rng.integers(low, high + 1, size=2))
        canvas = _background(rng, height, width)
        count = 0 if index % 10 == 9 else int(rng.integers(1, 6))
        for shape_index, polygon in _place_shapes(rng, count, width, height):
            _draw(canvas, polygon, _object_colour(rng))
            flat = [round(float(v), 2) for v in polygon.reshape(-1)]
            xyxy = torch.from_numpy(np.concatenate([polygon.min(axis=0), polygon.max(axis=0)]))  # float64
            rle = mask_utils.merge(mask_utils.frPyObjects([flat], height, width))
            annotations.append({
                "id": len(annotations) + 1,
                "image_id": image_id,
                "category_id": shape_index + 1,
                "bbox": [round(v, 2) for v in box_convert(xyxy, "xyxy", "xywh").tolist()],
                "area": float(mask_utils.area(rle)),
                "segmentation": [flat],
                "iscrowd": 0,
            })
        file_name = f"{index:06d}.png"
        _write_png(folder / "images" / file_name, canvas)
        images.append({"id": image_id, "file_name": file_name, "width": width, "height": height})
    data: dict[str, Any] = {
        "info": {"description": "visiondet synthetic shapes", "version": "1"},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i + 1, "name": n, "supercategory": "shape"} for i, n in enumerate(SHAPES)],
    }
    with open(folder / "annotations.json", "w", encoding="utf-8") as f:
        json.dump(data, f)


def _write_classification(folder: Path, indices: range, rng: np.random.Generator, low: int, high: int):
    for name in SHAPES:
        (folder / name).mkdir(parents=True, exist_ok=True)
    for position, index in enumerate(indices):
        shape_index = position % len(SHAPES)  # balanced classes in every split
        width, height = (int(v) for v in rng.integers(low, high + 1, size=2))
        canvas = _background(rng, height, width)
        side = rng.uniform(0.4, 0.8) * min(width, height)
        centre = rng.uniform([side / 2, side / 2], [width - side / 2, height - side / 2])
        _draw(canvas, _polygon(shape_index, centre, side, rng), _object_colour(rng))
        _write_png(folder / SHAPES[shape_index] / f"{index:06d}.png", canvas)


def _write_png(path: Path, rgb: np.ndarray) -> None:
    if not cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)):
        raise OSError(f"{path}: could not write the image")


def _place_shapes(rng: np.random.Generator, count: int, width: int, height: int):
    """Yield (shape index, polygon [P, 2]) for up to ``count`` shapes fully inside the image.

    Shapes may overlap, but not so much (box IoU <= 0.3) that one hides another.
    """
    boxes: list[np.ndarray] = []
    largest = min(_OBJECT_SIZE[1], 0.6 * min(width, height))
    for _ in range(count):
        for _attempt in range(20):
            side = rng.uniform(_OBJECT_SIZE[0], largest)
            centre = rng.uniform([side / 2, side / 2], [width - side / 2, height - side / 2])
            shape_index = int(rng.integers(len(SHAPES)))
            polygon = _polygon(shape_index, centre, side, rng)
            box = np.concatenate([polygon.min(axis=0), polygon.max(axis=0)])
            if all(_iou(box, other) <= 0.3 for other in boxes):
                boxes.append(box)
                yield shape_index, polygon
                break


def _polygon(shape_index: int, centre: np.ndarray, side: float, rng: np.random.Generator) -> np.ndarray:
    """Vertices ``[P, 2]`` (x, y) of a shape whose extent is about ``side`` pixels."""
    name = SHAPES[shape_index]
    if name == "circle":
        angles = np.linspace(0, 2 * math.pi, 32, endpoint=False)
        radius = side / 2
    elif name == "square":
        angles = np.array([0.25, 0.75, 1.25, 1.75]) * math.pi + math.radians(rng.uniform(-20, 20))
        radius = side / 2  # half the diagonal: the rotated square stays inside the side x side box
    else:
        angles = np.array([-0.5, 1 / 6, 5 / 6]) * math.pi + math.radians(rng.uniform(-30, 30))
        radius = side / 2
    points = centre + radius * np.stack([np.cos(angles), np.sin(angles)], axis=1)
    return points.astype(np.float64)


def _draw(canvas: np.ndarray, polygon: np.ndarray, colour: tuple[int, int, int]) -> None:
    points = np.round(polygon * (1 << _SUBPIXEL)).astype(np.int32)
    cv2.fillPoly(canvas, [points], colour, lineType=cv2.LINE_AA, shift=_SUBPIXEL)


def _object_colour(rng: np.random.Generator) -> tuple[int, int, int]:
    """A saturated colour of any hue: colour says nothing about the class."""
    hsv = np.array([[[rng.integers(0, 180), rng.integers(150, 256), rng.integers(140, 256)]]], np.uint8)
    return tuple(int(v) for v in cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)[0, 0])


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Low-saturation shading + noise + a few faint lines: texture, but nothing shaped like an object."""
    base = rng.integers(60, 200, size=3).astype(np.float32)
    base = base.mean() + 0.3 * (base - base.mean())  # greyish, so objects stand out
    coarse = rng.normal(0, 25, size=(4, 4, 3)).astype(np.float32)
    shading = cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC)
    image = base + shading + rng.normal(0, 6, size=(height, width, 3)).astype(np.float32)
    image = np.clip(image, 0, 255).astype(np.uint8)
    for _ in range(int(rng.integers(0, 4))):
        p0 = tuple(int(v) for v in rng.integers(0, [width, height]))
        p1 = tuple(int(v) for v in rng.integers(0, [width, height]))
        tone = int(rng.integers(40, 220))
        cv2.line(image, p0, p1, (tone, tone, tone), thickness=1, lineType=cv2.LINE_AA)
    return image


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0
