"""Pascal VOC XML and YOLO txt datasets to COCO JSON, and back (``visiondet data convert``).

Conventions, so that a round trip gives the same numbers back:

- VOC boxes are 1-based inclusive pixel indices: ``xmin=1, xmax=10`` covers the first ten pixels, which
  is COCO ``x=0, w=10``. ``difficult`` objects become ``iscrowd: 1`` (ignored by training and by COCO
  evaluation, as VOC evaluation ignores them) and go back to ``difficult`` 1.
- YOLO lines are ``class cx cy w h`` normalised to the image size (or ``class x1 y1 x2 y2 ...`` polygons,
  the segment format). Category ids keep the YOLO class index, 0 included. Images without a label file
  are negatives. Sizes come from the image files with EXIF applied, as Ultralytics reads them.
"""

from __future__ import annotations

import json
import os
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import yaml
from torchvision.ops import box_convert

from .cocofile import load_coco, safe_join
from .images import IMAGE_EXTENSIONS, image_size

__all__ = [
    "ConversionError",
    "coco_to_voc",
    "coco_to_yolo",
    "read_names",
    "voc_to_coco",
    "write_json",
    "yolo_to_coco",
]


class ConversionError(ValueError):
    """A source file that cannot be converted; ``str(err)`` is ``"<path>: <reason>"``."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path, self.reason = str(path), reason
        super().__init__(f"{self.path}: {reason}")

    def __reduce__(self):
        return type(self), (self.path, self.reason)


def read_names(path: str | os.PathLike) -> list[str]:
    """Class names from a YOLO ``data.yaml`` (``names``: list or ``{index: name}``) or a text file."""
    path = Path(path)
    if not path.is_file():
        raise ConversionError(path, "no such names file")
    if path.suffix.lower() in (".yaml", ".yml"):
        names = (yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get("names")
        if isinstance(names, dict):
            if sorted(names) != list(range(len(names))):
                raise ConversionError(path, "'names' keys must be 0..K-1")
            names = [names[i] for i in range(len(names))]
        if not isinstance(names, list) or not names:
            raise ConversionError(path, "no 'names' list in the YAML file")
        return [str(n) for n in names]
    names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not names:
        raise ConversionError(path, "no class names")
    return names


def voc_to_coco(
    annotations_dir: str | os.PathLike,
    *,
    images_dir: str | os.PathLike | None = None,
    classes: Sequence[str] | None = None,
    split_file: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Read ``<annotations_dir>/*.xml`` (or the stems in ``split_file``) into a COCO instances dict.

    ``classes`` fixes the category order (ids 1..K); by default the names found, sorted. ``images_dir`` is
    needed only when an XML lacks its ``<size>``.
    """
    annotations_dir = Path(annotations_dir)
    if split_file is not None:
        stems = [s.strip() for s in Path(split_file).read_text().splitlines() if s.strip()]
        files = [annotations_dir / f"{s}.xml" for s in stems]
    else:
        files = sorted(annotations_dir.glob("*.xml"))
    if not files:
        raise ConversionError(annotations_dir, "no .xml annotation files")
    parsed = [_parse_voc(f, images_dir) for f in files]
    names = list(classes) if classes else sorted({o["name"] for p in parsed for o in p["objects"]})
    category = {name: i + 1 for i, name in enumerate(names)}
    images, annotations = [], []
    for image_id, (file, p) in enumerate(zip(files, parsed, strict=True), start=1):
        images.append(
            {"id": image_id, "file_name": p["filename"], "width": p["width"], "height": p["height"]}
        )
        for obj in p["objects"]:
            if obj["name"] not in category:
                raise ConversionError(file, f"object class {obj['name']!r} is not in the class list {names}")
            xmin, ymin, xmax, ymax = obj["box"]
            bbox = [xmin - 1, ymin - 1, xmax - xmin + 1, ymax - ymin + 1]
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id, "category_id": category[obj["name"]],
                "bbox": bbox, "area": bbox[2] * bbox[3], "iscrowd": int(obj["difficult"]),
            })
    return _coco(images, annotations, [{"id": i + 1, "name": n} for i, n in enumerate(names)], "Pascal VOC")


