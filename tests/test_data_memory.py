"""glibc's mmap threshold pinned: an image-sized buffer allocated after another was freed is still mapped
(and so unmapped on free), instead of coming from the heap as glibc's dynamic threshold would have it."""

import os
import subprocess
import sys

import pytest

from vision.data.memory import ENV, pin_for_workers, pin_mmap_threshold

PROBE = """
import ctypes, sys
import numpy as np
from vision.data.memory import pin_mmap_threshold

class MallInfo2(ctypes.Structure):
    names = "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost"
    _fields_ = [(name, ctypes.c_size_t) for name in names.split()]

if sys.argv[1] == "pin":
    pin_mmap_threshold()
elif sys.argv[1] == "dataset":  # what building a COCO dataset does, under the environment it was given
    import json, tempfile
    from pathlib import Path
    from vision.data.coco import CocoDetection
    folder = Path(tempfile.mkdtemp())
    (folder / "a.json").write_text(json.dumps({"images": [], "annotations": [], "categories": []}))
    CocoDetection(folder, folder / "a.json", cache=None)
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
first = np.ones(1 << 18)  # 2 MiB, like a decoded image: mapped, then freed (glibc raises its threshold here)
del first
mapped = libc.mallinfo2().hblkhd  # (imports hold mapped blocks of their own: count what the next one adds)
second = np.ones(1 << 18)
print(libc.mallinfo2().hblkhd - mapped >= second.nbytes)  # is the second one mapped too?
"""


def _second_buffer_mapped(mode: str, **env: str) -> bool:
    environ = {k: v for k, v in os.environ.items() if k not in ("MALLOC_MMAP_THRESHOLD_", ENV)}
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True,
                         env={**environ, **env})
    return out.stdout.strip() == "True"


@pytest.mark.skipif(not pin_mmap_threshold(), reason="not glibc: no mallopt, no dynamic threshold")
def test_pinned_threshold_keeps_image_buffers_mapped():
    assert not _second_buffer_mapped("dynamic")  # the behaviour that fragments DataLoader workers' heaps
    assert _second_buffer_mapped("pin")


@pytest.mark.skipif(not pin_mmap_threshold(), reason="not glibc: no mallopt, no dynamic threshold")
def test_building_a_dataset_pins_it_unless_told_not_to():
    assert _second_buffer_mapped("dataset")  # the default: pinned when the dataset is built
    assert not _second_buffer_mapped("dataset", **{ENV: "off"})  # glibc's dynamic threshold kept
    assert _second_buffer_mapped("dataset", **{ENV: str(1 << 20)})  # another value: 2 MiB still under it...
    assert not _second_buffer_mapped("dataset", **{ENV: str(1 << 22)})  # ...but not under 4 MiB


def test_a_users_own_malloc_setting_is_left_alone_and_a_bad_value_is_named(monkeypatch):
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    assert pin_for_workers() is False
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_")
    monkeypatch.setenv(ENV, "lots")
    with pytest.raises(ValueError, match=f"{ENV}='lots': expected 'off' or a number of bytes"):
        pin_for_workers()
