"""``visiondet data check``: everything wrong with a COCO-style dataset, in one report, before training.

Unlike ``load_coco`` (which stops at the first problem), the check reads the raw JSON and every image and
collects all findings. Severity says what training would do:

- error: training would fail, or silently lose data (missing or unreadable images, unknown category or
  image ids, duplicate ids, unsafe file names, boxes dropped as degenerate, images whose size matches
  neither the raw nor the EXIF-rotated pixels);
- warning: training works but something is probably not what you meant (boxes clipped at the border,
  categories without annotations, unusable masks);
- note: what the loader will do for you (defaults filled in, images kept as negatives, EXIF rotation).
"""

from __future__ import annotations

import os
import posixpath
from collections import Counter, defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from itertools import chain
from pathlib import Path
from typing import Any

import torch
from torchvision.ops import box_convert

from .cocofile import AnnotationError, may_be_unsafe, paused_gc, read_json, safe_join, segmentation_rle
from .images import IMAGE_EXTENSIONS, ImageError, exif_for_size, read_header, read_raw

__all__ = ["CheckReport", "Finding", "check_dataset"]

_OUT_OF_BOUNDS_TOLERANCE = 0.5  # pixels: rounding in exporters is not worth a warning
_EXAMPLES = 10
_CHUNK = 64  # images per thread-pool task


@dataclass
class Finding:
    severity: str  # "error" | "warning" | "note"
    code: str  # stable identifier for scripts, e.g. "missing_image"
    message: str  # what it means, one sentence
    count: int
    examples: list[str] = field(default_factory=list)  # up to 10 ids / file names


@dataclass
class CheckReport:
    annotations: str
    images: str
    num_images: int = 0
    num_annotations: int = 0
    num_crowd: int = 0
    categories: list[dict[str, Any]] = field(default_factory=list)  # id, name, instances, images
    instance_unit: str = "instances"  # what a category's "instances" count (mask folders: pixels)
    totals: str | None = None  # the line of totals, where the layout is not COCO's
    findings: list[Finding] = field(default_factory=list)

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "error"]

    @property
    def ok(self) -> bool:
        """True when training on the dataset neither fails nor silently loses data."""
        return not self.errors

    def add(self, severity: str, code: str, message: str, examples: list[Any]) -> None:
        if examples:
            shown = [str(e) for e in examples[:_EXAMPLES]]
            self.findings.append(Finding(severity, code, message, len(examples), shown))

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}

    def to_text(self) -> str:
        lines = [
            f"Annotations: {self.annotations}",
            f"Images:      {self.images}",
            self.totals or f"{self.num_images} images, {self.num_annotations} annotations ({self.num_crowd} "
            f"crowd), {len(self.categories)} categories",
        ]
        if self.categories:
            width = max(len(str(c["name"])) for c in self.categories)
            unit = self.instance_unit
            lines += ["", f"  {'id':>6}  {'name':<{width}}  {unit:>9}  {'images':>6}"]
            lines += [
                f"  {c['id']:>6}  {c['name']:<{width}}  {c['instances']:>9}  {c['images']:>6}"
                for c in self.categories
            ]
        for severity, title in (("error", "Errors"), ("warning", "Warnings"), ("note", "Notes")):
            found = [f for f in self.findings if f.severity == severity]
            if found:
                lines += ["", f"{title}:"]
                for f in found:
                    more = ", ..." if f.count > len(f.examples) else ""
                    lines.append(f"  {f.count} x {f.message}: {', '.join(f.examples)}{more}")
        verdict = "OK" if self.ok else f"FAILED ({len(self.errors)} kinds of error)"
        lines += ["", f"Result: {verdict}"]
        return "\n".join(lines)


def check_dataset(
    annotations: str | os.PathLike,
    images: str | os.PathLike,
    *,
    decode: bool = True,
    workers: int | None = None,
    progress: Callable[[Any], Any] | None = None,
) -> CheckReport:
    """Check a COCO instances JSON against its image folder.

    Args:
        decode: decode every image (finds truncated files); False reads headers only (much faster).
        workers: threads for reading images (decoding releases the GIL); default: CPU count.
        progress: optional wrapper for the image iterator, e.g. ``tqdm``.

    Raises:
        AnnotationError: the JSON cannot be read at all (not a file, not JSON, not a COCO object).
    """
    path = Path(annotations)
    root = Path(images)
    with paused_gc():  # millions of new objects and no cycle: see cocofile.paused_gc
        report, imgs = _check_json(path, root)
    # image files last, with the collector on again (image decoders may leave cycles behind)
    _check_files(report, imgs, root, decode=decode, workers=workers, progress=progress)
    return report


