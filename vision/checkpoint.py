"""Saving and loading checkpoints safely.

Saving is atomic (temporary file in the same folder, fsync, rename), so a run killed mid-write never
leaves a truncated file behind. Loading always uses ``weights_only=True``: a checkpoint that carries
pickled code is refused instead of executed.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

FORMAT = "visiondet"
VERSION = 1
# torch.save writes a zip archive; files from before PyTorch 1.6 are a bare pickle (protocol 2+: 0x80 first)
_CHECKPOINT_MAGIC = (b"PK\x03\x04", b"\x80")


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used; the message names the file and the reason."""


def save_checkpoint(obj: Any, path: str | os.PathLike) -> Path:
    """Write ``obj`` to ``path`` atomically and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Any:
    """Load a checkpoint or state dict with ``weights_only=True``; errors name the file and the reason."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    with path.open("rb") as f:
        head = f.read(4)
    if not head.startswith(_CHECKPOINT_MAGIC):
        # torch's own error for a text or image file is a bare KeyError such as '101'
        what = "the file is empty" if not head else "it is neither a zip archive nor a pickle"
        raise CheckpointError(f"{path}: not a visiondet or PyTorch checkpoint ({what})")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError ... for bad files
        text = str(exc)
        if "Weights only load failed" in text or "Unsupported global" in text:
            reason = "it contains pickled Python objects beyond tensors and plain data, refused for safety"
        elif isinstance(exc, EOFError) or "zip archive" in text or "central directory" in text:
            reason = "the file is truncated or not a PyTorch checkpoint"
        else:
            reason = text.splitlines()[0] if text else type(exc).__name__
        raise CheckpointError(f"{path}: cannot load checkpoint: {reason}") from exc


def is_visiondet_checkpoint(obj: Any) -> bool:
    return isinstance(obj, dict) and obj.get("format") == FORMAT and "state_dict" in obj
