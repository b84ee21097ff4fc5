"""`visiondet evaluate`: a trained model's metrics on a labelled set, printed and written as JSON.

    visiondet evaluate --weights best.pt --root data/val                           # classification
    visiondet evaluate --weights best.pt --images DIR --annotations val.json       # detection, segmentation
    visiondet evaluate --task detection --predictions results.json --annotations val.json --images DIR

The checkpoint says which task it is; the task builds the dataset, runs its evaluator and formats the
result. Under torchrun each process evaluates a share of the images and the counts are combined.
"""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--weights", metavar="CKPT", help="a visiondet checkpoint (best.pt, last.pt)")
    parser.add_argument("--images", metavar="DIR", help="image folder (detection, segmentation)")
    parser.add_argument("--annotations", metavar="JSON", help="COCO annotations (detection, segmentation)")
    parser.add_argument("--masks", metavar="DIR", help="PNG index masks (segmentation)")
    parser.add_argument("--root", metavar="DIR", help="ImageFolder tree (classification)")
    parser.add_argument("--predictions", metavar="JSON",
                        help="score a saved results file, no model (detection: COCO results)")
    parser.add_argument("--task", help="the task of --predictions (default: detection)")
    parser.add_argument("--out", metavar="JSON",
                        help="where to write the metrics (default: <weights>_eval.json beside weights in a "
                             "training run's folder, else under runs/evaluate/; metrics.json with "
                             "--predictions)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader worker processes")
    parser.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, cuda:1 ...")
    parser.add_argument("--raw", action="store_true", help="evaluate the raw weights, not the EMA weights")
    parser.add_argument("--skip-unreadable", action="store_true",
                        help="leave out image files that cannot be decoded (listed on stderr and counted in "
                             "the JSON; their ground truth still counts) instead of stopping at the first")
    parser.add_argument("--allow-size-mismatch", action="store_true",
                        help="evaluate even when images differ in size from the JSON (refused by default: "
                             "such annotations usually belong to another set; boxes are clipped)")


def run(args: argparse.Namespace) -> int:
    from apps.config import ConfigError
    from apps.engine.loader import UnreadableImageError
    from apps.evaluate import EvaluateOptions, run_evaluate
    from vision.checkpoint import CheckpointError

    opts = EvaluateOptions(
        weights=args.weights, images=args.images, annotations=args.annotations, masks=args.masks,
        root=args.root, predictions=args.predictions, task=args.task, out=args.out,
        batch_size=args.batch_size, workers=args.workers, device=args.device, raw=args.raw,
        skip_unreadable=args.skip_unreadable, allow_size_mismatch=args.allow_size_mismatch,
    )
    try:
        return run_evaluate(opts)
    except (ConfigError, CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except UnreadableImageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
