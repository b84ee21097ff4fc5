"""`visiondet predict`: run a checkpoint over image folders, globs, files or lists of paths.

    visiondet predict --weights best.pt --source photos/ --output runs/predict/photos
    torchrun --nproc_per_node 4 -m apps.cli predict --weights best.pt --source /data --output /shared/out
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--weights", required=True, help="visiondet checkpoint (.pt)")
    parser.add_argument("--source", required=True, nargs="+", metavar="PATH",
                        help="image folders (searched recursively), glob patterns (quote them), image files, "
                             "or .txt files listing image paths")
    parser.add_argument("--output", required=True, type=Path, help="folder for the outputs")
    parser.add_argument("--score-threshold", type=float, default=None,
                        help="detection: lowest score (default: the checkpoint's calibrated threshold, "
                             "else 0.5)")
    parser.add_argument("--nms-threshold", type=float, default=None,
                        help="detection: IoU of the per-class NMS (default: the checkpoint's)")
    parser.add_argument("--classes", nargs="+", default=None, metavar="CLASS",
                        help="keep only these classes (names or dataset category ids)")
    parser.add_argument("--top-k", type=int, default=5, help="classification: classes listed per image (5)")
    parser.add_argument("--batch-size", type=int, default=8, help="images per forward pass (8)")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader processes decoding images (2)")
    parser.add_argument("--device", default="auto", help="auto (CUDA if any, else CPU), cpu, cuda, cuda:N")
    parser.add_argument("--save-images", action="store_true",
                        help="write drawn copies under OUTPUT/images/, mirroring the source tree")
    parser.add_argument("--format", nargs="+", choices=("coco", "jsonl", "csv"), default=None, dest="formats",
                        help="exports beside predictions.jsonl (default: coco for detection, else jsonl)")
    parser.add_argument("--coco-ids", default=None, metavar="JSON",
                        help="COCO JSON whose images list maps file names to image ids for predictions.json")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true",
                      help="skip images already in OUTPUT/predictions.jsonl")
    mode.add_argument("--overwrite", action="store_true",
                      help="delete earlier outputs in OUTPUT and start again")
    parser.add_argument("--allow-inside-source", action="store_true",
                        help="allow OUTPUT inside a source folder (it is never read as input)")
    parser.add_argument("--max-pixels", type=int, default=None,
                        help="refuse larger images (default: the reader's limit, 100 megapixels)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--backend", choices=("pytorch", "onnxruntime"), default="pytorch",
                        help="pytorch, or onnxruntime: the checkpoint exported to ONNX (checked against "
                             "PyTorch, cached on first use) run on the CPU (pip install 'visiondet[export]')")
    parser.add_argument("--int8", default=None, metavar="DIR",
                        help="run the ONNX export quantised to int8 (Faster R-CNN), calibrated on the images "
                             "in DIR (use training images); implies --backend onnxruntime")


def run(args: argparse.Namespace) -> int:
    from apps.predict.run import PredictOptions, run_predict
    from apps.predict.sources import SourceError
    from apps.predict.writers import OutputError
    from vision.checkpoint import CheckpointError
    from vision.data.images import DEFAULT_MAX_PIXELS

    for name in ("batch_size", "top_k", "max_pixels"):
        value = getattr(args, name)
        if value is not None and value < 1:
            print(f"visiondet predict: error: --{name.replace('_', '-')} must be at least 1", file=sys.stderr)
            return 2
    if args.workers < 0:
        print("visiondet predict: error: --workers must be 0 or more", file=sys.stderr)
        return 2
    opts = PredictOptions(
        weights=args.weights, sources=args.source, output=args.output, score_thresh=args.score_threshold,
        nms_thresh=args.nms_threshold, classes=args.classes, top_k=args.top_k, batch_size=args.batch_size,
        workers=args.workers, device=args.device, save_images=args.save_images, formats=args.formats or [],
        coco_ids=args.coco_ids, resume=args.resume, overwrite=args.overwrite,
        allow_inside_source=args.allow_inside_source, max_pixels=args.max_pixels or DEFAULT_MAX_PIXELS,
        progress=not args.no_progress, backend="onnxruntime" if args.int8 else args.backend, int8=args.int8,
    )
    try:
        return run_predict(opts)
    except (SourceError, OutputError, CheckpointError, ValueError, RuntimeError) as exc:
        print(f"visiondet predict: error: {exc}", file=sys.stderr)
        return 2
