"""`visiondet predict`: one job over image folders, from the sources to summary.json.

Order of work: find the files (every process finds the same sorted list), check the output folder, load
the model, drop the files a resumed run already has, take this process's contiguous shard (torchrun), then
stream: DataLoader workers decode, the model runs a batch at a time, and every image is written out (mask,
drawing, then its predictions.jsonl line) before the next. Rank 0 merges the shards and derives the
exports and the summary from the journal.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from apps.engine import distributed
from apps.predict.predictor import Predictor
from apps.predict.results import Prediction, error_type, threshold_hint
from apps.predict.sources import ImageFile, find_images, shard
from apps.predict.writers import (
    COCO_RESULTS,
    CSV_FILE,
    ERRORS,
    IMAGES_DIR,
    PREDICTIONS,
    SHARDS_DIR,
    JsonlWriter,
    OutputError,
    check_output_location,
    count_outputs,
    done_names,
    merge_shards,
    prepare_output,
    read_jsonl,
    write_coco_results,
    write_csv,
    write_summary,
)
from vision.data.images import DEFAULT_MAX_PIXELS

FORMATS = ("coco", "jsonl", "csv")


@dataclass
class PredictOptions:
    """Everything one `visiondet predict` job needs (the command line, as a value)."""

    weights: str
    sources: list[str]
    output: Path
    score_thresh: float | None = None  # None: the checkpoint's calibrated threshold, else 0.5
    nms_thresh: float | None = None
    classes: list[str] | None = None
    top_k: int = 5
    batch_size: int = 8
    workers: int = 2
    device: str = "auto"
    save_images: bool = False
    formats: list[str] = field(default_factory=list)  # empty: coco for detection, jsonl otherwise
    coco_ids: str | None = None
    resume: bool = False
    overwrite: bool = False
    allow_inside_source: bool = False
    max_pixels: int = DEFAULT_MAX_PIXELS
    progress: bool = True
    backend: str = "pytorch"  # or "onnxruntime": the checkpoint's exported file (apps.export)
    int8: str | None = None  # calibration images: the onnxruntime file quantised to int8


def _warn(message: str) -> None:
    print(f"visiondet predict: {message}", file=sys.stderr)


def _load_coco_ids(path: str) -> tuple[dict[str, int], dict[str, int]]:
    """file_name -> id from a COCO JSON (its ``images`` list), and the same by base name where unique."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        images = data["images"] if isinstance(data, dict) else data
        by_name = {str(im["file_name"]).replace("\\", "/"): int(im["id"]) for im in images}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise OutputError(f"--coco-ids {path}: not a COCO JSON with an images list of file_name and id "
                          f"({type(exc).__name__}: {exc})") from None
    bases: dict[str, list[int]] = {}
    for name, image_id in by_name.items():
        bases.setdefault(os.path.basename(name), []).append(image_id)
    return by_name, {b: ids[0] for b, ids in bases.items() if len(ids) == 1}


SPLIT_ANNOTATIONS = "annotations.json"  # a split's COCO file as `visiondet synth` and the README lay it out


def find_split_annotations(files: list[ImageFile]) -> tuple[str | None, str]:
    """The ``annotations.json`` beside the images or one folder above them whose ``images`` list names
    every file (by file name, else base name), so that predictions.json carries the ids that
    ``visiondet evaluate --annotations`` expects; and one line saying what was found (or "" when nothing
    was there)."""
    root = Path(os.path.commonpath([os.path.dirname(os.path.abspath(f.path)) for f in files]))
    for folder in (root, root.parent):
        candidate = folder / SPLIT_ANNOTATIONS
        if not candidate.is_file():
            continue
        try:
            by_name, by_base = _load_coco_ids(str(candidate))
        except OutputError:
            return None, f"{candidate} is not a COCO file with an images list: image ids from file names"
        known = sum(f.name in by_name or os.path.basename(f.name) in by_base for f in files)
        if known < len(files):
            return None, (f"{candidate} lists {known} of the {len(files)} images: image ids from file names "
                          f"(--coco-ids {candidate} to use it anyway)")
        return str(candidate), f"image ids from {candidate}, which lists every image (--coco-ids: another)"
    return None, ""


def image_ids(files: list[ImageFile], coco_ids: str | None) -> dict[str, int | None]:
    """COCO image id of every file: from ``coco_ids`` (file name, else base name); without it the number
    in the file name when every name is a number (COCO's own 000000397133.jpg), else the position in the
    sorted file list (1-based). Files the COCO JSON does not know get None."""
    if coco_ids:
        by_name, by_base = _load_coco_ids(coco_ids)
        return {f.name: by_name.get(f.name, by_base.get(os.path.basename(f.name))) for f in files}
    stems = [Path(f.name).stem for f in files]
    if all(s.isdigit() for s in stems) and len(set(map(int, stems))) == len(stems):
        return {f.name: int(s) for f, s in zip(files, stems, strict=True)}
    return {f.name: i for i, f in enumerate(files, 1)}


