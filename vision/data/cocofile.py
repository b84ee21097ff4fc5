"""Reading COCO instances JSON files: defaults for the optional fields, refusal of what would break later.

``load_coco`` returns a pycocotools ``COCO`` (the index and mask decoding are pycocotools'), after filling
what other tools leave out (``iscrowd``, ``area``, ``info``...) and refusing what would break training or
evaluation later (undeclared categories, annotations of unknown images, duplicate ids). Errors name the
file and list the offending ids.
"""

from __future__ import annotations

import contextlib
import gc
import io
import json
import math
import os
from collections import Counter
from collections.abc import Iterable, Iterator
from itertools import chain
from operator import itemgetter
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, NamedTuple

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from .images import image_size

__all__ = [
    "AnnotationColumns",
    "AnnotationError",
    "column",
    "duplicate_ints",
    "format_ids",
    "load_coco",
    "may_be_unsafe",
    "paused_gc",
    "read_checked",
    "read_coco_json",
    "read_json",
    "safe_join",
    "segmentation_rle",
]


class AnnotationError(ValueError):
    """An annotation file that cannot be used; ``str(err)`` is ``"<path>: <reason>"``."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")

    def __reduce__(self):
        return type(self), (self.path, self.reason)


def format_ids(ids: Iterable[Any], limit: int = 10) -> str:
    """``"3, 5, 9"`` or ``"3, 5, 9, ... (40 in all)"``: messages list ids without flooding the screen."""
    ids = list(ids)
    text = ", ".join(str(i) for i in ids[:limit])
    return f"{text}, ... ({len(ids)} in all)" if len(ids) > limit else text


def safe_join(root: str | os.PathLike, file_name: str) -> Path:
    """``root / file_name``, refusing names that would leave ``root`` (absolute paths, drive letters, ``..``).

    Backslashes count as separators, since JSON files written on Windows use them.
    """
    name = str(file_name)
    reason = None
    posix = PurePosixPath(name.replace("\\", "/"))
    if not name.strip() or "\x00" in name:
        reason = "empty or contains a NUL byte"
    elif posix.is_absolute() or PureWindowsPath(name).drive:
        reason = "absolute path"
    elif ".." in posix.parts:
        reason = "'..' leads outside the image folder"
    if reason:
        raise ValueError(f"unsafe file name {name!r}: {reason}")
    return Path(root).joinpath(*posix.parts)


@contextlib.contextmanager
def paused_gc() -> Iterator[None]:
    """The cyclic garbage collector off for the block, then back as it was.

    Parsing a COCO file creates millions of dicts and lists and not one reference cycle, yet every full
    collection those allocations trigger walks all of them again: with the collector on, ``json.load``
    of a COCO-sized file (167 MB) takes about 2.5 times as long. Reference counting still frees memory.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def may_be_unsafe(name: str) -> bool:
    """False only for names that ``safe_join`` surely accepts (no '..', ':', NUL, leading separator).

    ``safe_join`` builds two path objects per name; at 118k images only the doubtful names need it.
    """
    return not name.strip() or ".." in name or ":" in name or "\x00" in name or name[0] in "/\\"


def load_coco(annotations_path: str | os.PathLike, images_root: str | os.PathLike | None = None) -> COCO:
    """Read a COCO instances JSON into a pycocotools ``COCO``, with missing optional fields filled in.

    Defaults: ``info`` {}, ``licenses`` [], ``annotations`` [], annotation ``id`` (numbered after the
    largest), ``iscrowd`` 0, ``area`` (mask area, else box area), ``bbox`` (from the mask), category
    ``name`` (its id); image ``width``/``height`` from the file header when ``images_root`` is given.

    Raises:
        AnnotationError: unreadable JSON, missing ``images``/``categories``, duplicate ids, annotations
            with an undeclared category or an unknown image, malformed boxes. Ids are listed.
    """
    coco = COCO()
    with paused_gc():
        coco.dataset = read_coco_json(annotations_path, images_root)
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress lines
            coco.createIndex()
    return coco


def read_coco_json(annotations_path: str | os.PathLike, images_root: str | os.PathLike | None = None) -> dict:
    """The checked JSON object with the defaults of ``load_coco`` filled in (plain dicts, no index)."""
    return read_checked(annotations_path, images_root)[0]


class AnnotationColumns(NamedTuple):
    """Columns of ``annotations`` (file order) that the checks build anyway; the datasets keep them."""

    ids: np.ndarray  # int64 [A]
    image_ids: np.ndarray  # int64 [A]
    category_ids: np.ndarray  # int64 [A]
    xywh: np.ndarray  # float64 [A, 4]