def _parse_voc(path: Path, images_dir: str | os.PathLike | None) -> dict[str, Any]:
    if not path.is_file():
        raise ConversionError(path, "no such annotation file")
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as exc:
        raise ConversionError(path, f"not valid XML ({exc})") from None
    filename = (root.findtext("filename") or "").strip() or f"{path.stem}.jpg"
    width, height = _int(root.findtext("size/width")), _int(root.findtext("size/height"))
    if not width or not height:
        if images_dir is None:
            raise ConversionError(path, "no <size> in the XML; give --images to read it from the image")
        width, height = image_size(Path(images_dir) / filename)
    objects = []
    for i, obj in enumerate(root.iter("object")):
        name = (obj.findtext("name") or "").strip()
        try:
            box = [_number(obj.findtext(f"bndbox/{k}")) for k in ("xmin", "ymin", "xmax", "ymax")]
        except (TypeError, ValueError):
            raise ConversionError(path, f"object {i} ({name or 'no name'}): bad <bndbox>") from None
        if not name:
            raise ConversionError(path, f"object {i}: no <name>")
        objects.append({"name": name, "box": box, "difficult": _int(obj.findtext("difficult")) or 0})
    return {"filename": filename, "width": width, "height": height, "objects": objects}


def coco_to_voc(annotations: str | os.PathLike, out_dir: str | os.PathLike) -> list[Path]:
    """Write one VOC XML per image of a COCO file into ``out_dir``; returns the files written."""
    coco = load_coco(annotations)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = {c["id"]: c["name"] for c in coco.dataset["categories"]}
    written = []
    for image_id in sorted(coco.imgs):
        img = coco.imgs[image_id]
        root = ET.Element("annotation")
        ET.SubElement(root, "filename").text = img["file_name"]
        size = ET.SubElement(root, "size")
        for key, value in (("width", img["width"]), ("height", img["height"]), ("depth", 3)):
            ET.SubElement(size, key).text = str(value)
        ET.SubElement(root, "segmented").text = "0"
        for ann in coco.imgToAnns[image_id]:
            x, y, w, h = ann["bbox"]
            obj = ET.SubElement(root, "object")
            ET.SubElement(obj, "name").text = names[ann["category_id"]]
            ET.SubElement(obj, "pose").text = "Unspecified"
            ET.SubElement(obj, "truncated").text = "0"
            ET.SubElement(obj, "difficult").text = str(int(ann["iscrowd"]))
            box = ET.SubElement(obj, "bndbox")
            for key, value in (("xmin", x + 1), ("ymin", y + 1), ("xmax", x + w), ("ymax", y + h)):
                ET.SubElement(box, key).text = _format(value)
        ET.indent(root)
        path = out_dir / f"{Path(img['file_name']).stem}.xml"
        ET.ElementTree(root).write(path, encoding="utf-8")
        written.append(path)
    return written