def _check_json(path: Path, root: Path) -> tuple[CheckReport, dict[Any, dict[str, Any]]]:
    data = read_json(path)
    for key in ("images", "categories"):
        if not isinstance(data.get(key), list):
            raise AnnotationError(path, f"no {key!r} list; is this a COCO instances file?")
    report = CheckReport(str(path), str(root))
    anns = data.get("annotations") or []
    if not isinstance(anns, list):
        raise AnnotationError(path, "'annotations' is not a list")
    cat_ids = _check_categories(report, data["categories"])
    imgs = _check_images(report, data["images"], root)
    _check_annotations(report, anns, imgs, cat_ids)
    return report, imgs


def _entries(report: CheckReport, items: list[Any], what: str) -> list[dict[str, Any]]:
    bad = [i for i, e in enumerate(items) if not isinstance(e, dict)]
    report.add("error", f"malformed_{what}", f"{what} entries that are not JSON objects (positions)", bad)
    return [e for e in items if isinstance(e, dict)]


def _check_categories(report: CheckReport, categories: list[Any]) -> dict[Any, str]:
    categories = _entries(report, categories, "category")
    ids = [c.get("id") for c in categories]
    not_int = [i for i in ids if not _is_int(i)]
    report.add("error", "bad_category_id", "categories without an integer id", not_int)
    report.add("error", "duplicate_category_id", "duplicate category ids", _duplicates(ids))
    report.add("note", "category_without_name", "categories without a name (named by their id)",
               [c.get("id") for c in categories if not c.get("name")])
    if not categories:
        report.add("error", "no_categories", "no categories declared", ["categories"])
    return {c.get("id"): str(c.get("name") or c.get("id")) for c in categories if _is_int(c.get("id"))}


def _check_images(report: CheckReport, images: list[Any], root: Path) -> dict[Any, dict[str, Any]]:
    images = _entries(report, images, "image")
    report.num_images = len(images)
    ids = [img.get("id") for img in images]
    report.add("error", "bad_image_id", "images without an integer id", [i for i in ids if not _is_int(i)])
    report.add("error", "duplicate_image_id", "duplicate image ids (all but one is lost)", _duplicates(ids))
    names = [img.get("file_name") for img in images]
    report.add("error", "no_file_name", "images without a file_name (ids)",
               [img.get("id") for img in images if not isinstance(img.get("file_name"), str)])
    report.add("warning", "duplicate_file_name", "file names listed by more than one image entry",
               _duplicates([n for n in names if isinstance(n, str)]))
    unsafe = []
    for img in images:
        name = img.get("file_name")
        if not isinstance(name, str):
            continue
        if may_be_unsafe(name):
            try:
                safe_join(root, name)
            except ValueError as exc:
                unsafe.append(f"image {img.get('id')}: {exc}")
                continue
        # the name relative to the root, as the folder walk below spells it (str: no Path per image)
        img["_rel"] = posixpath.normpath(name.replace("\\", "/"))
    report.add("error", "unsafe_file_name", "file names outside the image folder (refused)", unsafe)
    no_size = [img.get("id") for img in images if not _has_size(img)]
    report.add("note", "missing_size", "images without width/height (read from the file instead)", no_size)
    return {img["id"]: img for img in images if _is_int(img.get("id"))}