def read_checked(
    annotations_path: str | os.PathLike, images_root: str | os.PathLike | None = None
) -> tuple[dict[str, Any], AnnotationColumns]:
    """``read_coco_json``'s object and the annotation columns it was checked with.

    The checks are whole-array operations on columns taken in one sequential pass each (visiting 860k
    dicts in file order is several times faster than in any other order): at COCO scale (118k images, 860k
    boxes) they cost a small fraction of parsing the file.
    """
    path = Path(annotations_path)
    with paused_gc():
        data = read_json(path)
    for key in ("images", "categories"):
        if not isinstance(data.get(key), list):
            raise AnnotationError(path, f"no {key!r} list; is this a COCO instances file?")
    data.setdefault("info", {})
    data.setdefault("licenses", [])
    data["annotations"] = data.get("annotations") or []
    if not isinstance(data["annotations"], list):
        raise AnnotationError(path, "'annotations' is not a list")
    _check_ids(path, data)
    images = {img["id"]: img for img in data["images"]}
    if images_root is not None:
        for img in data["images"]:
            if "width" not in img or "height" not in img:
                img["width"], img["height"] = _size_from_file(path, images_root, img)
    for cat in data["categories"]:
        cat.setdefault("name", str(cat["id"]))
    columns = _fill_annotations(path, data["annotations"], images, [c["id"] for c in data["categories"]])
    return data, columns


def read_json(path: Path) -> dict[str, Any]:
    """The parsed JSON object, or an ``AnnotationError`` naming the file, line and column."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise AnnotationError(path, "no such annotations file") from None
    except json.JSONDecodeError as exc:
        reason = f"not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        raise AnnotationError(path, reason) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise AnnotationError(path, f"cannot read the file ({exc})") from None
    if not isinstance(data, dict):
        raise AnnotationError(path, f"expected a JSON object at the top level, got {type(data).__name__}")
    return data


def _check_ids(path: Path, data: dict[str, Any]) -> None:
    for key, what in (("images", "image"), ("categories", "category"), ("annotations", "annotation")):
        entries = data[key]
        if not set(map(type, entries)) <= {dict}:
            raise AnnotationError(path, f"every entry of {key!r} must be a JSON object")
        ids, complete = _column(entries, "id")
        if key == "annotations" and not complete:  # missing annotation ids are numbered later
            ids = [i for i in ids if i is not _MISSING]
        if not set(map(type, ids)) <= {int}:  # bool is not int here
            bad = [None if i is _MISSING else i for i in ids if type(i) is not int]
            raise AnnotationError(path, f"{what} ids must be integers; found {format_ids(map(repr, bad))}")
        dupes = duplicate_ints(ids)
        if dupes:
            raise AnnotationError(path, f"duplicate {what} ids: {format_ids(dupes)}")
    if not set(map(type, column(data["images"], "file_name"))) <= {str}:
        missing_names = [img["id"] for img in data["images"] if type(img.get("file_name")) is not str]
        raise AnnotationError(path, f"images without a 'file_name': ids {format_ids(missing_names)}")


_MISSING = object()  # what column() gives for an absent key (None would be a JSON null)


def column(entries: list[dict[str, Any]], key: str) -> list[Any]:
    """``[e[key] for e in entries]``, with ``_MISSING`` where the key is absent.

    ``map(itemgetter)`` walks the list in C, several times faster than a comprehension: at COCO scale
    the checks make a few such passes over 860k annotations.
    """
    return _column(entries, key)[0]


def _column(entries: list[dict[str, Any]], key: str) -> tuple[list[Any], bool]:
    """``column`` and whether every entry has the key."""
    try:
        return list(map(itemgetter(key), entries)), True
    except KeyError:
        return [e.get(key, _MISSING) for e in entries], False


def duplicate_ints(values: list[int]) -> list[int]:
    """The values that occur more than once, ascending (a sort, not a Counter: 860k ids in 0.1 s)."""
    try:
        array = np.sort(np.asarray(values, dtype=np.int64))
    except OverflowError:  # ids beyond 64 bits: rare enough for the slow way
        return sorted(v for v, n in Counter(values).items() if n > 1)
    return np.unique(array[1:][array[1:] == array[:-1]]).tolist()


def _size_from_file(path: Path, images_root: str | os.PathLike, img: dict[str, Any]) -> tuple[int, int]:
    try:
        file = safe_join(images_root, img["file_name"])
    except ValueError as exc:
        raise AnnotationError(path, f"image id {img['id']}: {exc}") from None
    return image_size(file)  # EXIF applied: what annotation tools show; ImageError names the file


def _fill_annotations(
    path: Path, anns: list[dict[str, Any]], images: dict[int, Any], cat_ids: list[int]
) -> AnnotationColumns:
    ids, complete = _column(anns, "id")
    if not complete:
        next_id = max((i for i in ids if i is not _MISSING), default=0) + 1
        for ann in anns:
            if "id" not in ann:
                ann["id"], next_id = next_id, next_id + 1
        ids = column(anns, "id")
    if not _column(anns, "iscrowd")[1]:
        for ann in anns:
            ann.setdefault("iscrowd", 0)
    categories = _known(path, anns, column(anns, "category_id"), cat_ids,
                        "annotations with a category_id not in 'categories': ids")
    image_ids = _known(path, anns, column(anns, "image_id"), list(images),
                       "annotations of an image_id not in 'images': ids")
    boxes, have_boxes = _column(anns, "bbox")
    have_areas = _column(anns, "area")[1]
    if not (have_boxes and have_areas):
        # Decoding a segmentation is the slow part of a COCO file: only for the fields it must supply.
        for ann in anns:
            if "bbox" not in ann or "area" not in ann:
                _fill_from_segmentation(ann, images[ann["image_id"]])
        boxes = column(anns, "bbox")
    xywh = _box_array(boxes)
    if xywh is None:
        bad = [a["id"] for a, box in zip(anns, boxes, strict=True) if not _is_box(box)]
        raise AnnotationError(path, f"annotations without a valid [x, y, w, h] bbox: {format_ids(bad)}")
    if not have_areas:
        for ann in anns:
            if "area" not in ann:
                box = ann["bbox"]
                ann["area"] = float(box[2] * box[3])
    return AnnotationColumns(np.asarray(ids, dtype=np.int64).reshape(-1), image_ids, categories, xywh)


def _known(path: Path, anns: list[dict[str, Any]], values: list[Any], keys: list[int], message: str):
    """``values`` as int64, every one in ``keys``; else an AnnotationError listing the annotations' ids."""
    known = np.sort(np.asarray(keys, dtype=np.int64))
    array = None
    if set(map(type, values)) <= {int}:
        try:
            array = np.asarray(values, dtype=np.int64)
        except OverflowError:
            array = None
    if array is not None and len(known):
        at = np.minimum(np.searchsorted(known, array), len(known) - 1)
        bad = np.flatnonzero(known[at] != array)
    elif array is not None:
        bad = np.arange(len(array))
    else:  # non-integer ids somewhere: the slow way, one by one
        key_set = set(keys)
        bad = [i for i, v in enumerate(values) if type(v) is not int or v not in key_set]
    if len(bad):
        raise AnnotationError(path, f"{message} {format_ids(anns[i]['id'] for i in bad)}")
    return array if array is not None else np.zeros(0, np.int64)