def _save_picture(picture: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() in (".jpg", ".jpeg"):
        Image.fromarray(picture).save(path, quality=95)
    else:
        Image.fromarray(picture).save(path)


def _write_item(item: Prediction, output: Path, ids: dict[str, int | None] | None,
                save_images: bool) -> dict[str, Any]:
    """Write an image's files and return its predictions.jsonl record."""
    result = item.result
    height, width = result.image_size
    record: dict[str, Any] = {"file": item.file.name}
    if ids is not None:
        record["image_id"] = ids[item.file.name]
    record.update(width=int(width), height=int(height))
    record.update(result.save(output, item.file.mask_name))  # e.g. segmentation's mask PNG
    record.update(result.record())
    if save_images:
        _save_picture(result.draw(item.image), output / IMAGES_DIR / item.file.name)
    return record


def _threshold_origin(opts: PredictOptions, predictor: Predictor) -> str | None:
    """Where the threshold in use comes from, as summary.json says it."""
    if not predictor.inference.takes_thresholds:
        return None
    if opts.score_thresh is not None:
        return "--score-threshold"
    if {"score_threshold", "class_thresholds"} & predictor.loaded.preprocess.keys():
        return "the checkpoint (calibrated on its validation split)"
    return "the default"


def run_predict(opts: PredictOptions) -> int:
    """Run one job; returns the exit code (0: every readable image done; 1: none could be processed).

    Raises SourceError, OutputError, CheckpointError or ValueError for unusable arguments.
    """
    started = time.perf_counter()
    output = Path(opts.output)
    # A long timeout: ranks that finish their shard early wait at the barrier for the slowest one.
    dist = distributed.init_distributed(opts.device, timeout_s=7 * 24 * 3600.0)
    try:
        scan = find_images(opts.sources, exclude=output)
        check_output_location(output, scan.folders, allow_inside_source=opts.allow_inside_source)
        predictor = Predictor(opts.weights, dist.device, score_thresh=opts.score_thresh,
                              nms_thresh=opts.nms_thresh, classes=opts.classes, top_k=opts.top_k,
                              max_pixels=opts.max_pixels, backend=opts.backend, int8=opts.int8)
        task, coco = predictor.task, predictor.inference.coco_results
        # the COCO results always come with a detector: --format adds exports, it never takes that one away
        formats = list(dict.fromkeys((["coco"] if coco else ["jsonl"]) + list(opts.formats)))
        for fmt in formats:
            if fmt not in FORMATS:
                raise OutputError(f"--format {fmt}: choose from {', '.join(FORMATS)}")
        if opts.coco_ids and not coco:
            raise OutputError(f"--coco-ids: image ids are for detection results; this checkpoint is {task}")
        if "coco" in formats and not coco:
            raise OutputError(f"--format coco: COCO results need a detection checkpoint; this one is {task}")
        coco_ids = opts.coco_ids
        if coco and coco_ids is None:
            coco_ids, line = find_split_annotations(scan.files)
            if line and dist.is_main:
                _warn(line)
        ids = image_ids(scan.files, coco_ids) if coco else None
        run_info = {
            "weights": str(Path(opts.weights).resolve()), "task": task,
            # the threshold in use (given, else the checkpoint's): a resumed run must use the same one
            **predictor.inference.thresholds_in_use(), "nms_threshold": opts.nms_thresh,
            "classes": opts.classes, "top_k": opts.top_k,
            "max_pixels": opts.max_pixels, "sources": [os.path.abspath(s) for s in opts.sources],
            "formats": formats, "save_images": opts.save_images, "coco_ids": coco_ids,
        }
        # Every rank checks (and fails) alike; only rank 0 changes the folder, the others wait for it.
        prepare_output(output, run_info, resume=opts.resume, overwrite=opts.overwrite, write=False)
        distributed.barrier()  # all checked the folder as it was before rank 0 touches it
        if dist.is_main:
            prepare_output(output, run_info, resume=opts.resume, overwrite=opts.overwrite)
        distributed.barrier()
        done_before = done_names(output) if opts.resume else set()
        todo = [f for f in scan.files if f.name not in done_before]
        mine = shard(todo, dist.rank, dist.world_size)
        if dist.world_size == 1:
            journal, error_journal = output / PREDICTIONS, output / ERRORS
        else:
            journal = output / SHARDS_DIR / f"predictions.rank{dist.rank}.jsonl"
            error_journal = output / SHARDS_DIR / f"errors.rank{dist.rank}.jsonl"

        done = failed = 0
        quiet: list[tuple[float, str]] = []  # images with no detection above the threshold but some below
        loop_start = time.perf_counter()
        # Redrawn often on a terminal, a line every half minute in a log file.
        bar = tqdm(total=len(mine), unit="img", desc="predict", dynamic_ncols=True,
                   mininterval=0.5 if sys.stderr.isatty() else 30.0,
                   disable=not (opts.progress and dist.is_main))
        with JsonlWriter(journal) as predictions, JsonlWriter(error_journal) as errors:
            for item in predictor.predict_source(mine, batch_size=opts.batch_size, workers=opts.workers,
                                                 keep_images=opts.save_images):
                if item.error is not None:
                    errors.write({"file": item.file.name, "path": item.file.path,
                                  "error": error_type(item.error), "reason": item.error})
                    failed += 1
                    bar.set_postfix(failed=failed, refresh=False)
                else:
                    predictions.write(_write_item(item, output, ids, opts.save_images))
                    done += 1
                    best_below = item.result.quiet_best()
                    if best_below is not None:
                        quiet.append((best_below, item.file.name))
                bar.update(1)
        bar.close()
        loop_time = time.perf_counter() - loop_start
        per_rank = distributed.all_gather_object({"done": done, "failed": failed, "seconds": loop_time,
                                                  "quiet": len(quiet),
                                                  "quiet_best": max(quiet, default=None)})
        distributed.barrier()

        code = 0
        if dist.is_main:
            code = _finish(output, opts, coco_ids, task, formats, scan, predictor, dist, per_rank,
                           skipped=len(scan.files) - len(todo), wall=time.perf_counter() - started)
        return int(distributed.broadcast_object(code))
    finally:
        distributed.cleanup()


def _finish(
    output: Path, opts: PredictOptions, coco_ids: str | None, task: str, formats: list[str], scan: Any,
    predictor: Predictor, dist: Any, per_rank: list[dict[str, Any]], *, skipped: int, wall: float,
) -> int:
    """Rank 0: merge the shards, write the exports and summary.json, print a short report."""
    merge_shards(output)
    written: dict[str, Any] = {"predictions": PREDICTIONS, "errors": ERRORS}
    extra: dict[str, Any] = {}
    if "coco" in formats:
        n_dets, no_id = write_coco_results(output)
        written["coco"] = COCO_RESULTS
        extra["coco_results"] = {"detections": n_dets, "images_without_id": no_id}
        if no_id:
            _warn(f"{no_id} images have no id in {coco_ids}: left out of {COCO_RESULTS}")
    result_type = predictor.inference.result_type
    if "csv" in formats:
        write_csv(output, result_type)
        written["csv"] = CSV_FILE
    for folder in result_type.folders:  # segmentation's masks/
        written[folder] = folder + "/"
    if opts.save_images:
        written["images"] = IMAGES_DIR + "/"
    counts = count_outputs(output, result_type)
    processed = sum(r["done"] + r["failed"] for r in per_rank)
    slowest = max(r["seconds"] for r in per_rank)
    summary = {
        "task": task,
        "weights": str(opts.weights),
        "device": str(predictor.device) + (f" x {dist.world_size} processes" if dist.world_size > 1 else ""),
        "sources": [str(s) for s in opts.sources],
        "images_found": len(scan.files),
        **counts,
        "skipped": skipped,
        "not_images": scan.not_images,
        "processed_this_run": processed,
        "images_per_second": round(processed / slowest, 3) if slowest > 0 else None,
        "wall_time_s": round(wall, 3),
        "processes": per_rank if dist.world_size > 1 else None,
        **predictor.inference.thresholds_in_use(),
        "score_threshold_from": _threshold_origin(opts, predictor),
        "outputs": written,
        **extra,
    }
    write_summary(output, summary)
    print(f"{counts['done']} images done, {counts['failed']} failed, {skipped} skipped (done before), "
          f"{summary['images_per_second']} img/s -> {output}", file=sys.stderr)
    if counts["failed"]:
        failed = [f"{r['file']} ({r['reason']})" for r in islice(read_jsonl(output / ERRORS), 3)]
        more = f" and {counts['failed'] - len(failed)} more" if counts["failed"] > len(failed) else ""
        _warn(f"could not read {'; '.join(failed)}{more} (all listed in {output / ERRORS})")
    if counts["done"] == 0:
        _warn(f"no image could be processed; see {output / ERRORS}")
        return 1
    quiet = sum(r.get("quiet", 0) for r in per_rank)
    if quiet:
        best, name = max(r["quiet_best"] for r in per_rank if r.get("quiet_best"))
        inference = predictor.inference
        control = "--score-threshold" if inference.takes_thresholds else None  # a classifier's is calibrated
        _warn(threshold_hint(best, inference.quiet_threshold, control, images=quiet, where=name,
                             what=inference.quiet_what))
    return 0
