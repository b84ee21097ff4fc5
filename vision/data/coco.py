"""COCO-style datasets for detection and segmentation, and the category id <-> label mapping.

Legend: M instances kept for training, C crowd regions, H x W image size, K classes.

The JSON is read into flat arrays by ``cocotable.read_coco_table`` (the checks and defaults of
``cocofile.load_coco``: optional fields filled in, broken files refused with the offending ids; masks
decoded by pycocotools only when an item needs them). Category ids may be anything (non-contiguous, 0
included): ``CategoryMap`` maps them to training labels 1..K (0 is background) and back. COCO
``[x, y, w, h]`` boxes become xyxy absolute pixels there (``xywh_to_xyxy`` is the same rule for one box),
clipped to the image; boxes under 1 px after clipping are dropped with one warning that names them.
Crowd regions are never positives: they travel separately as ``crowd_boxes`` (ignore regions) or as
label 255 in segmentation maps.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from pycocotools import mask as mask_utils
from torch.utils.data import Dataset
from torchvision.ops import box_convert

from vision.cache import cache_dir

from .cococache import AUTO_CACHE_BYTES, cached_coco_table
from .cocofile import AnnotationError, format_ids, load_coco, safe_join, segmentation_rle
from .cocotable import read_coco_table
from .images import ImageHeader, apply_orientation, exif_for_size, read_raw
from .memory import pin_for_workers
from .mosaic import find_mosaic, mosaic_partners
from .segfolder import MaskFolderSegmentation
from .transforms import IGNORE_INDEX, SAFE_CROP_INDICES, augment, to_tensor

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
    x1, y1, x2, y2 = box_convert(torch.tensor([bbox], dtype=torch.float64), "xywh", "xyxy")[0].tolist()
    return max(x1, 0.0), max(y1, 0.0), min(x2, float(width)), min(y2, float(height))


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
    """One image's view of the table, made when the item is read (nothing per image is stored)."""

    image_id: int
    path: Path
    width: int  # as the JSON says: the size the annotations were drawn on
    height: int
    boxes: np.ndarray  # float32 [M, 4] xyxy, clipped, at least 1 px wide and high
    labels: np.ndarray  # int64 [M] in 1..K
    rows: np.ndarray  # int64 [M]: the instances' rows in the table (their masks)
    crowd_boxes: np.ndarray  # float32 [C, 4]
    crowd_rows: np.ndarray  # int64 [C]


