"""`visiondet synth`: write a synthetic shapes dataset (circles, squares, triangles) for any task.

Examples::

    visiondet synth --task detection --out data/shapes --num-images 500 --seed 0
    visiondet synth --task classification --out data/shapes_cls --num-images 300 --seed 0 --image-size 64
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--task", required=True, choices=["detection", "segmentation", "classification"])
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder (train/ and val/ inside)")
    parser.add_argument("--num-images", type=int, default=200, help="images over both splits (default 200)")
    parser.add_argument("--seed", type=int, default=0, help="the dataset depends on this alone (default 0)")
    parser.add_argument("--image-size", type=int, nargs="+", metavar="PX",
                        help="side, or smallest and largest side (default 160 256; classification 64 96)")
    parser.add_argument("--val-fraction", type=float, default=0.2, help="share of val images (default 0.2)")


def run(args: argparse.Namespace) -> int:
    from vision.data.synthetic import make_shapes

    size = None
    if args.image_size:
        if len(args.image_size) > 2:
            print("error: --image-size takes one or two values", file=sys.stderr)
            return 2
        size = args.image_size[0] if len(args.image_size) == 1 else tuple(args.image_size)
    try:
        splits = make_shapes(args.task, args.out, num_images=args.num_images, seed=args.seed, image_size=size,
                             val_fraction=args.val_fraction)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for split, folder in splits.items():
        # as written: COCO (images/ + annotations.json) for boxes and masks, class folders otherwise
        coco = (Path(folder) / "annotations.json").is_file()
        print(f"{split}: {folder} ({'images/ + annotations.json' if coco else '<class>/*.png'})")
    return 0
