"""`visiondet demo` as a job: :class:`DemoOptions` in, the page served until Ctrl+C or SIGTERM."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from apps.demo.models import DEFAULT_MAX_PIXELS, DEFAULT_MAX_SIDE
from apps.demo.page import WEIGHTS_DIR, Demo
from apps.engine.distributed import resolve_device
from vision.export import ExportError, require_onnxruntime

__all__ = ["DemoOptions", "run_demo"]


@dataclass
class DemoOptions:
    """Everything one `visiondet demo` server needs (the command line, as a value)."""

    weights: list[str] = field(default_factory=list)  # checkpoints, or folders of *.pt, besides weights/
    default_weights: bool = True  # list the checkpoints of the weights/ folder
    host: str = "127.0.0.1"
    port: int = 7860  # 0 picks a free one
    share: bool = False
    device: str = "auto"
    max_side: int = DEFAULT_MAX_SIDE
    max_pixels: int = DEFAULT_MAX_PIXELS
    backend: str = "pytorch"  # or "onnxruntime": each model's exported file (apps.export)
    int8: str | None = None  # calibration images: Faster R-CNN files quantised to int8 (onnxruntime backend)
    concurrency: int = 1


def _sources(opts: DemoOptions) -> tuple[list[Path], list[Path]]:
    """(folders of the shipped checkpoints, the user's --weights: checkpoints or folders of them, in the
    order given, which the pickers list first); an entry that is neither is a ValueError."""
    folders = [WEIGHTS_DIR] if opts.default_weights else []
    chosen = []
    for item in opts.weights:
        path = Path(item)
        if not path.exists():
            raise ValueError(f"--weights {item}: no such file or folder")
        chosen.append(path)
    return folders, chosen


def run_demo(opts: DemoOptions) -> int:
    """Serve the page until stopped; returns the exit code (1: it could not listen). Unusable options
    raise ValueError with the message to show."""
    folders, files = _sources(opts)
    if not 0 <= opts.port <= 65535:
        raise ValueError(f"--port {opts.port}: not a port number")
    if opts.concurrency < 1:
        raise ValueError("--concurrency must be at least 1")
    try:
        device = str(resolve_device(opts.device))
    except (RuntimeError, ValueError) as exc:
        raise ValueError(f"--device: {exc}") from None
    demo = Demo.from_weights(folders, files, device=device, max_side=opts.max_side,
                             max_pixels=opts.max_pixels, concurrency=opts.concurrency)
    if opts.backend == "onnxruntime":
        try:
            require_onnxruntime()
        except ExportError as exc:
            demo.close()
            raise ValueError(f"--backend onnxruntime: {exc}") from None
        if opts.int8 is not None and not Path(opts.int8).is_dir():
            demo.close()
            raise ValueError(f"--int8 {opts.int8}: no such folder of calibration images")
        demo.cache.backend = opts.backend
        demo.cache.int8 = opts.int8
    elif opts.int8 is not None:
        demo.close()
        raise ValueError("--int8 runs the quantised ONNX export: use it with --backend onnxruntime")
    found = len(demo.cache.checkpoints)
    try:
        url = demo.start(opts.host, opts.port or None, share=opts.share)
    except OSError as exc:  # port in use, address not available
        print(f"error: cannot serve on {opts.host}:{opts.port}: {exc}", file=sys.stderr)
        demo.close()
        return 1
    # the URL Gradio reports carries the port it really got (``--port 0`` picks a free one)
    print(f"visiondet demo: {found} checkpoint{'s' * (found != 1)} on {device}; {url} (Ctrl+C stops it)",
          flush=True)
    demo.serve_forever()
    return 0
