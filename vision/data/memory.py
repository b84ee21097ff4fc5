"""Keeping DataLoader processes' memory flat: glibc's heap and decoded-image buffers.

A decoded 640x480 image as float32 is 3.7 MB. glibc serves allocations that large with ``mmap`` and unmaps
them on ``free``, but only up to a *dynamic* threshold: the first time such a block is freed, glibc raises
the threshold above its size, and from then on every image buffer comes from the heap, whose freed holes
are kept and fragment. Measured in ``benchmarks/coco_scale.py`` (4 workers, batches of 2 COCO-sized
images): the processes' total PSS grew by about 260 MB within the first 400 batches with the dynamic
threshold and by 0 MB with the threshold pinned at its default 128 KiB, the setting PyTorch users reach
for as ``MALLOC_MMAP_THRESHOLD_=131072``. Pinning it from Python does the same for the processes a
DataLoader forks afterwards (they inherit the setting).

The setting is process-wide and glibc cannot hand it back, so it is optional: building a COCO dataset
calls :func:`pin_for_workers`, which does nothing when ``VISIONDET_MMAP_THRESHOLD=off`` (the process keeps
glibc's dynamic threshold) or when ``MALLOC_MMAP_THRESHOLD_`` is set (glibc applied the user's own value
at start-up); ``VISIONDET_MMAP_THRESHOLD=<bytes>`` pins another value.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os

__all__ = ["pin_mmap_threshold", "pin_for_workers"]

ENV = "VISIONDET_MMAP_THRESHOLD"

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


def pin_for_workers() -> bool:
    """What a dataset calls before DataLoader workers fork: :func:`pin_mmap_threshold` unless the environment
    says otherwise (see the module's docstring). Returns whether the threshold was pinned here.

    Raises:
        ValueError: ``VISIONDET_MMAP_THRESHOLD`` is neither ``off`` nor a whole number of bytes.
    """
    choice = os.environ.get(ENV, "").strip().lower()
    if choice in ("off", "0", "false", "no") or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    if not choice:
        return pin_mmap_threshold()
    if not choice.isdigit():
        raise ValueError(f"{ENV}={os.environ[ENV]!r}: expected 'off' or a number of bytes (default 131072)")
    return pin_mmap_threshold(int(choice))
