"""``visiondet data check`` for the two folder layouts: ImageFolder trees (classification) and images with
PNG index masks (segmentation, the VOC layout). The same :class:`~vision.data.check.CheckReport` as the COCO
check, with the same severities: an error is what training would refuse or silently lose.

- class folders (``root/<class>/<image>``, what vision/data/folder.py reads): images that cannot be decoded,
  class folders without images, images outside any class folder (never read), other files;
- mask folders (``images/<stem>.jpg`` + ``masks/<stem>.png``, what vision/data/segfolder.py reads): images
  without a mask, masks that are not single-channel index PNGs, masks whose size matches neither the raw
  nor the EXIF-rotated image, mask values outside 0..K and 255, classes no pixel has.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from .check import CheckReport
from .images import IMAGE_EXTENSIONS, ImageError, exif_for_size, read_header, read_raw
from .segfolder import read_mask
from .transforms import IGNORE_INDEX

__all__ = ["check_image_folder", "check_mask_folder"]

Progress = Callable[[Any], Any]


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file()


def _hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def _read(path: Path, decode: bool) -> str | None:
    """Why ``path`` cannot be used as an image, or None."""
    try:
        read_header(path)
        if decode:
            read_raw(path)
    except ImageError as exc:
        return exc.reason
    return None


def _map(fn: Callable[[Any], Any], items: list[Any], workers: int | None, progress: Progress | None
         ) -> list[Any]:
    with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
        results = pool.map(fn, items)
        return list(progress(results) if progress else results)


def check_image_folder(root: str | os.PathLike, *, decode: bool = True, workers: int | None = None,
                       progress: Progress | None = None) -> CheckReport:
    """Check an ImageFolder tree (``root/<class name>/<image>``) as the classification task reads it.

    Raises:
        FileNotFoundError: ``root`` is not a folder.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such folder")
    report = CheckReport(annotations=f"{root} (class folders)", images=str(root), instance_unit="images")
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    report.add("warning", "loose_image", "images beside the class folders, not in one (never read)",
               sorted(p.name for p in root.iterdir() if _is_image(p) and not p.name.startswith(".")))
    if not folders:
        report.add("error", "no_class_folders", "no class folders (expected <root>/<class name>/<image>)",
                   [str(root)])
        return report
    samples: list[tuple[Path, int]] = []
    others = []
    for label, folder in enumerate(folders):
        for path in sorted(folder.rglob("*")):
            if not path.is_file() or _hidden(path, folder):
                continue
            if path.suffix.lower() in IMAGE_EXTENSIONS:
                samples.append((path, label))
            else:
                others.append(str(path.relative_to(root)))
    report.num_images = report.num_annotations = len(samples)
    report.totals = f"{len(samples)} images in {len(folders)} class folders"
    reasons = _map(lambda s: _read(s[0], decode), samples, workers, progress)
    unreadable = [(path, why) for (path, _), why in zip(samples, reasons, strict=True) if why]
    report.add("error", "unreadable_image", "image files that cannot be decoded",
               [f"{path.relative_to(root)} ({why})" for path, why in unreadable])
    counts = Counter(label for _, label in samples)
    report.categories = [{"id": i, "name": f.name, "instances": counts[i], "images": counts[i]}
                         for i, f in enumerate(folders)]
    report.add("warning", "unused_category", "class folders without images (a class the model can never "
               "learn)", [f.name for i, f in enumerate(folders) if not counts[i]])
    if len(folders) < 2:
        report.add("error", "one_class", "fewer than 2 class folders (classification needs at least 2)",
                   [f.name for f in folders])
    report.add("note", "not_images", "files in class folders that are not images (skipped)", others)
    return report