def _check_annotations(report: CheckReport, anns: list[Any], imgs: dict[Any, dict], cat_ids: dict[Any, str]):
    anns = _entries(report, anns, "annotation")
    report.num_annotations = len(anns)
    ids = [a.get("id") for a in anns if "id" in a]
    report.add("error", "duplicate_annotation_id", "duplicate annotation ids (break COCO evaluation)",
               _duplicates(ids))
    report.add("note", "missing_annotation_id", "annotations without an id (numbered on loading; positions)",
               [i for i, a in enumerate(anns) if "id" not in a])
    found: dict[str, list[Any]] = defaultdict(list)
    instances, images_of = Counter(), defaultdict(set)
    sized: list[tuple[Any, list[float], dict[str, Any]]] = []  # boxes of images with a size, checked at once
    for position, ann in enumerate(anns):
        name = ann.get("id", f"#{position}")
        img = imgs.get(_key(ann.get("image_id")))
        if img is None:
            found["unknown_image"].append(name)
        if _key(ann.get("category_id")) not in cat_ids:
            found["unknown_category"].append(f"{name} (category {ann.get('category_id')!r})")
        else:
            instances[ann["category_id"]] += 1
            images_of[ann["category_id"]].add(ann.get("image_id"))
        for key in ("iscrowd", "area"):
            if key not in ann:
                found[f"missing_{key}"].append(name)
        if ann.get("iscrowd"):
            report.num_crowd += 1
        if img is not None:
            img.setdefault("_anns", []).append(ann)
        segm = ann.get("segmentation")
        has_size = img is not None and _has_size(img)
        if segm and has_size and segmentation_rle(segm, img["height"], img["width"]) is None:
            found["bad_segmentation"].append(name)
        box = ann.get("bbox")
        if not (isinstance(box, list) and len(box) == 4 and all(_is_number(v) for v in box)):
            found["no_bbox" if segm else "bad_bbox"].append(name)
            continue
        if has_size:
            sized.append((name, box, img))
    _check_boxes(found, sized)
    _report_annotation_findings(report, found)
    report.categories = [
        {"id": cid, "name": cname, "instances": instances[cid], "images": len(images_of[cid])}
        for cid, cname in sorted(cat_ids.items(), key=lambda kv: kv[0])
    ]
    report.add("warning", "unused_category", "categories without any annotation",
               [f"{c['id']} ({c['name']})" for c in report.categories if not c["instances"]])


def _check_boxes(found: dict[str, list[Any]], sized: list[tuple[Any, list[float], dict[str, Any]]]) -> None:
    """Sort (name, COCO [x, y, w, h] box, image) triples into the box findings, in one pass over arrays."""
    if not sized:
        return
    xywh = torch.tensor([box for _, box, _ in sized], dtype=torch.float64)
    size = torch.tensor([(img["width"], img["height"]) for _, _, img in sized], dtype=torch.float64)
    xyxy = box_convert(xywh, "xywh", "xyxy")
    clipped = torch.cat([xyxy[:, :2].clamp(min=0), torch.minimum(xyxy[:, 2:], size)], dim=1)
    extent = clipped[:, 2:] - clipped[:, :2]
    tol = _OUT_OF_BOUNDS_TOLERANCE
    # three different mistakes, each named as it is: a 20x20 box past the border is not "under 1 px"
    negative = (xywh[:, 2:] <= 0).any(dim=1)
    outside = ~negative & (extent <= 0).any(dim=1)
    degenerate = ~negative & ~outside & (extent < 1).any(dim=1)
    past_border = (xyxy[:, :2] < -tol).any(dim=1) | (xyxy[:, 2:] > size + tol).any(dim=1)
    out_of_bounds = ~negative & ~outside & ~degenerate & past_border
    for i in negative.nonzero().flatten().tolist():
        _, (_, _, w, h), _ = sized[i]
        found["negative_box_size"].append(f"{_where(*sized[i])}: {w:g} x {h:g}")
    for i in outside.nonzero().flatten().tolist():
        _, (x, y, w, h), img = sized[i]
        found["box_outside_image"].append(f"{_where(*sized[i])}: [{x:g}, {y:g}, {w:g}, {h:g}] in "
                                          f"{img['width']}x{img['height']}")
    found["degenerate_box"].extend(_where(*sized[i]) for i in degenerate.nonzero().flatten().tolist())
    found["box_out_of_bounds"].extend(_where(*sized[i]) for i in out_of_bounds.nonzero().flatten().tolist())


def _where(name: Any, box: list[float], img: dict[str, Any]) -> str:
    return f"{name} ({img.get('file_name')})"


_ANNOTATION_FINDINGS = {
    "unknown_image": ("error", "annotations of an image id not in 'images' (ids)"),
    "unknown_category": ("error", "annotations with a category id not in 'categories' (ids)"),
    "bad_bbox": ("error", "annotations without a valid [x, y, w, h] bbox (ids)"),
    "negative_box_size": ("error", "boxes of zero or negative width or height: dropped by training (ids)"),
    "box_outside_image": ("error", "boxes lying wholly outside their image: dropped by training (ids)"),
    "degenerate_box": ("error", "boxes under 1 px wide or high inside the image: dropped by training (ids)"),
    "box_out_of_bounds": ("warning", "boxes reaching outside the image: clipped by training (ids)"),
    "bad_segmentation": ("warning", "unusable segmentations: mask training would refuse them (ids)"),
    "no_bbox": ("note", "annotations without a bbox (taken from the mask; ids)"),
    "missing_iscrowd": ("note", "annotations without iscrowd (0 assumed; ids)"),
    "missing_area": ("note", "annotations without area (computed; ids)"),
}


