"""`visiondet demo`: serve the Gradio page with every checkpoint in weights/ and any given ones.

Examples::

    visiondet demo                                        # http://127.0.0.1:7860, default weights
    visiondet demo --weights runs/detection/exp3/best.pt  # one of your own next to them
    visiondet demo --host 0.0.0.0 --port 8080             # reachable from other machines (no auth!)
"""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--weights", nargs="+", default=[], metavar="CKPT",
                        help="checkpoints (or folders of *.pt) to offer besides those in weights/; listed "
                             "first, by run folder: each tab opens on the first one of its kind")
    parser.add_argument("--no-default-weights", action="store_true",
                        help="do not list the checkpoints of the weights/ folder")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=7860, help="port (default 7860; 0 picks a free one)")
    parser.add_argument("--share", action="store_true",
                        help="also open a public gradio.live link (off unless asked; needs the internet)")
    parser.add_argument("--device", default="auto", help="auto (CUDA if there is one, else CPU), cpu, cuda:1")
    parser.add_argument("--max-side", type=int, default=None, metavar="PX",
                        help="run models on a copy of each upload at most this long (default 1600)")
    parser.add_argument("--max-megapixels", type=float, default=None, metavar="MP",
                        help="refuse uploads with more pixels than this (default 40)")
    parser.add_argument("--backend", choices=("pytorch", "onnxruntime"), default="pytorch",
                        help="pytorch, or onnxruntime: each model's ONNX export (checked against PyTorch, "
                             "cached on first use) on the CPU (pip install 'visiondet[export]')")
    parser.add_argument("--concurrency", type=int, default=1,
                        help="model runs at the same time; other requests queue (default 1)")
    parser.add_argument("--int8", default=None, metavar="DIR",
                        help="run Faster R-CNN models from their ONNX export quantised to int8, calibrated "
                             "on the images in DIR (use training images); implies --backend onnxruntime")


def run(args: argparse.Namespace) -> int:
    from apps.demo.models import DEFAULT_MAX_PIXELS, DEFAULT_MAX_SIDE
    from apps.demo.run import DemoOptions, run_demo

    opts = DemoOptions(
        weights=list(args.weights), default_weights=not args.no_default_weights, host=args.host,
        port=args.port, share=args.share, device=args.device, max_side=args.max_side or DEFAULT_MAX_SIDE,
        max_pixels=int(args.max_megapixels * 1e6) if args.max_megapixels else DEFAULT_MAX_PIXELS,
        backend="onnxruntime" if args.int8 else args.backend, int8=args.int8, concurrency=args.concurrency,
    )
    try:
        return run_demo(opts)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