class _CocoBase(Dataset):
    """The annotations live in a ``CocoTable`` (flat numpy arrays, see ``cocotable``): building it costs
    less than ``pycocotools.coco.COCO()`` does, and forked DataLoader workers share its pages instead of
    copying them. There is no pycocotools ``COCO`` here; evaluation reads ``annotations_path``.
    Constructing one also pins glibc's mmap threshold (``memory.pin_for_workers``; optional), so the workers
    forked afterwards return their image buffers to the system instead of growing a fragmented heap."""

    def __init__(self, images: str | os.PathLike, annotations: str | os.PathLike, transforms: Any,
                 *, keep_segmentations: bool = False, cache: str | os.PathLike | None = "auto"):
        self.root = Path(images)
        self.annotations_path = Path(annotations)
        self.transforms = transforms
        pin_for_workers()  # before the DataLoader forks its workers: see vision.data.memory
        folder = _cache_dir(cache, self.annotations_path)
        if folder is None:
            self._table = read_coco_table(self.annotations_path, self.root,
                                          keep_segmentations=keep_segmentations)
        else:
            self._table = cached_coco_table(self.annotations_path, self.root, folder,
                                            keep_segmentations=keep_segmentations)
        self.category_map = CategoryMap.from_categories(self._table.categories)
        self.classes = self.category_map.classes
        self._index = np.arange(len(self._table), dtype=np.int64)  # dataset index -> table row
        self.ids = self._table.image_ids.tolist()
        if self._table.num_dropped:
            n, shown = self._table.num_dropped, ", ".join(self._table.dropped)
            warnings.warn(
                f"{self.annotations_path}: dropped {n} boxes narrower or lower than 1 px after clipping to "
                f"the image: {shown}{_more(range(n), len(self._table.dropped))}",
                stacklevel=3,
            )

    def __len__(self) -> int:
        return len(self._index)

    def aspect_ratios(self) -> list[float]:
        """Width / height of every image in ``ids`` order, from the JSON (no image is opened)."""
        table = self._table
        return (table.widths[self._index] / table.heights[self._index]).tolist()

    def instance_boxes(self) -> tuple[np.ndarray, np.ndarray]:
        """Non-crowd boxes [M, 4] xyxy of this dataset's images and their image's (height, width) [M, 2],
        from the table (``CocoTable.instance_boxes``; no file is read)."""
        return self._table.instance_boxes(self._index)

    def file_name_of(self, image_id: int) -> str | None:
        """The JSON's ``file_name`` of an image id (relative to the image folder); None if not listed."""
        ids = self._table.image_ids
        row = int(np.searchsorted(ids, image_id))
        return self._table.file_name(row) if row < len(ids) and ids[row] == image_id else None

    def _select(self, keep: np.ndarray) -> None:
        """Keep the dataset items ``keep`` (indices), in that order."""
        self._index = self._index[keep]
        self.ids = self._table.image_ids[self._index].tolist()

    def _record(self, index: int) -> _Record:
        table, i = self._table, int(self._index[index])
        rows = np.arange(table.first[i], table.first[i + 1])
        crowd = table.crowd[rows]
        return _Record(
            image_id=int(table.image_ids[i]),
            path=safe_join(self.root, table.file_name(i)),  # names were checked when the table was built
            width=int(table.widths[i]),
            height=int(table.heights[i]),
            boxes=table.boxes[rows[~crowd]],
            labels=table.labels[rows[~crowd]],
            rows=rows[~crowd],
            crowd_boxes=table.boxes[rows[crowd]],
            crowd_rows=rows[crowd],
        )

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

    def _masks(self, record: _Record, rows: Sequence[int]) -> list[np.ndarray]:
        """uint8 ``[H, W]`` mask of each table row, at the JSON's image size (pycocotools decodes)."""
        with warnings.catch_warnings():
            # pycocotools 2.0.11 + NumPy 2 warn on every decode about a copy keyword; nothing we can act on.
            warnings.filterwarnings("ignore", message="__array__ implementation doesn't accept a copy")
            rles = [segmentation_rle(self._table.segmentation(r), record.height, record.width) for r in rows]
            return [mask_utils.decode(rle) for rle in rles]

    def _check_segmentations(self, crowd_too: bool) -> None:
        table = self._table
        usable = table.segmentation_ok | (np.zeros_like(table.crowd) if crowd_too else table.crowd)
        if not usable.all():
            raise AnnotationError(
                self.annotations_path,
                f"annotations without a usable polygon or RLE segmentation (masks are needed): "
                f"ids {format_ids(table.ann_ids[~usable].tolist())}",
            )


