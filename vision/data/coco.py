"""COCO-style datasets for detection and segmentation, and the category id <-> label mapping.

Legend: M instances kept for training, C crowd regions, H x W image size, K classes.

The JSON is read by ``cocofile.load_coco`` (pycocotools underneath; optional fields filled in, broken
files refused with the offending ids). Category ids may be anything (non-contiguous, 0 included):
``CategoryMap`` maps them to training labels 1..K (0 is background) and back. COCO ``[x, y, w, h]`` boxes
become xyxy absolute pixels here and nowhere else, clipped to the image; boxes under 1 px after clipping
are dropped with one warning that names them. Crowd regions are never positives: they travel separately
as ``crowd_boxes`` (ignore regions) or as label 255 in segmentation maps.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.utils.data import Dataset

from .cocofile import AnnotationError, format_ids, load_coco, safe_join, segmentation_rle
from .images import ImageHeader, apply_orientation, exif_for_size, read_raw
from .segfolder import MaskFolderSegmentation
from .transforms import IGNORE_INDEX, augment, to_tensor

__all__ = [
    "AnnotationError",
    "CategoryMap",
    "CocoDetection",
    "CocoSegmentation",
    "MaskFolderSegmentation",
    "load_coco",
    "safe_join",
    "xywh_to_xyxy",
]

logger = logging.getLogger(__name__)


def xywh_to_xyxy(bbox: Sequence[float], width: float, height: float) -> tuple[float, float, float, float]:
    """COCO ``[x, y, w, h]`` -> ``(x1, y1, x2, y2)`` in absolute pixels, clipped to the image."""
    x, y, w, h = (float(v) for v in bbox)
    return max(x, 0.0), max(y, 0.0), min(x + w, float(width)), min(y + h, float(height))


@dataclass(frozen=True)
class CategoryMap:
    """Dataset category ids <-> contiguous training labels 1..K (0 is background), in ascending id order."""

    ids: tuple[int, ...]
    names: tuple[str, ...]

    def __post_init__(self):
        if len(self.ids) != len(self.names):
            raise ValueError("CategoryMap: ids and names differ in length")
        duplicates = [i for i, n in Counter(self.ids).items() if n > 1]
        if duplicates:
            raise ValueError(f"duplicate category ids: {format_ids(duplicates)}")
        object.__setattr__(self, "_label", {cid: i + 1 for i, cid in enumerate(self.ids)})

    @classmethod
    def from_categories(cls, categories: Sequence[dict[str, Any]]) -> CategoryMap:
        """From COCO ``categories`` (any order); labels follow ascending id."""
        ordered = sorted(categories, key=lambda c: c["id"])
        return cls(tuple(int(c["id"]) for c in ordered), tuple(str(c.get("name", c["id"])) for c in ordered))

    @classmethod
    def from_classes(cls, classes: Sequence[dict[str, Any]]) -> CategoryMap:
        """From a checkpoint's ``classes`` list, keeping its (label) order."""
        return cls(tuple(int(c["id"]) for c in classes), tuple(str(c["name"]) for c in classes))

    @property
    def num_classes(self) -> int:
        return len(self.ids)

    def __len__(self) -> int:
        return len(self.ids)

    def label_of(self, category_id: int) -> int:
        """Dataset category id -> training label 1..K."""
        try:
            return self._label[category_id]
        except KeyError:
            raise KeyError(f"category id {category_id!r} is not declared ({list(self.ids)})") from None

    def category_of(self, label: int) -> int:
        """Training label 1..K -> dataset category id."""
        if not 1 <= label <= len(self.ids):
            raise KeyError(f"label {label} is outside 1..{len(self.ids)}")
        return self.ids[label - 1]

    def name_of(self, label: int) -> str:
        """Training label 1..K -> category name."""
        self.category_of(label)  # range check
        return self.names[label - 1]

    @property
    def classes(self) -> list[dict[str, Any]]:
        """``[{"id", "name"}, ...]`` in label order: entry i is label i + 1 (what checkpoints store)."""
        return [{"id": cid, "name": name} for cid, name in zip(self.ids, self.names, strict=True)]


