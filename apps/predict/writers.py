"""The output folder of `visiondet predict`: guarding it, the line-by-line journals, merging the shards of a
multi-process run, and the exports (COCO results, CSV) and summary derived from the journal.

Layout of an output folder::

    run.json            the options that shape the outputs (checked again on --resume)
    predictions.jsonl   one line per finished image: the journal --resume reads
    errors.jsonl        one line per file that could not be read, with the reason
    predictions.json    detection: COCO results [{image_id, category_id, bbox xywh, score}]
    predictions.csv     with --format csv
    summary.json        counts, per-class totals, speed, device
    masks/              segmentation: PNG index masks (0 background, label k = classes[k-1])
    images/             with --save-images: drawn copies, mirroring the source tree
    .shards/            per-process journals of a torchrun job until rank 0 merges them

Everything derived (exports, summary) is rebuilt by streaming the journal, so memory does not grow with
the number of images, and an interrupted run loses at most the line being written.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:  # annotations only: the tasks' results import this module's folder names
    from apps.tasks.inference.base import Result

RUN_JSON = "run.json"
PREDICTIONS = "predictions.jsonl"
ERRORS = "errors.jsonl"
COCO_RESULTS = "predictions.json"
CSV_FILE = "predictions.csv"
SUMMARY = "summary.json"
MASKS_DIR = "masks"
IMAGES_DIR = "images"
SHARDS_DIR = ".shards"
OUTPUTS = (RUN_JSON, PREDICTIONS, ERRORS, COCO_RESULTS, CSV_FILE, SUMMARY, MASKS_DIR, IMAGES_DIR, SHARDS_DIR)

# Options whose change would mix incompatible lines into one predictions.jsonl.
RESUME_KEYS = ("weights", "task", "sources", "score_threshold", "nms_threshold", "classes", "top_k",
               "max_pixels")


class OutputError(ValueError):
    """The output folder cannot be used as asked; the message says why and what to pass instead."""


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def check_output_location(output: Path, folders: list[Path], *, allow_inside_source: bool) -> None:
    """Outputs never land in a source tree unless asked, and never in a source folder itself."""
    out = output.resolve()
    for folder in folders:
        folder = folder.resolve()
        if out == folder or _inside(folder, out):
            raise OutputError(f"--output {output} would hold the source folder {folder}: "
                              "pick an output folder outside it")
        if _inside(out, folder) and not allow_inside_source:
            raise OutputError(f"--output {output} is inside the source folder {folder}: outputs would mix "
                              "with the inputs; pick another folder or pass --allow-inside-source")


def prepare_output(output: Path, run_info: dict[str, Any], *, resume: bool, overwrite: bool,
                   write: bool = True) -> None:
    """Make ``output`` ready: fresh, resumed (settings must match the earlier run) or wiped (--overwrite).

    Only files this module names are ever deleted, and only in a folder holding our ``run.json``.
    ``write=False`` checks without changing anything (ranks other than 0 of a torchrun job).
    """
    if resume and overwrite:
        raise OutputError("--resume and --overwrite contradict each other: pick one")
    present = [name for name in OUTPUTS if (output / name).exists()]
    ours = (output / RUN_JSON).is_file()
    if present and not ours:
        raise OutputError(f"{output} already holds {', '.join(present)} not written by visiondet predict "
                          "(no run.json): pick another --output")
    if present and not (resume or overwrite):
        raise OutputError(f"{output} already holds predictions ({', '.join(present)}): pass --resume to "
                          "finish that run or --overwrite to start again")
    if resume and ours:
        earlier = json.loads((output / RUN_JSON).read_text(encoding="utf-8"))
        changed = [k for k in RESUME_KEYS if earlier.get(k) != run_info.get(k)]
        if changed:
            diff = "; ".join(f"{k}: {earlier.get(k)!r} then, {run_info.get(k)!r} now" for k in changed)
            raise OutputError(f"--resume: {output} was made with other settings ({diff}); "
                              "run with the same ones or pass --overwrite")
    if not write:
        return
    if overwrite and ours:
        for name in OUTPUTS:
            target = output / name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            elif target.exists() or target.is_symlink():
                target.unlink()
    output.mkdir(parents=True, exist_ok=True)
    # Failed files are retried by a resumed run, so their old error lines go.
    for stale in [output / ERRORS, *(output / SHARDS_DIR).glob("errors.rank*.jsonl")]:
        stale.unlink(missing_ok=True)
    (output / SUMMARY).unlink(missing_ok=True)
    _write_json(output / RUN_JSON, run_info)


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def repair_jsonl(path: Path) -> None:
    """Cut a last line left half-written by a killed process, so appending continues cleanly."""
    if not path.is_file():
        return
    with open(path, "rb+") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        if size == 0:
            return
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return
        # Walk back to the last newline; everything after it is the torn line.
        pos = size - 1
        while pos > 0:
            step = min(pos, 65536)
            f.seek(pos - step)
            chunk = f.read(step)
            cut = chunk.rfind(b"\n")
            if cut >= 0:
                f.truncate(pos - step + cut + 1)
                return
            pos -= step
        f.truncate(0)


def read_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    """Records of a journal, one at a time; a torn last line is ignored."""
    if not path.is_file():
        return
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.endswith("\n"):
                break
            if line.strip():
                yield json.loads(line)


def shard_journals(output: Path, journal: str = "predictions") -> list[Path]:
    """The per-rank ``journal`` files of a torchrun job (``.shards/predictions.rank3.jsonl``) by rank."""
    found = (output / SHARDS_DIR).glob(f"{journal}.rank*.jsonl")
    return sorted(found, key=lambda p: int(p.name.split(".rank")[1].split(".")[0]))


def done_names(output: Path) -> set[str]:
    """Names of the images already predicted: in predictions.jsonl or in any shard not merged yet."""
    names: set[str] = set()
    for journal in [output / PREDICTIONS, *shard_journals(output)]:
        names.update(record["file"] for record in read_jsonl(journal))
    return names


class JsonlWriter:
    """Appends one JSON object per line and flushes it, so a killed run keeps every finished line."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        repair_jsonl(path)
        self.path = path
        self._file: TextIO = open(path, "a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> JsonlWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def merge_shards(output: Path) -> None:
    """Append every rank's journal to the run's own files (rank order keeps the sorted order), once each
    image, then remove ``.shards``."""
    shards_dir = output / SHARDS_DIR
    if not shards_dir.is_dir():
        return
    seen = {record["file"] for record in read_jsonl(output / PREDICTIONS)}
    for name, target in (("predictions", PREDICTIONS), ("errors", ERRORS)):
        with JsonlWriter(output / target) as out:
            for journal in shard_journals(output, name):
                repair_jsonl(journal)
                for record in read_jsonl(journal):
                    if name == "predictions":
                        if record["file"] in seen:
                            continue
                        seen.add(record["file"])
                    out.write(record)
    shutil.rmtree(shards_dir)


def write_coco_results(output: Path) -> tuple[int, int]:
    """predictions.jsonl -> predictions.json in COCO results format, streamed.

    Returns (detections written, images left out because they have no image id).
    """
    written = missing = 0
    tmp = output / f".{COCO_RESULTS}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write("[")
        for record in read_jsonl(output / PREDICTIONS):
            if record.get("image_id") is None:
                missing += 1
                continue
            for det in record["detections"]:
                entry = {"image_id": record["image_id"], "category_id": det["category_id"],
                         "bbox": det["bbox"], "score": det["score"]}
                f.write(("," if written else "") + "\n" + json.dumps(entry))
                written += 1
        f.write("\n]\n")
    os.replace(tmp, output / COCO_RESULTS)
    return written, missing


def match_by_file_name(results: list[dict[str, Any]], journal: Path,
                       images: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], str] | None:
    """``results`` (COCO results read from a predict folder) with each image id replaced by the id that
    ``images`` (a COCO ``images`` list) gives the same file, found through ``journal`` (the predictions.jsonl
    beside them, which pairs every file with the id predict wrote); and one line saying what was done.

    None when the journal is missing or every id already names the same file. File names match as written,
    else by base name where that is unique on both sides. Results of files the ground truth does not list
    are left out (and counted in the line).
    """
    if not journal.is_file():
        return None
    by_name = {str(im.get("file_name", "")).replace("\\", "/"): im["id"] for im in images}
    bases: dict[str, list[Any]] = {}
    for name, image_id in by_name.items():
        bases.setdefault(os.path.basename(name), []).append(image_id)
    by_base = {b: ids[0] for b, ids in bases.items() if len(ids) == 1}
    ours: dict[Any, Any] = {}  # predict's id -> the ground truth's id of the same file (None: not listed)
    for record in read_jsonl(journal):
        name = str(record.get("file", ""))
        if record.get("image_id") is not None:
            ours[record["image_id"]] = by_name.get(name, by_base.get(os.path.basename(name)))
    if all(old == new for old, new in ours.items()):
        return None
    matched = [{**r, "image_id": ours[r["image_id"]]} for r in results
               if ours.get(r.get("image_id")) is not None]
    changed = sum(old != new for old, new in ours.items() if new is not None)
    unlisted = sum(new is None for new in ours.values())
    line = (f"the image ids of {changed} of {len(ours)} images are not the ground truth's: matched them by "
            f"file name through {journal}")
    if unlisted:
        line += f"; {unlisted} images the ground truth does not list are left out"
    return matched, line


def write_csv(output: Path, result_type: type[Result]) -> None:
    """predictions.jsonl -> predictions.csv, long format: one row per detection / top-k entry / class, as the
    task's ``result_type`` reads its records (every image gets at least one row)."""
    tmp = output / f".{CSV_FILE}.tmp"
    with open(tmp, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(result_type.csv_columns)
        for record in read_jsonl(output / PREDICTIONS):
            writer.writerows(result_type.csv_rows(record))
    os.replace(tmp, output / CSV_FILE)


def count_outputs(output: Path, result_type: type[Result]) -> dict[str, Any]:
    """Images done and failed, and per-class totals from the journals, as ``result_type`` counts them:
    detections per class (detection), images whose top-1 is the class (classification), images showing
    the class (segmentation)."""
    per_class: Counter[str] = Counter()
    done = 0
    for record in read_jsonl(output / PREDICTIONS):
        done += 1
        per_class.update(result_type.counted(record))
    failed = sum(1 for _ in read_jsonl(output / ERRORS))
    return {"done": done, "failed": failed, result_type.counts_key: dict(sorted(per_class.items()))}


def write_summary(output: Path, summary: dict[str, Any]) -> None:
    _write_json(output / SUMMARY, summary)
