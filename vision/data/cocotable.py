"""A COCO instances file as a few flat numpy arrays: what the datasets keep once the JSON is read.

Why flat arrays: a DataLoader worker that reads a Python list of per-image records writes to every
record's reference count (and the garbage collector to every container's header), so the pages holding
them are copied into each worker one by one: memory grows towards one copy of the dataset per worker.
A numpy array is one object whatever its length, so forked workers share its pages for good. The same
reason makes detectron2 serialise its dataset list into one buffer.

The file is parsed once with ``cocofile.read_checked`` (the checks and defaults of ``load_coco``), the
arrays are cut from it with whole-array operations, and the parsed dicts are dropped before returning.

Legend: N images (ascending id), A annotations kept, grouped by image (file order within an image).
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Sequence
from dataclasses import dataclass
from operator import itemgetter
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchvision.ops import box_convert

from .cocofile import (
    AnnotationError,
    column,
    format_ids,
    may_be_unsafe,
    paused_gc,
    read_checked,
    safe_join,
    segmentation_rle,
)

__all__ = ["CocoTable", "PackedBytes", "read_coco_table"]


class PackedBytes:
    """Byte strings in one ``uint8`` buffer with ``int64`` offsets: no Python object per item."""

    def __init__(self, items: Sequence[bytes]):
        lengths = np.fromiter((len(b) for b in items), dtype=np.int64, count=len(items))
        self.offsets = np.zeros(len(items) + 1, dtype=np.int64)
        np.cumsum(lengths, out=self.offsets[1:])
        self.buffer = np.frombuffer(b"".join(items), dtype=np.uint8)

    @classmethod
    def from_arrays(cls, buffer: np.ndarray, offsets: np.ndarray) -> PackedBytes:
        """Wrap existing arrays (e.g. memory-mapped ones) without copying them."""
        packed = cls.__new__(cls)
        packed.buffer, packed.offsets = buffer, offsets
        return packed

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, index: int) -> bytes:
        return self.buffer[self.offsets[index] : self.offsets[index + 1]].tobytes()

    @property
    def nbytes(self) -> int:
        return self.buffer.nbytes + self.offsets.nbytes


@dataclass(frozen=True, eq=False)
class CocoTable:
    """The annotations the datasets need, as arrays; ``boxes`` are xyxy pixels clipped to the image."""

    categories: list[dict[str, Any]]  # as in the file (a few hundred at most)
    image_ids: np.ndarray  # int64 [N], ascending
    widths: np.ndarray  # int64 [N]: the size the annotations were drawn on
    heights: np.ndarray  # int64 [N]
    file_names: PackedBytes  # [N] UTF-8, relative to the image folder (checked safe)
    first: np.ndarray  # int64 [N + 1]: rows first[i]:first[i + 1] are image i's annotations
    boxes: np.ndarray  # float32 [A, 4] xyxy, clipped, at least 1 px wide and high
    labels: np.ndarray  # int64 [A] in 1..K, K categories in ascending id order
    ann_ids: np.ndarray  # int64 [A]
    crowd: np.ndarray  # bool [A]
    segmentations: PackedBytes | None  # [A] pickled polygon / RLE objects, when asked for
    segmentation_ok: np.ndarray | None  # bool [A]: decodes to a mask (checked once, when asked for)
    dropped: list[str]  # the first degenerate boxes, "file (annotation id)", for the warning
    num_dropped: int

    def __len__(self) -> int:
        return len(self.image_ids)

    def file_name(self, index: int) -> str:
        return self.file_names[index].decode("utf-8", "surrogatepass")

    def rows(self, index: int) -> slice:
        return slice(int(self.first[index]), int(self.first[index + 1]))

    def segmentation(self, row: int) -> Any:
        if self.segmentations is None:
            raise ValueError("segmentations were not kept (read_coco_table(..., keep_segmentations=False))")
        return pickle.loads(self.segmentations[row])

    def instance_boxes(self, images: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Boxes [M, 4] float64 xyxy (clipped, at least 1 px) of every non-crowd annotation of the images
        ``images`` (table indices; None: all) and their image's (height, width) [M, 2] float64, from the
        arrays alone: what anchor fitting reads, with no second parse of the file."""
        image_of_row = np.repeat(np.arange(len(self)), np.diff(self.first))
        keep = ~self.crowd
        if images is not None:
            chosen = np.zeros(len(self), dtype=bool)
            chosen[images] = True
            keep &= chosen[image_of_row]
        rows = image_of_row[keep]
        hw = np.stack([self.heights[rows], self.widths[rows]], axis=1).astype(np.float64)
        return self.boxes[keep].astype(np.float64), hw

    @property
    def nbytes(self) -> int:
        """Bytes held by the arrays (what each process keeps, shared by forked workers)."""
        arrays = [self.image_ids, self.widths, self.heights, self.first, self.boxes, self.labels,
                  self.ann_ids, self.crowd]
        extra = [self.file_names.nbytes]
        if self.segmentations is not None:
            extra += [self.segmentations.nbytes, self.segmentation_ok.nbytes]
        return sum(a.nbytes for a in arrays) + sum(extra)


