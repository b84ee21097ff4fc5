"""Mixed precision of a run: the autocast dtype ``train.amp`` and ``train.amp_dtype`` give on this device.

``train.amp: true`` autocasts to ``train.amp_dtype`` (bfloat16, or float16 with a gradient scaler) on CUDA or
the CPU. ``train.amp: auto`` autocasts to bfloat16 only where the processor computes it natively, and
trains in float32 elsewhere (emulated bfloat16 is slower than float32): a GPU of compute capability 8.0 or
later (``torch.cuda.is_bf16_supported(including_emulation=False)``); a CPU whose flags (``/proc/cpuinfo``)
include AVX-512 BF16 or AMX-BF16 on x86, or the BF16 extension on Arm. What it chose, and why, is the
first line the run logs about precision.
"""

from __future__ import annotations

from pathlib import Path

import torch

from apps.engine.logging import RunLogger
from apps.experiment import TrainConfig

__all__ = ["autocast_dtype", "native_bfloat16", "cpu_flags", "BF16_CPU_FLAGS"]

# x86: AVX-512 BF16 (dot products, conversions), AMX-BF16 (tile matrix multiply); Arm: FEAT_BF16
BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16", "bf16")


def cpu_flags(path: str | Path = "/proc/cpuinfo") -> set[str]:
    """The processor's feature flags (x86 ``flags``, Arm ``Features``); empty where the file is missing."""
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return set()
    found: set[str] = set()
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name.strip().lower() in ("flags", "features"):
            found.update(value.split())
    return found


def native_bfloat16(device: torch.device) -> str | None:
    """Why ``device`` computes bfloat16 natively, in a few words (``"CPU flags avx512_bf16"``), or None."""
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported(including_emulation=False):
            major, minor = torch.cuda.get_device_capability(device)
            return f"GPU of compute capability {major}.{minor}"
        return None
    if device.type == "cpu":
        flags = cpu_flags()
        have = [f for f in BF16_CPU_FLAGS if f in flags]
        return f"CPU flags {', '.join(have)}" if have else None
    return None


def autocast_dtype(cfg: TrainConfig, device: torch.device, log: RunLogger) -> torch.dtype | None:
    """The autocast dtype of ``train.amp`` on ``device``, or None for float32; says so in the log."""
    if cfg.amp == "auto":
        why = native_bfloat16(device)
        if why is None:
            log.info(f"mixed precision: train.amp=auto: float32 (this {device.type} computes no bfloat16 "
                     "natively)")
            return None
        log.info(f"mixed precision: train.amp=auto: bfloat16 autocast on {device.type} ({why})")
        return torch.bfloat16
    if not cfg.amp:
        return None
    dtype = torch.bfloat16 if cfg.amp_dtype == "bfloat16" else torch.float16
    if device.type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        log.warning("this GPU has no bfloat16; using float16 with a gradient scaler")
        dtype = torch.float16
    elif device.type == "cpu" and dtype == torch.float16:
        # CPU autocast takes float16 too, but few processors compute it natively
        log.warning("train.amp_dtype=float16 on the CPU is slow on most processors; bfloat16 is the "
                    "CPU's mixed precision")
    elif device.type not in ("cuda", "cpu"):
        log.warning(f"train.amp: no autocast on {device.type}; training in float32")
        return None
    log.info(f"mixed precision: {str(dtype).removeprefix('torch.')} autocast on {device.type}"
             + (" with a gradient scaler" if dtype == torch.float16 else ""))
    return dtype
