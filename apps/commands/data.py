"""`visiondet data check|convert|preview`: look at a dataset before training on it.

Examples::

    visiondet data check --annotations train.json --images train/          # report; exit 1 on errors
    visiondet data check --annotations train.json --images train/ --json   # the same, for scripts
    visiondet data check --annotations train.json --images train/ --config my_detector.yaml  # its anchors
    visiondet data check --root train/                                      # class folders (classification)
    visiondet data check --images train/images --masks train/masks --classes classes.txt   # index masks
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
import sys
from functools import partial


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="data_command", metavar="ACTION", required=True)

    check = sub.add_parser("check", help="validate a dataset (COCO JSON, class folders or index masks) and "
                           "print a report")
    check.add_argument("--annotations", metavar="JSON", help="COCO instances JSON (with --images)")
    check.add_argument("--images", metavar="DIR",
                       help="folder the COCO file_name values refer to, or the images of --masks")
    check.add_argument("--root", metavar="DIR", help="class folders instead: <root>/<class name>/<image>")
    check.add_argument("--masks", metavar="DIR", help="<image stem>.png index masks (with --images)")
    check.add_argument("--classes", metavar="FILE|NAMES",
                       help="--masks: names of labels 1..K, a classes.txt/data.yaml file or a,b,c")
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
    from apps.data import run as jobs
    from vision.data.cocofile import AnnotationError
    from vision.data.convert import ConversionError
    from vision.data.images import ImageError

    if args.data_command == "check":
        job = partial(jobs.run_check, jobs.CheckOptions(
            args.annotations, args.images, root=args.root, masks=args.masks, classes=args.classes,
            json=args.json, headers_only=args.headers_only,
            workers=args.workers, config=args.config, anchors=not args.no_anchors))
    elif args.data_command == "convert":
        job = partial(jobs.run_convert, jobs.ConvertOptions(
            args.source, args.out, target=args.target, annotations=args.annotations, images=args.images,
            labels=args.labels, names=args.names, split=args.split))
    else:
        task = args.task or ("classification" if args.root else "detection")  # the pipeline's targets
        job = partial(jobs.run_preview, jobs.PreviewOptions(
            args.out, task, annotations=args.annotations, images=args.images, root=args.root,
            transforms=args.transforms, size=args.size, train=not args.eval, num=args.num, seed=args.seed))
    try:
        return job()
    except (AnnotationError, ConversionError, ImageError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
