"""One ``CocoTable`` per annotation file for every process of a run: an on-disk copy mapped read-only.

Each rank of a DDP run is its own process and would parse the JSON itself: at COCO scale that is N times
the parse (all at once, on the same cores) and N transient peaks of the parsed dicts. With a cache the
first process to arrive takes a file lock, parses and writes the table's arrays as ``.npy`` files; the
others wait on the lock, then every process maps the same files (``np.load(mmap_mode="r")``), so the
arrays exist once in the page cache however many ranks and DataLoader workers read them. A later run
(``evaluate`` after ``train``, a restart) maps them at once.

Entries are keyed by the annotation file's resolved path, size and modification time, the image folder
and the table's options; a changed file gets a new entry and the older entries of that file are removed.
(Sizes read from image headers, for images the JSON gives none, are not part of the key.)
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np

from .cocotable import CocoTable, PackedBytes, read_coco_table

try:
    import fcntl
except ImportError:  # Windows: no flock; each process builds its own table (still correct)
    fcntl = None

__all__ = ["AUTO_CACHE_BYTES", "cached_coco_table"]

FORMAT = 1  # bump when CocoTable's fields change
AUTO_CACHE_BYTES = 32 * 2**20  # "auto": annotation files from this size (parsing them takes seconds)
_ARRAYS = ("image_ids", "widths", "heights", "first", "boxes", "labels", "ann_ids", "crowd",
           "segmentation_ok")
_PACKED = ("file_names", "segmentations")


def cached_coco_table(
    annotations: str | os.PathLike,
    images_root: str | os.PathLike,
    cache_dir: str | os.PathLike,
    *,
    keep_segmentations: bool = False,
) -> CocoTable:
    """``read_coco_table(annotations, images_root, ...)``, built by one process and mapped by all."""
    path = Path(annotations)
    try:
        stat = path.stat()
    except OSError:  # missing file: read_coco_table says so in its own words
        return read_coco_table(path, images_root, keep_segmentations=keep_segmentations)
    source = str(path.resolve())
    key = [source, stat.st_size, stat.st_mtime_ns, str(Path(images_root).resolve()), keep_segmentations,
           FORMAT]
    prefix = f"{path.stem}-{_digest(source)}"
    folder = Path(cache_dir) / f"{prefix}-{_digest(json.dumps(key))}"
    if not (folder / "meta.json").is_file():
        folder.parent.mkdir(parents=True, exist_ok=True)
        with open(folder.parent / f"{prefix}.lock", "w") as lock:
            if fcntl is not None:
                fcntl.flock(lock, fcntl.LOCK_EX)  # the first process builds; the others wait, then map
            if not (folder / "meta.json").is_file():
                table = read_coco_table(path, images_root, keep_segmentations=keep_segmentations)
                _save(table, folder)
                for old in folder.parent.glob(f"{prefix}-*"):  # earlier versions of the same file
                    if old != folder and old.is_dir():
                        shutil.rmtree(old, ignore_errors=True)
    return _load(folder)


def _digest(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8", "surrogatepass")).hexdigest()[:12]


def _save(table: CocoTable, folder: Path) -> None:
    tmp = folder.with_name(f"{folder.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    for name in _ARRAYS:
        array = getattr(table, name)
        if array is not None:
            np.save(tmp / f"{name}.npy", array)
    for name in _PACKED:
        packed = getattr(table, name)
        if packed is not None:
            np.save(tmp / f"{name}.buffer.npy", packed.buffer)
            np.save(tmp / f"{name}.offsets.npy", packed.offsets)
    meta = {"categories": table.categories, "dropped": table.dropped, "num_dropped": table.num_dropped}
    (tmp / "meta.json").write_text(json.dumps(meta))  # written last: its presence marks a complete entry
    os.replace(tmp, folder)


def _load(folder: Path) -> CocoTable:
    meta = json.loads((folder / "meta.json").read_text())

    def array(name: str) -> np.ndarray | None:
        file = folder / f"{name}.npy"
        return np.load(file, mmap_mode="r") if file.is_file() else None

    def packed(name: str) -> PackedBytes | None:
        buffer = array(f"{name}.buffer")
        return None if buffer is None else PackedBytes.from_arrays(buffer, array(f"{name}.offsets"))

    return CocoTable(
        categories=meta["categories"],
        **{name: array(name) for name in _ARRAYS},
        file_names=packed("file_names"),
        segmentations=packed("segmentations"),
        dropped=meta["dropped"],
        num_dropped=meta["num_dropped"],
    )
