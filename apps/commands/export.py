"""`visiondet export`: a checkpoint to an ONNX or TorchScript file, checked against PyTorch.

    visiondet export --weights weights/faster_rcnn_shapes.pt --format onnx --out detector.onnx

Detectors map one image [3, H, W] in [0, 1] (any size) to boxes, labels and scores in its pixels (Fast
R-CNN also takes its proposals [P, 4]: selective search is OpenCV code outside the graph); classifiers map
[N, 3, S, S] to logits, segmenters [N, 3, H, W] to logits and a mask. Class names and preprocessing are in
the file's metadata. The file is compared with PyTorch on three inputs of different sizes; beyond
tolerance the command fails and writes nothing.

    visiondet export --weights run/best.pt --format onnx --out detector_int8.onnx --int8 data/train/images

``--int8 DIR`` quantises a Faster R-CNN file to int8 (vision/quantize.py), calibrated on DIR's images, and
says how many of PyTorch's confident detections the int8 file keeps on some of them.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--weights", required=True, help="visiondet checkpoint (.pt)")
    parser.add_argument("--format", required=True, choices=("onnx", "torchscript"), dest="fmt",
                        help="onnx (ONNX Runtime, opset 17) or torchscript (torch.jit.load)")
    parser.add_argument("--out", required=True, type=Path, help="file to write")
    parser.add_argument("--int8", type=Path, default=None, metavar="DIR",
                        help="quantise to int8 (ONNX, Faster R-CNN), activation ranges measured on the "
                             "images in DIR: use training images")
    parser.add_argument("--calibration-images", type=int, default=32, metavar="N",
                        help="with --int8: how many of DIR's images to calibrate on (default 32)")


def run(args: argparse.Namespace) -> int:
    from apps.export import ExportOptions, run_export
    from vision.checkpoint import CheckpointError
    from vision.export import ExportError

    try:
        return run_export(ExportOptions(weights=args.weights, fmt=args.fmt, out=args.out, int8=args.int8,
                                        calibration_images=args.calibration_images))
    except (CheckpointError, ExportError) as exc:
        print(f"visiondet export: error: {exc}", file=sys.stderr)
        return 2
