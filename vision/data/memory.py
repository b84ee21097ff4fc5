"""Keeping DataLoader processes' memory flat: glibc's heap and decoded-image buffers.

A decoded 640x480 image as float32 is 3.7 MB. glibc serves allocations that large with ``mmap`` and unmaps
them on ``free``, but only up to a *dynamic* threshold: the first time such a block is freed, glibc raises
the threshold above its size, and from then on every image buffer comes from the heap, whose freed holes
are kept and fragment. Measured in ``benchmarks/coco_scale.py`` (4 workers, batches of 2 COCO-sized
images): the processes' total PSS grew by about 260 MB within the first 400 batches with the dynamic
threshold and by 0 MB with the threshold pinned at its default 128 KiB, the setting PyTorch users reach
for as ``MALLOC_MMAP_THRESHOLD_=131072``. Pinning it from Python does the same for the processes a
DataLoader forks afterwards (they inherit the setting).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

__all__ = ["pin_mmap_threshold"]

_M_MMAP_THRESHOLD = -3  # mallopt parameter number, from glibc's malloc.h
_DEFAULT_THRESHOLD = 128 * 1024


@functools.cache
def pin_mmap_threshold(nbytes: int = _DEFAULT_THRESHOLD) -> bool:
    """Fix glibc's mmap threshold at ``nbytes`` (turning its dynamic raise off) for this process and the
    processes it forks later. Returns False where the C library is not glibc (nothing changes there)."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl, macOS, Windows: no mallopt, and no such heap policy either
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return bool(mallopt(_M_MMAP_THRESHOLD, nbytes))
