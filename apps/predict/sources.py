"""Finding the images of a `visiondet predict` run, naming them, and splitting them between processes.

A source is a folder (searched recursively), a glob pattern, a single image file, or a ``.txt`` file
that lists image paths (one a line; ``#`` starts a comment; relative paths are relative to the list).
Every image gets a ``name``: its path relative to the common folder of all sources, with ``/``
separators. Names key the outputs (predictions.jsonl lines, mirrored visualisations, mask files),
so they are unique within a run and stable between runs, which is what ``--resume`` relies on.
"""

from __future__ import annotations

import glob
import os
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from vision.data.images import IMAGE_EXTENSIONS

LIST_SUFFIX = ".txt"


class SourceError(ValueError):
    """A source that names nothing usable; the message names the source and the reason."""


@dataclass(frozen=True)
class ImageFile:
    """One input image. path: where to read it; name: its key in the outputs (relative, posix);
    mask_name: the name of its segmentation mask file (``.png``, unique within the run)."""

    path: str
    name: str
    mask_name: str


@dataclass
class Scan:
    """The result of :func:`find_images`: files sorted by name, the folders the sources span
    (folders and glob roots, which outputs must stay out of), and how many files were passed over
    for not having an image extension."""

    files: list[ImageFile]
    folders: list[Path]
    not_images: int


def _is_image_name(path: str) -> bool:
    return os.path.splitext(path)[1].lower() in IMAGE_EXTENSIONS


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _walk(folder: str, exclude: str | None) -> Iterable[str]:
    """Every file under ``folder`` (no symlinked folders: they can loop), skipping ``exclude``."""
    for root, dirs, files in os.walk(folder, followlinks=False):
        dirs[:] = [d for d in dirs if exclude is None or os.path.realpath(os.path.join(root, d)) != exclude]
        for f in files:
            yield os.path.join(root, f)


def _glob_root(pattern: str) -> str:
    """The longest leading folder of ``pattern`` without wildcards: the pattern's "source folder"."""
    parts = Path(pattern).parts
    fixed = []
    for part in parts:
        if glob.has_magic(part):
            break
        fixed.append(part)
    return os.path.abspath(os.path.join(*fixed)) if fixed else os.path.abspath(".")


def _read_list(list_file: str) -> list[str]:
    base = os.path.dirname(os.path.abspath(list_file))
    try:
        with open(list_file, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except UnicodeDecodeError as exc:
        raise SourceError(f"{list_file}: not a UTF-8 text list of image paths ({exc.reason})") from exc
    except OSError as exc:
        raise SourceError(f"{list_file}: cannot read the list ({exc.strerror})") from exc
    paths = []
    for line in lines:
        line = line.strip()
        if line and not line.startswith("#"):
            # Missing listed files stay in: they fail in the reader and land in errors.jsonl.
            paths.append(os.path.abspath(os.path.join(base, os.path.expanduser(line))))
    return paths


def mask_names(names: Sequence[str]) -> list[str]:
    """Mask file name of each image name: the suffix becomes ``.png`` (``a/b.jpg`` -> ``a/b.png``),
    except where two images would share it (``b.jpg`` and ``b.png``): those keep their own suffix in
    front (``b.jpg.png``, ``b.png.png``)."""
    stems = [str(PurePosixPath(n).with_suffix("")) for n in names]
    counts = Counter(stems)
    return [f"{s}.png" if counts[s] == 1 else f"{n}.png" for s, n in zip(stems, names, strict=True)]


def find_images(sources: Sequence[str | os.PathLike], *, exclude: str | os.PathLike | None = None) -> Scan:
    """All images of ``sources``, sorted by name, without duplicates and without anything inside
    ``exclude`` (the run's output folder, which must never be read as input).

    Raises SourceError for a source that does not exist, a glob that matches no file and a run
    without a single file to read.
    """
    if not sources:
        raise SourceError("no --source given")
    excluded = os.path.realpath(exclude) if exclude is not None else None
    paths: list[str] = []
    roots: list[str] = []
    folders: list[Path] = []
    not_images = 0
    for source in map(str, sources):
        if os.path.isdir(source):
            root = os.path.abspath(source)
            found = list(_walk(root, excluded))
            images = [p for p in found if _is_image_name(p)]
            not_images += len(found) - len(images)
            folders.append(Path(root))
        elif os.path.isfile(source) and source.lower().endswith(LIST_SUFFIX):
            images = _read_list(source)
            if not images:
                raise SourceError(f"{source}: the list names no image paths")
            root = os.path.commonpath([os.path.dirname(p) for p in images])
        elif os.path.isfile(source):
            images = [os.path.abspath(source)]  # named explicitly: read it whatever its suffix
            root = os.path.dirname(images[0])
        elif glob.has_magic(source):
            found = [os.path.abspath(p) for p in glob.glob(source, recursive=True) if os.path.isfile(p)]
            images = [p for p in found if _is_image_name(p)]
            not_images += len(found) - len(images)
            if not images:
                raise SourceError(f"{source}: the pattern matches no image files")
            root = _glob_root(source)
            folders.append(Path(root))
        else:
            raise SourceError(f"{source}: no such file, folder or glob match")
        roots.append(root)
        paths.extend(images)

    if excluded is not None:
        paths = [p for p in paths if not _inside(os.path.realpath(p), excluded)]
    # The same file reached twice (a folder and a glob inside it, a symlink) is read once.
    unique: dict[str, str] = {}
    for p in paths:
        unique.setdefault(os.path.realpath(p), p)
    common = os.path.commonpath(roots)
    named = sorted((Path(os.path.relpath(p, common)).as_posix(), p) for p in unique.values())
    if not named:
        raise SourceError(f"no image files found in {', '.join(map(str, sources))} "
                          f"(looked for {', '.join(sorted(IMAGE_EXTENSIONS))})")
    masks = mask_names([n for n, _ in named])
    files = [ImageFile(path=p, name=n, mask_name=m) for (n, p), m in zip(named, masks, strict=True)]
    return Scan(files=files, folders=folders, not_images=not_images)


def shard(items: Sequence, rank: int, world_size: int) -> Sequence:
    """The ``rank``-th of ``world_size`` contiguous, disjoint slices that together cover ``items``.

    Contiguous (not strided) so that concatenating the shards in rank order gives back the sorted list.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside 0..{world_size - 1}")
    n = len(items)
    return items[rank * n // world_size:(rank + 1) * n // world_size]
