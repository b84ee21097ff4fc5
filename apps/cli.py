"""`visiondet TASK ARGS`: one flat command line, each subcommand a module with two functions.

A command module (apps/commands/<name>.py) defines ``add_arguments(parser)`` and ``run(args) -> int``.
Heavy imports (torch, gradio, ...) happen inside ``run`` so that ``visiondet --help`` stays instant.
"""

from __future__ import annotations

import argparse
import importlib
import os
import platform
import sys
from importlib import metadata

# name -> one-line help; the command is the module apps.commands.<name>
COMMANDS: dict[str, str] = {
    "train": "train a model from an experiment file (any task; CPU, GPU, torchrun)",
    "evaluate": "a trained model's metrics on a labelled set (printed, saved as JSON)",
    "predict": "run a checkpoint over image folders, globs, files or path lists",
    "data": "check a COCO dataset, convert VOC/YOLO to COCO, preview augmented samples",
    "synth": "write a synthetic shapes dataset (detection, segmentation, classification)",
    "proposals": "precompute selective search proposals for a folder (resumable)",
    "convert": "import torchvision Faster R-CNN weights as a visiondet checkpoint",
    "demo": "serve the Gradio demo page (detection, segmentation, classification)",
    "export": "export a checkpoint to ONNX or TorchScript, checked against PyTorch",
}


def version_line() -> str:
    """``visiondet 0.1.0 (torch 2.14.1, torchvision 0.29.1, Python 3.11.2)``, read from the installed
    packages' metadata (importing torch would make ``--version`` take seconds)."""
    def installed(name: str) -> str:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "not installed"

    return (f"visiondet {installed('visiondet')} (torch {installed('torch')}, "
            f"torchvision {installed('torchvision')}, Python {platform.python_version()})")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="visiondet",
        description="CNN backbones, classification, segmentation and the R-CNN family of detectors.",
    )
    parser.add_argument("--version", action="version", version=version_line(),
                        help="print visiondet's version and those of torch, torchvision and Python")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, help_text in COMMANDS.items():
        module = importlib.import_module(f"apps.commands.{name}")
        command = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(command)
        command.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 0
    return int(args._run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