class _Record(NamedTuple):
    """One image, prepared at construction so that a bad annotation is reported before training starts."""

    image_id: int
    path: Path
    width: int  # as the JSON says: the size the annotations were drawn on
    height: int
    boxes: np.ndarray  # float32 [M, 4] xyxy, clipped, at least 1 px wide and high
    labels: np.ndarray  # int64 [M] in 1..K
    ann_ids: list[int]  # [M]
    crowd_boxes: np.ndarray  # float32 [C, 4]
    crowd_ann_ids: list[int]  # [C]


class _CocoBase(Dataset):
    def __init__(self, images: str | os.PathLike, annotations: str | os.PathLike, transforms: Any):
        self.root = Path(images)
        self.annotations_path = Path(annotations)
        self.transforms = transforms
        self.coco = load_coco(self.annotations_path, images_root=self.root)
        self.category_map = CategoryMap.from_categories(self.coco.dataset["categories"])
        self.classes = self.category_map.classes
        self.ids = sorted(self.coco.imgs)
        self._records = self._prepare_records()

    def __len__(self) -> int:
        return len(self.ids)

    def aspect_ratios(self) -> list[float]:
        """Width / height of every image in ``ids`` order, from the JSON (no image is opened)."""
        return [self._records[i].width / self._records[i].height for i in range(len(self.ids))]

    def _prepare_records(self) -> list[_Record]:
        unsafe, degenerate, records = [], [], []
        for image_id in self.ids:
            img = self.coco.imgs[image_id]
            try:
                path = safe_join(self.root, img["file_name"])
            except ValueError as exc:
                unsafe.append(f"image id {image_id}: {exc}")
                continue
            width, height = int(img["width"]), int(img["height"])
            kept: dict[bool, list[tuple[tuple[float, ...], int, int]]] = {False: [], True: []}
            for ann in self.coco.imgToAnns[image_id]:
                x1, y1, x2, y2 = xywh_to_xyxy(ann["bbox"], width, height)
                if x2 - x1 < 1 or y2 - y1 < 1:
                    degenerate.append(f"{img['file_name']} (annotation {ann['id']})")
                    continue
                label = self.category_map.label_of(ann["category_id"])
                kept[bool(ann["iscrowd"])].append(((x1, y1, x2, y2), label, ann["id"]))
            boxes, labels, ann_ids = _unzip(kept[False])
            crowd, _, crowd_ids = _unzip(kept[True])
            records.append(_Record(image_id, path, width, height, boxes, labels, ann_ids, crowd, crowd_ids))
        if unsafe:
            raise AnnotationError(self.annotations_path, "; ".join(unsafe[:5]) + _more(unsafe, 5))
        if degenerate:
            warnings.warn(
                f"{self.annotations_path}: dropped {len(degenerate)} boxes narrower or lower than 1 px after "
                f"clipping to the image: {format_ids(degenerate, limit=5)}",
                stacklevel=3,
            )
        return records

    def _read(self, record: _Record, *, need_exact_size: bool) -> np.ndarray:
        """Decode the image in the orientation its annotations were drawn on (see images.exif_for_size)."""
        raw, orientation = read_raw(record.path)
        header = ImageHeader(raw.shape[1], raw.shape[0], orientation, "")
        use_exif = exif_for_size(header, record.width, record.height)
        if use_exif is None:
            w, h = header.oriented_size
            message = (
                f"{record.path}: image is {w}x{h} but {self.annotations_path.name} says "
                f"{record.width}x{record.height}"
            )
            if need_exact_size:
                raise AnnotationError(self.annotations_path, f"{message}; masks cannot be aligned")
            warnings.warn(f"{message}; boxes are clipped to the image", stacklevel=3)
            use_exif = True
        if use_exif:
            raw = apply_orientation(raw, orientation)
        return raw

    def _masks(self, ann_ids: Sequence[int]) -> list[np.ndarray]:
        """uint8 ``[H, W]`` mask of each annotation, at the JSON's image size (pycocotools decodes)."""
        with warnings.catch_warnings():
            # pycocotools 2.0.11 + NumPy 2 warn on every decode about a copy keyword; nothing we can act on.
            warnings.filterwarnings("ignore", message="__array__ implementation doesn't accept a copy")
            return [self.coco.annToMask(self.coco.anns[i]) for i in ann_ids]

    def _check_segmentations(self, ann_ids: Iterable[int]) -> None:
        bad = []
        for ann_id in ann_ids:
            ann = self.coco.anns[ann_id]
            img = self.coco.imgs[ann["image_id"]]
            if segmentation_rle(ann.get("segmentation"), img["height"], img["width"]) is None:
                bad.append(ann_id)
        if bad:
            raise AnnotationError(
                self.annotations_path,
                f"annotations without a usable polygon or RLE segmentation (masks are needed): "
                f"ids {format_ids(bad)}",
            )


