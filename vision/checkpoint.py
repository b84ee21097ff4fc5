"""Saving and loading checkpoints safely.

Saving is atomic (temporary file in the same folder, fsync, rename), so a run killed mid-write never
leaves a truncated file behind. Loading always uses ``weights_only=True``: a checkpoint that carries
pickled code is refused instead of executed.
"""

from __future__ import annotations

import json
import os
import tempfile
import zipfile
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
    if exported := _exported_file(path, head):
        raise CheckpointError(exported)
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


def _exported_file(path: Path, head: bytes) -> str | None:
    """The message for an exported graph (``visiondet export``'s TorchScript or ONNX file) passed where a
    checkpoint belongs, or None. torch.load's own answer for a TorchScript archive is advice to set
    weights_only=False ("arbitrary code execution"), which is the wrong way for a user to go."""
    if head[:1] == b"\x08":  # ONNX: a protobuf whose field 1 (ir_version, a varint) comes first
        what, source = "an ONNX export", None
    elif head.startswith(b"PK"):
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
                if not any(n.endswith("/constants.pkl") or "/code/" in n for n in names):
                    return None  # a torch.save archive: a checkpoint or a state dict
                extra = [n for n in names if n.endswith("/extra/visiondet.json")]
                meta = json.loads(archive.read(extra[0])) if extra else {}
        except (zipfile.BadZipFile, OSError, ValueError):
            return None  # torch.load says what is wrong
        what, source = "a TorchScript export", meta.get("checkpoint")
    else:
        return None
    made, named = (f" made by `visiondet export` from {source}", f" ({source})") if source else ("", "")
    loader = "torch.jit.load" if what.startswith("a TorchScript") else "onnxruntime.InferenceSession"
    return (f"{path}: {what}{made}, not a checkpoint: pass the visiondet checkpoint (.pt) it was exported "
            f"from{named} to --weights, and --backend onnxruntime to run predict or the demo on an exported "
            f"graph; the exported file itself loads with {loader}")


def is_visiondet_checkpoint(obj: Any) -> bool:
    return isinstance(obj, dict) and obj.get("format") == FORMAT and "state_dict" in obj


# A slim checkpoint may store its larger conv and linear weights as int8, one scale per output channel
# (weights/slim.py --int8): ``int8_scales`` maps each such tensor's name to its scales, and
# :func:`checkpoint_weights` multiplies them back. A ResNet-18 is then about 11 MB instead of 22 in float16.
INT8_SCALES = "int8_scales"


def quantize_int8(state: dict[str, torch.Tensor], *, min_numel: int = 4096
                  ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``state`` with every floating-point tensor of 2+ dims and at least ``min_numel`` values (conv and
    linear weights) as int8, symmetric per output channel (dim 0), and those tensors' float32 scales."""
    out, scales = dict(state), {}
    for name, value in state.items():
        if not value.is_floating_point() or value.dim() < 2 or value.numel() < min_numel:
            continue
        flat = value.float().flatten(1)
        scale = flat.abs().amax(dim=1).clamp(min=1e-12) / 127.0
        out[name] = (flat / scale[:, None]).round().clamp(-127, 127).to(torch.int8).reshape(value.shape)
        scales[name] = scale
    return out, scales


def checkpoint_weights(ckpt: dict[str, Any], *, ema: bool = True) -> dict[str, torch.Tensor]:
    """A visiondet checkpoint's weights as the model takes them: the EMA copy when ``ema`` and present,
    int8-stored tensors (see :func:`quantize_int8`) multiplied back by their scales into float32."""
    state = ckpt.get("ema_state_dict") if ema and ckpt.get("ema_state_dict") else ckpt["state_dict"]
    scales = ckpt.get(INT8_SCALES) or {}
    if not scales:
        return state
    out = dict(state)
    for name, scale in scales.items():
        q = state[name]
        out[name] = q.float() * scale.float().reshape(-1, *([1] * (q.dim() - 1)))
    return out


def same_weights(first: str | os.PathLike, second: str | os.PathLike) -> bool:
    """Whether two checkpoint files hold the same model: equal weights, and equal EMA weights (what runs)."""
    a, b = load_checkpoint(first), load_checkpoint(second)
    return all(_equal_tensors(a.get(key), b.get(key)) for key in ("state_dict", "ema_state_dict"))


def _equal_tensors(x: dict[str, torch.Tensor] | None, y: dict[str, torch.Tensor] | None) -> bool:
    if x is None or y is None:
        return x is y
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
