"""`visiondet convert --from torchvision SRC.pth --model faster_rcnn_r50_fpn --out DST.pt`.

Imports torchvision's Faster R-CNN COCO weights (``fasterrcnn_resnet50_fpn`` or ``_v2``) as a visiondet
detection checkpoint with COCO's 80 class names and ids, ready for `visiondet predict` and `evaluate`.
"""

from __future__ import annotations

import argparse
import sys

MODELS = ("faster_rcnn_r50_fpn", "faster_rcnn_r50_fpn_v2")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--from", dest="source_format", choices=["torchvision"], required=True,
                        help="format of the source file")
    parser.add_argument("src", metavar="SRC.pth", help="torchvision state dict, e.g. "
                        "fasterrcnn_resnet50_fpn_coco-258fb6c6.pth")
    parser.add_argument("--model", choices=MODELS, default="faster_rcnn_r50_fpn",
                        help="our architecture (torchvision's fasterrcnn_resnet50_fpn or its v2)")
    parser.add_argument("--out", required=True, metavar="DST.pt", help="visiondet checkpoint to write")


def run(args: argparse.Namespace) -> int:
    from detection.torchvision_weights import convert_checkpoint
    from vision.checkpoint import CheckpointError

    try:
        path = convert_checkpoint(args.src, args.out, args.model)
    except CheckpointError as exc:
        print(f"visiondet convert: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {path} ({args.model}, 80 COCO classes)")
    return 0