def _unzip(items: list[tuple[tuple[float, ...], int, int]]) -> tuple[np.ndarray, np.ndarray, list[int]]:
    boxes = np.array([b for b, _, _ in items], dtype=np.float32).reshape(-1, 4)
    labels = np.array([label for _, label, _ in items], dtype=np.int64)
    return boxes, labels, [i for _, _, i in items]


def _more(items: Sequence[Any], shown: int) -> str:
    return f" ... ({len(items)} in all)" if len(items) > shown else ""


class CocoDetection(_CocoBase):
    """Images + COCO instances JSON for detection.

    ``dataset[i] -> (image, target)``: image float32 ``[3, H, W]`` in [0, 1]; target dict with
    ``boxes`` float32 ``[M, 4]`` (xyxy, pixels of the returned image), ``labels`` int64 ``[M]`` in 1..K,
    ``image_id`` (the JSON's id), ``orig_size`` int64 ``[2]`` = (H, W) of the decoded image before
    transforms, ``crowd_boxes`` float32 ``[C, 4]`` (ignore regions, never positives) and, with
    ``with_masks``, ``masks`` uint8 ``[M, H, W]``.

    Args:
        images: image folder; the JSON's ``file_name`` values are relative to it.
        annotations: COCO instances JSON.
        transforms: albumentations pipeline from ``build_transforms(..., "detection", ...)``; None: none.
        drop_empty: leave out images without any non-crowd box (kept as negatives by default).
        with_masks: also return per-instance masks (polygons or RLE are required).
        num_classes: K when the config overrides it (at least the number of categories).
    """

    def __init__(
        self,
        images: str | os.PathLike,
        annotations: str | os.PathLike,
        *,
        transforms: Any = None,
        drop_empty: bool = False,
        with_masks: bool = False,
        num_classes: int | None = None,
    ):
        super().__init__(images, annotations, transforms)
        self.with_masks = with_masks
        self.num_classes = self._check_num_classes(num_classes)
        if with_masks:
            self._check_segmentations(i for r in self._records for i in r.ann_ids)
        if drop_empty:
            keep = [i for i, r in enumerate(self._records) if len(r.boxes)]
            dropped = len(self._records) - len(keep)
            self._records = [self._records[i] for i in keep]
            self.ids = [r.image_id for r in self._records]
            logger.info("%s: dropped %d images without boxes (drop_empty)", self.annotations_path, dropped)

    def _check_num_classes(self, num_classes: int | None) -> int:
        # Labels are checked here, on the CPU, so a bad one never becomes a device-side assert mid-epoch.
        k = self.category_map.num_classes
        if num_classes is None:
            return k
        if num_classes < k:
            cm = self.category_map
            over = [f"{cm.ids[i]} ({cm.names[i]})" for i in range(num_classes, k)]
            raise AnnotationError(
                self.annotations_path,
                f"num_classes={num_classes} but the file declares {k} categories; labels "
                f"{num_classes + 1}..{k} (categories {format_ids(over)}) would be out of range",
            )
        return num_classes

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, Any]]:
        record = self._records[index]
        image = self._read(record, need_exact_size=self.with_masks)
        height, width = image.shape[:2]
        boxes, labels, ann_ids, crowd = record.boxes, record.labels, record.ann_ids, record.crowd_boxes
        if (width, height) != (record.width, record.height):  # size mismatch, warned in _read
            boxes, labels, ann_ids = _clip_boxes(boxes, labels, ann_ids, width, height)
            crowd, _, _ = _clip_boxes(crowd, np.zeros(len(crowd), np.int64), [], width, height)
        masks = np.stack(self._masks(ann_ids)) if self.with_masks and ann_ids else None
        if self.transforms is not None:
            image, boxes, labels, crowd, masks = self._augment(image, boxes, labels, crowd, masks)
        target = {
            "boxes": torch.from_numpy(np.asarray(boxes, np.float32).reshape(-1, 4)),
            "labels": torch.from_numpy(np.asarray(labels, np.int64).reshape(-1)),
            "image_id": int(record.image_id),
            "orig_size": torch.tensor([height, width], dtype=torch.int64),
            "crowd_boxes": torch.from_numpy(np.asarray(crowd, np.float32).reshape(-1, 4)),
        }
        if self.with_masks:
            empty = torch.zeros(0, *image.shape[:2], dtype=torch.uint8)
            target["masks"] = torch.from_numpy(masks) if masks is not None else empty
        return to_tensor(image), target

    def _augment(self, image, boxes, labels, crowd, masks):
        m = len(boxes)
        data = {
            "image": image,
            # Crowd boxes ride along (same geometry) and are told apart afterwards by their index >= M.
            "bboxes": np.concatenate([boxes, crowd]).reshape(-1, 4),
            "labels": np.concatenate([labels, np.zeros(len(crowd), np.int64)]),
            "indices": np.arange(m + len(crowd)),
        }
        if masks is not None:  # albumentations cannot stack an empty list of masks
            data["masks"] = masks
        out = augment(self.transforms, **data)
        # albumentations hands label fields back as floats
        kept = np.asarray(out["indices"], dtype=np.int64).reshape(-1)
        out_boxes = np.asarray(out["bboxes"], dtype=np.float32).reshape(-1, 4)
        is_instance = kept < m
        instances = kept[is_instance]
        new_masks = None
        if masks is not None:
            new_masks = np.ascontiguousarray(np.asarray(out["masks"])[instances], dtype=np.uint8)
        return out["image"], out_boxes[is_instance], labels[instances], out_boxes[~is_instance], new_masks