def _fill_from_segmentation(ann: dict[str, Any], img: dict[str, Any]) -> None:
    segm = ann.get("segmentation")
    rle = segmentation_rle(segm, img.get("height"), img.get("width")) if segm else None
    if rle is None:
        return
    if "bbox" not in ann:
        ann["bbox"] = [float(v) for v in mask_utils.toBbox(rle)]
    if "area" not in ann:
        ann["area"] = float(mask_utils.area(rle))


def _box_array(boxes: list[Any]) -> np.ndarray | None:
    """float64 [A, 4] when every box is a list of four finite int or float values, else None."""
    try:  # ragged lists, None, dicts and words fail here
        array = np.array(boxes, dtype=np.float64).reshape(-1, 4) if boxes else np.zeros((0, 4))
    except (TypeError, ValueError, OverflowError):
        return None
    if array.shape != (len(boxes), 4) or not np.isfinite(array).all():
        return None
    # numpy converted what JSON should not hold in a box: true/false, numbers written as strings
    return array if set(map(type, chain.from_iterable(boxes))) <= {int, float} else None


def _is_box(box: Any) -> bool:
    return isinstance(box, list) and len(box) == 4 and all(_is_number(v) for v in box)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def segmentation_rle(segm: Any, height: int | None, width: int | None) -> dict[str, Any] | None:
    """Polygons / uncompressed RLE / RLE -> one RLE; None when it cannot be decoded (reported elsewhere)."""
    if not height or not width:
        return None
    try:
        if isinstance(segm, list):
            polygons = [p for p in segm if isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0]
            if not polygons or len(polygons) != len(segm):
                return None
            return mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
        if isinstance(segm, dict) and isinstance(segm.get("counts"), list):
            return mask_utils.frPyObjects(segm, height, width)
        if isinstance(segm, dict) and "counts" in segm and list(segm.get("size", [])) == [height, width]:
            return segm
    except (TypeError, ValueError, OverflowError):
        return None
    return None