def read_coco_table(
    annotations: str | os.PathLike,
    images_root: str | os.PathLike,
    *,
    keep_segmentations: bool = False,
    shown: int = 5,
) -> CocoTable:
    """Read and check a COCO instances JSON (see ``load_coco``) into a ``CocoTable``.

    Boxes under 1 px wide or high after clipping are left out and counted (``num_dropped``; the first
    ``shown`` are named in ``dropped``). ``keep_segmentations`` keeps each kept annotation's polygon or
    RLE, pickled into one buffer and decoded only when a mask is asked for.

    Raises:
        AnnotationError: everything ``load_coco`` refuses, unsafe file names (``..``, absolute paths),
            image sizes that are not numbers.
    """
    path = Path(annotations)
    with paused_gc():  # see paused_gc: millions of new objects, no cycles
        return _build(path, images_root, keep_segmentations, shown)


def _build(path: Path, images_root: str | os.PathLike, keep_segmentations: bool, shown: int) -> CocoTable:
    data, columns = read_checked(path, images_root)
    images, anns = data["images"], data["annotations"]
    _check_file_names(path, images_root, images)

    # Every column is taken in one pass in file order, then reordered as arrays: visiting the parsed
    # dicts in any other order costs several times more (they lie all over the heap).
    ids = np.asarray(column(images, "id"), dtype=np.int64).reshape(-1)
    order = np.argsort(ids, kind="stable")
    ids = ids[order]
    try:
        widths = np.asarray(list(map(itemgetter("width"), images)), dtype=np.int64).reshape(-1)[order]
        heights = np.asarray(list(map(itemgetter("height"), images)), dtype=np.int64).reshape(-1)[order]
    except KeyError:
        missing = [img["id"] for img in images if "width" not in img or "height" not in img]
        raise AnnotationError(path, f"images without width/height: ids {format_ids(missing)}") from None
    except (TypeError, ValueError, OverflowError):
        raise AnnotationError(path, "image width and height must be numbers") from None
    names = column(images, "file_name")
    names = PackedBytes([names[j].encode("utf-8", "surrogatepass") for j in order.tolist()])

    # Annotations grouped by image; a stable sort keeps the file order within an image (later masks
    # paint over earlier ones in segmentation maps).
    image_of = np.searchsorted(ids, columns.image_ids)
    rows = np.argsort(image_of, kind="stable")
    image_of = image_of[rows]
    xywh = columns.xywh[rows]
    w, h = widths[image_of], heights[image_of]
    boxes = box_convert(torch.from_numpy(xywh), "xywh", "xyxy").numpy()
    np.maximum(boxes[:, :2], 0.0, out=boxes[:, :2])  # clipped to the image, as xywh_to_xyxy does
    np.minimum(boxes[:, 2], w, out=boxes[:, 2])
    np.minimum(boxes[:, 3], h, out=boxes[:, 3])
    keep = ((boxes[:, 2] - boxes[:, 0]) >= 1) & ((boxes[:, 3] - boxes[:, 1]) >= 1)
    ann_ids = columns.ids[rows]
    bad_images, bad_ids = image_of[~keep][:shown].tolist(), ann_ids[~keep][:shown].tolist()
    dropped = [f"{names[i].decode('utf-8', 'surrogatepass')} (annotation {a})"
               for i, a in zip(bad_images, bad_ids, strict=True)]

    rows, image_of = rows[keep], image_of[keep]
    cat_ids = np.sort(np.fromiter((c["id"] for c in data["categories"]), np.int64, len(data["categories"])))
    crowd = np.fromiter(map(bool, column(anns, "iscrowd")), dtype=bool, count=len(anns))
    first = np.zeros(len(ids) + 1, dtype=np.int64)
    np.cumsum(np.bincount(image_of, minlength=len(ids)), out=first[1:])
    segmentations = segmentation_ok = None
    if keep_segmentations:
        segmentations, segmentation_ok = _pack_segmentations(anns, rows, image_of, widths, heights)
    return CocoTable(
        categories=data["categories"],
        image_ids=ids,
        widths=widths,
        heights=heights,
        file_names=names,
        first=first,
        boxes=np.ascontiguousarray(boxes[keep], dtype=np.float32),
        labels=np.searchsorted(cat_ids, columns.category_ids[rows]) + 1,
        ann_ids=ann_ids[keep],
        crowd=crowd[rows],
        segmentations=segmentations,
        segmentation_ok=segmentation_ok,
        dropped=dropped,
        num_dropped=int((~keep).sum()),
    )


def _check_file_names(path: Path, root: str | os.PathLike, images: list[dict[str, Any]]) -> None:
    # safe_join builds two path objects per name: only names that could be unsafe go through it.
    suspect = [img for img in images if may_be_unsafe(img["file_name"])]
    unsafe = []
    for img in suspect:
        try:
            safe_join(root, img["file_name"])
        except ValueError as exc:
            unsafe.append(f"image id {img['id']}: {exc}")
    if unsafe:
        more = f" ... ({len(unsafe)} in all)" if len(unsafe) > 5 else ""
        raise AnnotationError(path, "; ".join(unsafe[:5]) + more)


def _pack_segmentations(anns, rows, image_of, widths, heights) -> tuple[PackedBytes, np.ndarray]:
    segms = [a.get("segmentation") for a in anns]  # None, not column()'s marker, where absent
    segms = [segms[j] for j in rows.tolist()]
    ok = np.fromiter(
        (segmentation_rle(s, int(heights[i]), int(widths[i])) is not None if s else False
         for s, i in zip(segms, image_of.tolist(), strict=True)),
        bool, len(segms),
    )
    return PackedBytes([pickle.dumps(s, protocol=pickle.HIGHEST_PROTOCOL) for s in segms]), ok