def _clip_boxes(boxes: np.ndarray, labels: np.ndarray, ann_ids: list[int], width: int, height: int):
    clipped = boxes.copy()
    clipped[:, 0::2] = clipped[:, 0::2].clip(0, width)
    clipped[:, 1::2] = clipped[:, 1::2].clip(0, height)
    keep = ((clipped[:, 2] - clipped[:, 0]) >= 1) & ((clipped[:, 3] - clipped[:, 1]) >= 1)
    return clipped[keep], labels[keep], [a for a, k in zip(ann_ids, keep, strict=False) if k]


class CocoSegmentation(_CocoBase):
    """Images + COCO instances JSON as semantic segmentation.

    ``dataset[i] -> (image, target)``: image float32 ``[3, H, W]`` in [0, 1]; target int64 ``[H, W]`` with
    0 background, 1..K the label of the instance covering the pixel (later annotations paint over earlier
    ones), 255 ignore (crowd regions not covered by an instance, and padding added by transforms).
    """

    def __init__(self, images: str | os.PathLike, annotations: str | os.PathLike, *, transforms: Any = None):
        super().__init__(images, annotations, transforms)
        if self.category_map.num_classes >= IGNORE_INDEX:
            raise AnnotationError(
                self.annotations_path,
                f"{self.category_map.num_classes} categories; segmentation supports at most "
                f"{IGNORE_INDEX - 1} (label {IGNORE_INDEX} means ignore)",
            )
        self.num_classes = self.category_map.num_classes
        self._check_segmentations(a for r in self._records for a in r.ann_ids + r.crowd_ann_ids)

    def index_map(self, index: int) -> np.ndarray:
        """uint8 ``[H, W]`` label map of image ``index`` at the JSON's size, before transforms."""
        record = self._records[index]
        target = np.zeros((record.height, record.width), np.uint8)
        for mask in self._masks(record.crowd_ann_ids):
            target[mask > 0] = IGNORE_INDEX
        for label, mask in zip(record.labels, self._masks(record.ann_ids), strict=True):
            target[mask > 0] = label
        return target

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = self._read(self._records[index], need_exact_size=True)
        target = self.index_map(index)
        if self.transforms is not None:
            out = augment(self.transforms, image=image, mask=target)
            image, target = out["image"], out["mask"]
        return to_tensor(image), torch.from_numpy(np.ascontiguousarray(target)).to(torch.int64)