def _report_annotation_findings(report: CheckReport, found: dict[str, list[Any]]) -> None:
    for code, (severity, message) in _ANNOTATION_FINDINGS.items():
        report.add(severity, code, message, found.get(code, []))


def _check_files(report: CheckReport, imgs: dict[Any, dict], root: Path, *, decode: bool, workers: int | None,
                 progress: Callable[[Any], Any] | None) -> None:
    if not root.is_dir():
        report.add("error", "no_image_folder", "image folder does not exist", [str(root)])
        return
    entries = [img for img in imgs.values() if "_rel" in img]
    folder = str(root)
    # Chunks, not one future per image: at 118k images the futures and their locks cost more main-thread
    # time than the header reads they wrap.
    chunks = [entries[i : i + _CHUNK] for i in range(0, len(entries), _CHUNK)]
    with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
        done = pool.map(lambda chunk: [_inspect(img, folder, decode) for img in chunk], chunks)
        results = chain.from_iterable(done)
        results = list(progress(results) if progress else results)
    found: dict[str, list[str]] = defaultdict(list)
    for code, detail in results:
        if code:
            found[code].append(detail)
    report.add("error", "missing_image", "image files that do not exist", found["missing_image"])
    report.add("error", "unreadable_image", "image files that cannot be decoded", found["unreadable_image"])
    report.add("error", "size_mismatch", "images whose size differs from the JSON (boxes would not line up)",
               found["size_mismatch"])
    report.add("note", "exif_rotated", "EXIF-rotated images annotated as displayed (rotated on loading)",
               found["exif_rotated"])
    report.add("note", "exif_raw", "EXIF-rotated images annotated on the stored pixels (loaded unrotated)",
               found["exif_raw"])
    negatives = [img["file_name"] for img in entries if not img.get("_anns")]
    crowd_only = [img["file_name"] for img in entries
                  if img.get("_anns") and all(a.get("iscrowd") for a in img["_anns"])]
    report.add("note", "no_annotations", "images without annotations (kept as negative samples)", negatives)
    report.add("note", "crowd_only", "images with only crowd annotations (negatives with ignore regions)",
               crowd_only)
    listed = {img["_rel"] for img in entries}
    extra = sorted(name for name in _image_files(folder) if name not in listed)
    report.add("note", "unlisted_image", "image files in the folder that the JSON does not list", extra)


def _image_files(root: str) -> list[str]:
    """Relative posix names of the image files under ``root`` (os.scandir: no Path object per file)."""
    found, stack = [], [""]
    while stack:
        prefix = stack.pop()
        with os.scandir(os.path.join(root, prefix) if prefix else root) as it:
            for entry in it:
                name = f"{prefix}/{entry.name}" if prefix else entry.name
                if entry.is_dir(follow_symlinks=False):
                    stack.append(name)
                elif os.path.splitext(entry.name)[1].lower() in IMAGE_EXTENSIONS:
                    found.append(name)
    return found


def _inspect(img: dict[str, Any], root: str, decode: bool) -> tuple[str | None, str]:
    """(finding code or None, detail) for one image entry."""
    path, name = os.path.join(root, img["_rel"]), img["file_name"]
    try:
        header = read_header(path)
        if decode:
            read_raw(path)
    except ImageError as exc:
        code = "missing_image" if exc.reason == "no such file" else "unreadable_image"
        return code, f"{name} ({exc.reason})"
    if not _has_size(img):
        return None, name
    width, height = img["width"], img["height"]
    use_exif = exif_for_size(header, width, height)
    if use_exif is None:
        w, h = header.oriented_size
        return "size_mismatch", f"{name} (file {w}x{h}, JSON {width}x{height})"
    if header.oriented_size != (header.width, header.height):
        return ("exif_rotated" if use_exif else "exif_raw"), name
    return None, name


def _duplicates(values: list[Any]) -> list[Any]:
    return [v for v, n in Counter(_key(v) for v in values if _key(v) is not None).items() if n > 1]


def _key(value: Any) -> Any:
    """The value if it can be an id (hashable scalar), else None: malformed JSON must not crash the check."""
    return value if isinstance(value, (int, float, str)) else None


def _has_size(img: dict[str, Any]) -> bool:
    return _is_int(img.get("width")) and _is_int(img.get("height"))


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value  # not NaN
