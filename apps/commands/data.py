"""`visiondet data check|convert|preview`: look at a dataset before training on it.

Examples::

    visiondet data check --annotations train.json --images train/          # report; exit 1 on errors
    visiondet data check --annotations train.json --images train/ --json   # the same, for scripts
    visiondet data check --annotations train.json --images train/ --config my_detector.yaml  # its anchors
    visiondet data convert --from voc --annotations VOC2012/Annotations --split ImageSets/Main/train.txt \\
        --out train.json
    visiondet data convert --from yolo --images images/train --labels labels/train --names data.yaml \\
        --out train.json
    visiondet data convert --from coco --to yolo --annotations train.json --out labels/train
    visiondet data preview --annotations train.json --images train/ --out preview.png

Exit codes: 0 fine, 1 the check found errors (training would fail or silently lose data), 2 the input
could not be read at all.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="data_command", metavar="ACTION", required=True)

    check = sub.add_parser("check", help="validate a COCO dataset against its images and print a report")
    check.add_argument("--annotations", required=True, metavar="JSON", help="COCO instances JSON")
    check.add_argument("--images", required=True, metavar="DIR", help="folder the file_name values refer to")
    check.add_argument("--json", action="store_true", help="print the report as JSON")
    check.add_argument("--headers-only", action="store_true",
                       help="read image headers only (fast; does not find truncated files)")
    check.add_argument("--workers", type=int, default=None, help="threads reading images (default: CPUs)")
    check.add_argument("--config", metavar="YAML",
                       help="detection config whose anchors to measure (default: the default Faster R-CNN's)")
    check.add_argument("--no-anchors", action="store_true", help="leave out the anchor report")

    convert = sub.add_parser("convert", help="Pascal VOC / YOLO datasets to COCO JSON, or COCO to VOC / YOLO")
    convert.add_argument("--from", dest="source", required=True, choices=["voc", "yolo", "coco"])
    convert.add_argument("--to", dest="target", default="coco", choices=["coco", "voc", "yolo"])
    convert.add_argument("--annotations", metavar="PATH",
                         help="VOC: folder of XML files; COCO: the JSON file")
    convert.add_argument("--images", metavar="DIR",
                         help="YOLO: image folder (required); VOC: read sizes missing from the XML")
    convert.add_argument("--labels", metavar="DIR", help="YOLO: folder of <image stem>.txt label files")
    convert.add_argument("--names", metavar="FILE",
                         help="YOLO: data.yaml or classes.txt (required); VOC: fixes the class order")
    convert.add_argument("--split", metavar="FILE", help="VOC: image set file listing the stems to convert")
    convert.add_argument("--out", required=True, metavar="PATH",
                         help="COCO JSON file to write, or folder for VOC XML / YOLO txt files")

    preview = sub.add_parser("preview", help="write a grid PNG of augmented samples with their labels drawn")
    preview.add_argument("--annotations", metavar="JSON", help="COCO JSON (detection, segmentation)")
    preview.add_argument("--images", metavar="DIR", help="image folder of the JSON")
    preview.add_argument("--root", metavar="DIR", help="ImageFolder root instead (classification)")
    preview.add_argument("--task", choices=["detection", "segmentation", "classification"],
                         help="default: classification with --root, detection otherwise")
    preview.add_argument("--transforms", metavar="YAML",
                         help="YAML file with a transform list (default: the task's training pipeline)")
    preview.add_argument("--size", type=int, help="the pipeline's size setting (see build_transforms)")
    preview.add_argument("--eval", action="store_true", help="the evaluation pipeline instead of training")
    preview.add_argument("--num", type=int, default=16, help="number of samples (default 16)")
    preview.add_argument("--seed", type=int, default=0)
    preview.add_argument("--out", required=True, metavar="PNG")


def run(args: argparse.Namespace) -> int:
    from vision.data.cocofile import AnnotationError
    from vision.data.convert import ConversionError
    from vision.data.images import ImageError

    action = {"check": _check, "convert": _convert, "preview": _preview}[args.data_command]
    try:
        return action(args)
    except (AnnotationError, ConversionError, ImageError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _check(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from vision.data.check import check_dataset

    def progress(items):
        return tqdm(items, desc="images", unit="img", disable=args.json or not sys.stderr.isatty())

    if not args.no_anchors:  # a bad --config fails before the images are read
        from apps.data_anchors import detector_config

        detector_config(args.config)
    report = check_dataset(args.annotations, args.images, decode=not args.headers_only, workers=args.workers,
                           progress=progress)
    anchors = None if args.no_anchors else _anchors(args)
    if args.json:
        print(json.dumps({**report.to_dict(), **({"anchors": anchors[1]} if anchors else {})}, indent=2))
    else:
        print(report.to_text() + (f"\n{anchors[0]}" if anchors else ""))
    return 0 if report.ok else 1


def _anchors(args: argparse.Namespace) -> tuple[str, dict] | None:
    """The anchor section (text, dict), or None when the file gives no boxes (the check says why)."""
    from apps.data_anchors import anchor_check, anchor_report_dict, detector_config, format_anchor_report

    try:
        report = anchor_check(args.annotations, args.config)
    except (OSError, ValueError, KeyError, TypeError):  # an unreadable file: the check above reports it
        return None
    if report is None:
        return None
    source = detector_config(args.config)[1]
    return format_anchor_report(report, source), anchor_report_dict(report, source)


def _convert(args: argparse.Namespace) -> int:
    from vision.data import convert

    def need(*names: str) -> None:
        missing = [f"--{n}" for n in names if getattr(args, n) is None]
        if missing:
            raise ValueError(f"--from {args.source} --to {args.target} needs {', '.join(missing)}")

    if (args.source == "coco") == (args.target == "coco"):
        raise ValueError("convert goes from voc or yolo to coco, or from coco to voc or yolo")
    if args.source == "voc":
        need("annotations")
        classes = convert.read_names(args.names) if args.names else None
        data = convert.voc_to_coco(args.annotations, images_dir=args.images, classes=classes,
                                   split_file=args.split)
    elif args.source == "yolo":
        need("images", "labels", "names")
        data = convert.yolo_to_coco(args.images, args.labels, convert.read_names(args.names))
        orphans = convert.unmatched_yolo_labels(args.images, args.labels)
    elif args.target == "voc":
        need("annotations")
        files = convert.coco_to_voc(args.annotations, args.out)
        print(f"wrote {len(files)} VOC XML files to {args.out}")
        return 0
    else:
        need("annotations")
        names = convert.coco_to_yolo(args.annotations, args.out)
        print(f"wrote YOLO labels for {len(names)} classes to {args.out} and classes.txt")
        return 0
    path = convert.write_json(data, args.out)
    print(f"wrote {path}: {len(data['images'])} images, {len(data['annotations'])} annotations, "
          f"{len(data['categories'])} categories")
    if args.source == "yolo" and orphans:
        shown = ", ".join(str(p) for p in orphans[:10]) + (" ..." if len(orphans) > 10 else "")
        print(f"warning: {len(orphans)} label file(s) under {args.labels} match no image under "
              f"{args.images} and were not converted: {shown}", file=sys.stderr)
        return 1
    return 0


def _preview(args: argparse.Namespace) -> int:
    import yaml

    from vision.data.preview import make_preview, preview_dataset
    from vision.data.transforms import build_transforms

    kind = args.task or ("classification" if args.root else "detection")  # the data pipeline's kind
    spec = None
    if args.transforms:
        spec = yaml.safe_load(Path(args.transforms).read_text(encoding="utf-8"))
    settings = {"size": args.size} if args.size else {}
    pipeline = build_transforms(spec, kind, train=not args.eval, **settings)
    dataset = preview_dataset(kind, pipeline, images=args.images, annotations=args.annotations,
                              root=args.root)
    path = make_preview(dataset, args.out, num_samples=args.num, seed=args.seed)
    print(f"wrote {path} ({min(args.num, len(dataset))} samples of {len(dataset)})")
    return 0
