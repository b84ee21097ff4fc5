"""The one folder visiondet caches in, and a named subfolder per content.

Root: ``$VISIONDET_CACHE`` when set, else ``$XDG_CACHE_HOME/visiondet``, else ``~/.cache/visiondet`` (beside
the caches of torch hub and Hugging Face). Under it: ``coco/`` (annotation files as mapped arrays,
vision/data/cococache.py), ``proposals/`` (selective search boxes, detection/proposals.py), ``export/``
(ONNX files for ``--backend onnxruntime``, apps/export.py) and ``torchvision/`` (torchvision's COCO
detectors imported when torch's hub folder is read-only, detection/torchvision_weights.py). Everything there
can be deleted at any time; it is computed again when needed.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["cache_root", "cache_dir"]


def cache_root() -> Path:
    """``$VISIONDET_CACHE``, else ``$XDG_CACHE_HOME/visiondet``, else ``~/.cache/visiondet`` (read at each
    call, so a changed environment takes effect)."""
    if os.environ.get("VISIONDET_CACHE"):
        return Path(os.environ["VISIONDET_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "visiondet"


def cache_dir(name: str) -> Path:
    """The subfolder ``name`` ("coco", "proposals", "export" or "torchvision") of the cache root (not made
    here)."""
    return cache_root() / name
