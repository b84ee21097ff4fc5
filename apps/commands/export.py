"""`visiondet export`: a checkpoint to an ONNX or TorchScript file, checked against PyTorch.

    visiondet export --weights weights/faster_rcnn_shapes.pt --format onnx --out detector.onnx

Detectors map one image [3, H, W] in [0, 1] (any size) to boxes, labels and scores in its pixels (Fast
R-CNN also takes its proposals [P, 4]: selective search is OpenCV code outside the graph); classifiers map
[N, 3, S, S] to logits, segmenters [N, 3, H, W] to logits and a mask. Class names and preprocessing are in
the file's metadata. The file is compared with PyTorch on three inputs of different sizes; beyond
tolerance the command fails and writes nothing.
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


def run(args: argparse.Namespace) -> int:
    from apps.deploy import export_checkpoint
    from vision.checkpoint import CheckpointError
    from vision.export import ExportError

    try:
        report = export_checkpoint(args.weights, args.fmt, args.out)
    except (CheckpointError, ExportError) as exc:
        print(f"visiondet export: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {report.path} ({report.format}, {report.path.stat().st_size / 1e6:.1f} MB, "
          f"traced in {report.seconds:.1f} s)")
    for line in report.checks:
        print(f"  checked against PyTorch: {line}")
    return 0