def _cache_dir(cache: str | os.PathLike | None, annotations: Path) -> Path | None:
    """Where the table is cached (see cococache): ``"auto"`` caches files of ``AUTO_CACHE_BYTES`` and more
    in ``vision.cache.cache_dir("coco")``; None never caches; a path caches there whatever the size."""
    if cache is None:
        return None
    if str(cache) != "auto":
        return Path(cache)
    try:
        big = annotations.stat().st_size >= AUTO_CACHE_BYTES
    except OSError:
        return None  # read_coco_table reports the missing file
    return cache_dir("coco") if big else None


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
        cache: where the parsed annotations are kept for the other processes and later runs (see
            ``cococache``): ``"auto"`` (files from 32 MB, in the cache's ``coco/`` folder), a folder, or None.
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
        cache: str | os.PathLike | None = "auto",
    ):
        super().__init__(images, annotations, transforms, keep_segmentations=with_masks, cache=cache)
        self.with_masks = with_masks
        self._mosaic = find_mosaic(transforms)  # its other images come from this dataset (vision.data.mosaic)
        if self._mosaic is not None and with_masks:
            raise ValueError("transforms: Mosaic composes boxes only; it cannot carry instance masks")
        self.num_classes = self._check_num_classes(num_classes)
        if with_masks:
            self._check_segmentations(crowd_too=False)
        if drop_empty:
            table = self._table
            instances = np.bincount(np.repeat(np.arange(len(table)), np.diff(table.first))[~table.crowd],
                                    minlength=len(table))
            keep = np.flatnonzero(instances[self._index] > 0)
            dropped = len(self) - len(keep)
            self._select(keep)
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

    def _sample(self, record: _Record) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """The decoded image with its boxes, labels, table rows and crowd boxes, before any transform."""
        image = self._read(record, need_exact_size=self.with_masks)
        height, width = image.shape[:2]
        boxes, labels, rows, crowd = record.boxes, record.labels, record.rows, record.crowd_boxes
        if (width, height) != (record.width, record.height):  # size mismatch, warned in _read
            boxes, labels, rows = _clip_boxes(boxes, labels, rows, width, height)
            crowd, _, _ = _clip_boxes(crowd, np.zeros(len(crowd), np.int64), record.crowd_rows, width, height)
        return image, boxes, labels, rows, crowd

    def _partner(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        image, boxes, labels, _, crowd = self._sample(self._record(index))
        return image, boxes, labels, crowd

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, Any]]:
        record = self._record(index)
        image, boxes, labels, rows, crowd = self._sample(record)
        height, width = image.shape[:2]
        masks = np.stack(self._masks(record, rows)) if self.with_masks and len(rows) else None
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
        # every box's label and whether it is an object, by its index (a mosaic's other images' boxes after)
        all_labels = data["labels"]
        instance = np.arange(len(all_labels)) < m
        if self._mosaic is not None:
            partners = mosaic_partners(self._mosaic, len(self), len(all_labels), self._partner)
            data[self._mosaic.metadata_key] = partners.items
            all_labels = np.concatenate([all_labels, partners.labels])
            instance = np.concatenate([instance, partners.instance])
        if not instance.all():  # crowd regions ride along, but box-safe crops keep only the objects whole
            data[SAFE_CROP_INDICES] = np.flatnonzero(instance)
        out = augment(self.transforms, **data)
        # albumentations hands label fields back as floats
        kept = np.asarray(out["indices"], dtype=np.int64).reshape(-1)
        out_boxes = np.asarray(out["bboxes"], dtype=np.float32).reshape(-1, 4)
        is_instance = instance[kept]
        instances = kept[is_instance]
        new_masks = None
        if masks is not None:
            new_masks = np.ascontiguousarray(np.asarray(out["masks"])[instances], dtype=np.uint8)
        return out["image"], out_boxes[is_instance], all_labels[instances], out_boxes[~is_instance], new_masks


def _clip_boxes(boxes: np.ndarray, labels: np.ndarray, rows: np.ndarray, width: int, height: int):
    clipped = boxes.copy()
    clipped[:, 0::2] = clipped[:, 0::2].clip(0, width)
    clipped[:, 1::2] = clipped[:, 1::2].clip(0, height)
    keep = ((clipped[:, 2] - clipped[:, 0]) >= 1) & ((clipped[:, 3] - clipped[:, 1]) >= 1)
    return clipped[keep], labels[keep], rows[keep]


class CocoSegmentation(_CocoBase):
    """Images + COCO instances JSON as semantic segmentation.

    ``dataset[i] -> (image, target)``: image float32 ``[3, H, W]`` in [0, 1]; target int64 ``[H, W]`` with
    0 background, 1..K the label of the instance covering the pixel (later annotations paint over earlier
    ones), 255 ignore (crowd regions not covered by an instance, and padding added by transforms).
    """

    def __init__(self, images: str | os.PathLike, annotations: str | os.PathLike, *, transforms: Any = None,
                 cache: str | os.PathLike | None = "auto"):
        super().__init__(images, annotations, transforms, keep_segmentations=True, cache=cache)
        if self.category_map.num_classes >= IGNORE_INDEX:
            raise AnnotationError(
                self.annotations_path,
                f"{self.category_map.num_classes} categories; segmentation supports at most "
                f"{IGNORE_INDEX - 1} (label {IGNORE_INDEX} means ignore)",
            )
        self.num_classes = self.category_map.num_classes
        self._check_segmentations(crowd_too=True)

    def index_map(self, index: int) -> np.ndarray:
        """uint8 ``[H, W]`` label map of image ``index`` at the JSON's size, before transforms."""
        record = self._record(index)
        target = np.zeros((record.height, record.width), np.uint8)
        for mask in self._masks(record, record.crowd_rows):
            target[mask > 0] = IGNORE_INDEX
        for label, mask in zip(record.labels, self._masks(record, record.rows), strict=True):
            target[mask > 0] = label
        return target

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = self._read(self._record(index), need_exact_size=True)
        target = self.index_map(index)
        if self.transforms is not None:
            out = augment(self.transforms, image=image, mask=target)
            image, target = out["image"], out["mask"]
        return to_tensor(image), torch.from_numpy(np.ascontiguousarray(target)).to(torch.int64)