def yolo_to_coco(
    images_dir: str | os.PathLike, labels_dir: str | os.PathLike, names: Sequence[str]
) -> dict[str, Any]:
    """Read YOLO labels (``<labels_dir>/<image stem>.txt``) for every image under ``images_dir``."""
    images_dir, labels_dir = Path(images_dir), Path(labels_dir)
    files = sorted(p for p in images_dir.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not files:
        raise ConversionError(images_dir, f"no images ({', '.join(IMAGE_EXTENSIONS)})")
    images, annotations = [], []
    for image_id, file in enumerate(files, start=1):
        relative = file.relative_to(images_dir)
        width, height = image_size(file)
        images.append({"id": image_id, "file_name": relative.as_posix(), "width": width, "height": height})
        label_file = (labels_dir / relative).with_suffix(".txt")
        if not label_file.is_file():
            continue  # YOLO's convention for background images
        for line_no, line in enumerate(label_file.read_text(encoding="utf-8").splitlines(), start=1):
            if line.strip():
                ann = _yolo_line(line, f"{label_file}:{line_no}", len(names), width, height)
                annotations.append({"id": len(annotations) + 1, "image_id": image_id, **ann})
    return _coco(images, annotations, [{"id": i, "name": n} for i, n in enumerate(names)], "YOLO")


def unmatched_yolo_labels(images_dir: str | os.PathLike, labels_dir: str | os.PathLike) -> list[Path]:
    """Label files under ``labels_dir`` with no image of the same relative stem under ``images_dir``.

    :func:`yolo_to_coco` starts from the images, so these would be dropped without a word: a renamed or
    deleted image, or ``--images`` pointing at the wrong split.
    """
    images_dir, labels_dir = Path(images_dir), Path(labels_dir)
    stems = {p.relative_to(images_dir).with_suffix("") for p in images_dir.rglob("*")
             if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()}
    labels = (p for p in labels_dir.rglob("*.txt") if p.is_file() and p.name != "classes.txt")
    return sorted(p for p in labels if p.relative_to(labels_dir).with_suffix("") not in stems)


def _yolo_line(line: str, where: str, num_classes: int, width: int, height: int) -> dict[str, Any]:
    fields = line.split()
    try:
        cls, values = int(fields[0]), [float(v) for v in fields[1:]]
    except ValueError:
        raise ConversionError(where, f"not a YOLO label line: {line.strip()!r}") from None
    if not 0 <= cls < num_classes:
        raise ConversionError(where, f"class {cls} is outside 0..{num_classes - 1} ({num_classes} names)")
    if len(values) < 4 or (len(values) > 4 and (len(values) % 2 or len(values) < 6)):
        raise ConversionError(
            where, f"expected 'class cx cy w h' or a polygon 'class x1 y1 x2 y2 x3 y3 ...': {line.strip()!r}"
        )
    if any(v < -0.01 or v > 1.01 for v in values):
        raise ConversionError(where, "coordinates must be normalised to 0..1")
    if len(values) == 4:
        xywh = box_convert(torch.tensor(values, dtype=torch.float64), "cxcywh", "xywh")
        bbox = (xywh * torch.tensor([width, height] * 2, dtype=torch.float64)).tolist()
        return {"category_id": cls, "bbox": bbox, "area": bbox[2] * bbox[3], "iscrowd": 0}
    xs = [v * width for v in values[0::2]]
    ys = [v * height for v in values[1::2]]
    polygon = [c for xy in zip(xs, ys, strict=True) for c in xy]
    xyxy = torch.tensor([min(xs), min(ys), max(xs), max(ys)], dtype=torch.float64)
    bbox = box_convert(xyxy, "xyxy", "xywh").tolist()
    area = 0.5 * abs(sum(xs[i] * ys[i - 1] - xs[i - 1] * ys[i] for i in range(len(xs))))  # shoelace
    return {"category_id": cls, "bbox": bbox, "area": area, "segmentation": [polygon], "iscrowd": 0}


def coco_to_yolo(annotations: str | os.PathLike, out_dir: str | os.PathLike) -> list[str]:
    """Write ``<out_dir>/<image stem>.txt`` box labels and ``<out_dir>/classes.txt``; return the names.

    YOLO classes are 0..K-1 in ascending category id (``CategoryMap`` order); crowd regions are skipped.
    """
    coco = load_coco(annotations)
    out_dir = Path(out_dir)
    categories = sorted(coco.dataset["categories"], key=lambda c: c["id"])
    index = {c["id"]: i for i, c in enumerate(categories)}
    for image_id in sorted(coco.imgs):
        img = coco.imgs[image_id]
        width, height = img["width"], img["height"]
        anns = [ann for ann in coco.imgToAnns[image_id] if not ann["iscrowd"]]
        # YOLO rows: class, then the box centre and size as fractions of the image
        xywh = torch.tensor([ann["bbox"] for ann in anns], dtype=torch.float64).reshape(-1, 4)
        boxes = box_convert(xywh, "xywh", "cxcywh") / torch.tensor([width, height] * 2, dtype=torch.float64)
        lines = [f"{index[ann['category_id']]} " + " ".join(f"{v:.6f}" for v in values)
                 for ann, values in zip(anns, boxes.tolist(), strict=True)]
        path = safe_join(out_dir, img["file_name"]).with_suffix(".txt")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    names = [str(c["name"]) for c in categories]
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "classes.txt").write_text("".join(n + "\n" for n in names), encoding="utf-8")
    return names


def write_json(data: dict[str, Any], path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f)
    return path


def _coco(images: list, annotations: list, categories: list, source: str) -> dict[str, Any]:
    return {"info": {"description": f"converted from {source} by visiondet"}, "licenses": [],
            "images": images, "annotations": annotations, "categories": categories}


def _int(text: str | None) -> int | None:
    try:
        return int(float(text)) if text is not None and text.strip() else None
    except ValueError:
        return None


def _number(text: str | None) -> float | int:
    value = float(text)  # TypeError for None, ValueError for junk: the caller names the object
    return int(value) if value.is_integer() else value


def _format(value: float) -> str:
    return str(int(round(value))) if abs(value - round(value)) < 1e-6 else f"{value:.2f}"
