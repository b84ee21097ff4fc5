"""glibc's mmap threshold pinned: an image-sized buffer allocated after another was freed is still mapped
(and so unmapped on free), instead of coming from the heap as glibc's dynamic threshold would have it."""

import subprocess
import sys

import pytest

from vision.data.memory import pin_mmap_threshold

PROBE = """
import ctypes, sys
import numpy as np
from vision.data.memory import pin_mmap_threshold

class MallInfo2(ctypes.Structure):
    names = "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost"
    _fields_ = [(name, ctypes.c_size_t) for name in names.split()]

if sys.argv[1] == "pin":
    pin_mmap_threshold()
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
first = np.ones(1 << 18)  # 2 MiB, like a decoded image: mapped, then freed (glibc raises its threshold here)
del first
second = np.ones(1 << 18)
print(libc.mallinfo2().hblkhd >= second.nbytes)  # is the second one mapped too?
"""


def _second_buffer_mapped(mode: str) -> bool:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True)
    return out.stdout.strip() == "True"


@pytest.mark.skipif(not pin_mmap_threshold(), reason="not glibc: no mallopt, no dynamic threshold")
def test_pinned_threshold_keeps_image_buffers_mapped():
    assert not _second_buffer_mapped("dynamic")  # the behaviour that fragments DataLoader workers' heaps
    assert _second_buffer_mapped("pin")