def _mask_problem(image: Path, mask: Path, num_classes: int | None, decode: bool
                  ) -> tuple[str | None, str, np.ndarray | None]:
    """(finding code or None, detail, [K+2] pixel counts per label with IGNORE last, or None)."""
    try:
        header = read_header(image)
        if decode:
            read_raw(image)
    except ImageError as exc:
        return "unreadable_image", f"{image.name} ({exc.reason})", None
    try:
        values = read_mask(mask)
    except ImageError as exc:
        return "bad_mask", f"{mask.name} ({exc.reason})", None
    if exif_for_size(header, values.shape[1], values.shape[0]) is None:
        w, h = header.oriented_size
        mh, mw = values.shape
        return "size_mismatch", f"{image.name} is {w}x{h}, {mask.name} {mw}x{mh}", None
    labels, pixels = np.unique(values, return_counts=True)
    limit = num_classes if num_classes is not None else IGNORE_INDEX - 1
    wrong = labels[((labels < 0) | (labels > limit)) & (labels != IGNORE_INDEX)]
    if wrong.size:
        return "bad_mask_value", f"{mask.name} (values {wrong[:10].tolist()})", None
    counts = np.zeros(IGNORE_INDEX + 1, np.int64)
    counts[labels] = pixels
    return None, mask.name, counts


def check_mask_folder(images: str | os.PathLike, masks: str | os.PathLike,
                      classes: Sequence[str] | None = None, *, decode: bool = True,
                      workers: int | None = None, progress: Progress | None = None) -> CheckReport:
    """Check images with ``<stem>.png`` index masks as the segmentation task reads them; ``classes`` are
    the names of labels 1..K (``data.options.classes``). Without them, values up to 254 are taken as labels
    and the report lists those it found.

    Raises:
        FileNotFoundError: either folder does not exist.
    """
    images, masks = Path(images), Path(masks)
    for folder in (images, masks):
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder}: no such folder")
    report = CheckReport(annotations=f"{masks} (index masks)", images=str(images), instance_unit="pixels")
    by_stem = {p.stem: p for p in sorted(images.iterdir()) if _is_image(p) and not p.name.startswith(".")}
    mask_files = {p.stem: p for p in sorted(masks.glob("*.png")) if not p.name.startswith(".")}
    report.num_images = len(by_stem)
    pairs = [(by_stem[s], mask_files[s]) for s in by_stem if s in mask_files]
    report.num_annotations = len(pairs)
    report.totals = f"{len(by_stem)} images, {len(pairs)} with a mask"
    report.add("error", "missing_mask", "images without a <stem>.png mask (training refuses the folder)",
               [p.name for s, p in by_stem.items() if s not in mask_files])
    report.add("note", "unused_mask", "masks without an image (not used)",
               [p.name for s, p in mask_files.items() if s not in by_stem])
    if not by_stem:
        report.add("error", "no_images", "no images in the image folder", [str(images)])
    num = len(classes) if classes else None
    results = _map(lambda pair: _mask_problem(*pair, num, decode), pairs, workers, progress)
    found: dict[str, list[str]] = {}
    totals, present = np.zeros(IGNORE_INDEX + 1, np.int64), np.zeros(IGNORE_INDEX + 1, np.int64)
    empty = []
    for code, detail, counts in results:
        if code:
            found.setdefault(code, []).append(detail)
            continue
        totals += counts
        present += counts > 0
        if not counts[1:IGNORE_INDEX].any():
            empty.append(detail)
    report.add("error", "unreadable_image", "image files that cannot be decoded",
               found.get("unreadable_image", []))
    report.add("error", "bad_mask", "masks that cannot be read as single-channel index PNGs",
               found.get("bad_mask", []))
    report.add("error", "size_mismatch", "masks whose size differs from their image's (raw and EXIF-rotated)",
               found.get("size_mismatch", []))
    limit = f"0..{num} or {IGNORE_INDEX}" if num else f"0..{IGNORE_INDEX - 1} or {IGNORE_INDEX}"
    report.add("error", "bad_mask_value", f"masks with values outside {limit} (training refuses them)",
               found.get("bad_mask_value", []))
    report.add("note", "no_labels", "masks with only background and ignore (kept as negatives)", empty)
    if classes:
        names = list(classes)
    else:
        highest = int(np.nonzero(totals[:IGNORE_INDEX])[0].max(initial=0))
        names = [str(k) for k in range(1, highest + 1)]
        report.add("note", "no_class_names", "no class names given (--classes): labels named by their value",
                   ["--classes"])
    rows = [("background", 0), *((name, k + 1) for k, name in enumerate(names)), ("ignore", IGNORE_INDEX)]
    report.categories = [{"id": k, "name": name, "instances": int(totals[k]), "images": int(present[k])}
                         for name, k in rows]
    report.add("warning", "unused_category", "classes without any pixel",
               [f"{k + 1} ({name})" for k, name in enumerate(names) if not totals[k + 1]])
    return report
