"""What a run does about files it cannot decode (the loaders find them: apps/engine/loader.py).

Without ``data.skip_unreadable`` the first one ends the run with one line naming it and what to do
(:func:`unreadable_hint`); :func:`after_unreadable` then removes a run folder that holds no checkpoint yet
(nothing to resume) or adds the error to ``train.log``. With it, :class:`SkippedFiles` lists each skipped
file once in ``skipped_images.txt`` and warns.
"""

from __future__ import annotations

import contextlib
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from apps.engine.loader import Unreadable, UnreadableImageError

__all__ = ["unreadable_hint", "SkippedFiles", "after_unreadable"]



def unreadable_hint(split: Any) -> str:
    """What to do about an unreadable file of ``split`` (the end of the error line)."""
    check = "visiondet data check"
    if getattr(split, "annotations", None) and getattr(split, "images", None):
        check += f" --annotations {split.annotations} --images {split.images}"
    return f"find every such file with `{check}`, or set data.skip_unreadable=true to skip them"


class SkippedFiles:
    """``data.skip_unreadable``: each skipped file listed once in ``skipped_images.txt`` (path, tab, reason;
    a resumed run keeps the list) and warned about. Call it with the files a loader skipped (``on_skip``)."""

    def __init__(self, run_dir: Path, warn: Callable[[str], None]) -> None:
        self.path, self.warn = run_dir / "skipped_images.txt", warn
        self.listed = self.read()  # files skipped so far

    def read(self) -> set[str]:
        if not self.path.is_file():
            return set()
        return {line.split("\t", 1)[0] for line in self.path.read_text(encoding="utf-8").splitlines() if line}

    def __call__(self, files: list[Unreadable]) -> None:
        new = [f for f in dict.fromkeys(files) if f.path not in self.listed]
        if not new:
            return
        with open(self.path, "a", encoding="utf-8") as out:  # every rank appends
            for f in new:
                self.listed.add(f.path)
                out.write(f"{f.path}\t{f.reason}\n")
                self.warn(f"skipped unreadable image {f.path}: {f.reason}")


# what a run writes into its folder, removed when an unreadable file ends it before any checkpoint
_RUN_FILES = ("config.yaml", "train.log", "metrics.jsonl", "curves.png", "skipped_images.txt", "tensorboard")


def after_unreadable(exc: UnreadableImageError, run_dir: Path, is_main: bool) -> UnreadableImageError:
    """An unreadable file ended the run: a run folder with no checkpoint is removed (it holds nothing to
    resume); one with a checkpoint keeps the error line at the end of train.log, and the error says how to
    continue."""
    if not is_main:
        return exc
    if not any(run_dir.glob("*.pt")):
        # only what this run wrote: an output_dir given by the user may hold other files
        for name in _RUN_FILES:
            path = run_dir / name
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            run_dir.rmdir()  # when nothing else is left
        return exc
    hint = (f"continue with `visiondet train --resume {run_dir} data.skip_unreadable=true` or after "
            f"fixing the file; {exc.hint}")
    exc = UnreadableImageError(exc.path, exc.reason, hint)
    with open(run_dir / "train.log", "a", encoding="utf-8") as log:
        log.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} ERROR ERROR: {exc}\n")
    return exc
