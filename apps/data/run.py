"""The jobs behind `visiondet data check|convert|preview`: one options dataclass and one function each.

Each ``run_*`` returns the exit code (0 fine, 1 the data has problems) and raises AnnotationError,
ConversionError, ImageError, FileNotFoundError or ValueError for input it cannot read at all (the command
turns those into exit code 2).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from tqdm import tqdm

from apps.data.anchors import anchor_check, anchor_report_dict, detector_config, format_anchor_report
from vision.data import convert
from vision.data.check import check_dataset
from vision.data.check_folders import check_image_folder, check_mask_folder
from vision.data.preview import make_preview, preview_dataset
from vision.data.transforms import build_transforms

__all__ = ["CheckOptions", "ConvertOptions", "PreviewOptions", "run_check", "run_convert", "run_preview"]


@dataclass
class CheckOptions:
    annotations: str | None = None  # COCO JSON (with images)
    images: str | None = None  # the COCO file's image folder, or the images of a mask folder
    root: str | None = None  # an ImageFolder tree instead (classification)
    masks: str | None = None  # a folder of <stem>.png index masks beside images (segmentation)
    classes: str | None = None  # mask folders: names of labels 1..K (a classes.txt / data.yaml, or a,b,c)
    json: bool = False  # print the report as JSON
    headers_only: bool = False  # image headers only (fast; does not find truncated files)
    workers: int | None = None  # threads reading images (None: the CPUs)
    config: str | None = None  # detection config whose anchors to measure (None: the default Faster R-CNN)
    anchors: bool = True  # the anchor section


def run_check(opts: CheckOptions) -> int:
    """Validate a dataset (COCO JSON and its images, class folders, or images with index masks) and print
    the report; 1 when it found errors."""
    layouts = [opts.annotations is not None, opts.root is not None, opts.masks is not None]
    if sum(layouts) != 1 or (opts.root is None and opts.images is None):
        raise ValueError("data check takes one dataset: --annotations with --images (COCO), --root (class "
                         "folders) or --images with --masks (index masks)")
    coco = opts.annotations is not None
    if coco and opts.anchors:  # a bad --config fails before the images are read
        detector_config(opts.config)
    progress = lambda items: tqdm(items, desc="images", unit="img",  # noqa: E731
                                  disable=opts.json or not sys.stderr.isatty())
    settings = {"decode": not opts.headers_only, "workers": opts.workers, "progress": progress}
    if opts.root is not None:
        report = check_image_folder(opts.root, **settings)
    elif opts.masks is not None:
        report = check_mask_folder(opts.images, opts.masks, _class_names(opts.classes), **settings)
    else:
        report = check_dataset(opts.annotations, opts.images, **settings)
    anchors = _anchors(opts) if coco and opts.anchors else None
    if opts.json:
        print(json.dumps({**report.to_dict(), **({"anchors": anchors[1]} if anchors else {})}, indent=2))
    else:
        print(report.to_text() + (f"\n{anchors[0]}" if anchors else ""))
    return 0 if report.ok else 1


def _class_names(spec: str | None) -> list[str] | None:
    """``--classes``: a names file (classes.txt, data.yaml) or the names themselves, comma-separated."""
    if spec is None:
        return None
    if Path(spec).is_file():
        return convert.read_names(spec)
    names = [name.strip() for name in spec.split(",") if name.strip()]
    if not names:
        raise ValueError(f"--classes {spec!r}: no class names (give a classes.txt file or a,b,c)")
    return names


def _anchors(opts: CheckOptions) -> tuple[str, dict[str, Any]] | None:
    """The anchor section (text, dict), or None when the file gives no boxes (the check says why)."""
    try:
        report = anchor_check(opts.annotations, opts.config)
    except (OSError, ValueError, KeyError, TypeError):  # an unreadable file: the check above reports it
        return None
    if report is None:
        return None
    source = detector_config(opts.config)[1]
    command = (None if opts.config else
               f"visiondet data check --annotations {opts.annotations} --images {opts.images}")
    return format_anchor_report(report, source, command), anchor_report_dict(report, source)


@dataclass
class ConvertOptions:
    source: str  # voc, yolo or coco
    out: str
    target: str = "coco"  # coco, voc or yolo
    annotations: str | None = None  # VOC: folder of XML files; COCO: the JSON file
    images: str | None = None
    labels: str | None = None  # YOLO: folder of <image stem>.txt label files
    names: str | None = None  # YOLO: data.yaml or classes.txt; VOC: fixes the class order
    split: str | None = None  # VOC: image set file listing the stems to convert


def run_convert(opts: ConvertOptions) -> int:
    """VOC or YOLO to COCO JSON, or COCO to VOC or YOLO; 1 when YOLO label files matched no image."""
    def need(*names: str) -> None:
        missing = [f"--{n}" for n in names if getattr(opts, n) is None]
        if missing:
            raise ValueError(f"--from {opts.source} --to {opts.target} needs {', '.join(missing)}")

    if (opts.source == "coco") == (opts.target == "coco"):
        raise ValueError("convert goes from voc or yolo to coco, or from coco to voc or yolo")
    orphans: list[Path] = []
    if opts.source == "voc":
        need("annotations")
        classes = convert.read_names(opts.names) if opts.names else None
        data = convert.voc_to_coco(opts.annotations, images_dir=opts.images, classes=classes,
                                   split_file=opts.split)
    elif opts.source == "yolo":
        need("images", "labels", "names")
        data = convert.yolo_to_coco(opts.images, opts.labels, convert.read_names(opts.names))
        orphans = convert.unmatched_yolo_labels(opts.images, opts.labels)
    elif opts.target == "voc":
        need("annotations")
        files = convert.coco_to_voc(opts.annotations, opts.out)
        print(f"wrote {len(files)} VOC XML files to {opts.out}")
        return 0
    else:
        need("annotations")
        names = convert.coco_to_yolo(opts.annotations, opts.out)
        print(f"wrote YOLO labels for {len(names)} classes to {opts.out} and classes.txt")
        return 0
    path = convert.write_json(data, opts.out)
    print(f"wrote {path}: {len(data['images'])} images, {len(data['annotations'])} annotations, "
          f"{len(data['categories'])} categories")
    if orphans:
        shown = ", ".join(str(p) for p in orphans[:10]) + (" ..." if len(orphans) > 10 else "")
        print(f"warning: {len(orphans)} label file(s) under {opts.labels} match no image under "
              f"{opts.images} and were not converted: {shown}", file=sys.stderr)
        return 1
    return 0


@dataclass
class PreviewOptions:
    out: str
    task: str  # the data pipeline's task: detection, segmentation or classification
    annotations: str | None = None
    images: str | None = None
    root: str | None = None  # an ImageFolder tree (classification)
    transforms: str | None = None  # YAML file with a transform list (None: the task's default pipeline)
    size: int | None = None  # the pipeline's size setting
    train: bool = True  # the training pipeline (else the evaluation one)
    num: int = 16
    seed: int = 0


def run_preview(opts: PreviewOptions) -> int:
    """A grid PNG of augmented samples with their labels drawn."""
    spec = None
    if opts.transforms:
        spec = yaml.safe_load(Path(opts.transforms).read_text(encoding="utf-8"))
    settings = {"size": opts.size} if opts.size else {}
    pipeline = build_transforms(spec, opts.task, train=opts.train, **settings)
    dataset = preview_dataset(opts.task, pipeline, images=opts.images, annotations=opts.annotations,
                              root=opts.root)
    path = make_preview(dataset, opts.out, num_samples=opts.num, seed=opts.seed)
    print(f"wrote {path} ({min(opts.num, len(dataset))} samples of {len(dataset)})")
    return 0
