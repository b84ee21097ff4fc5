"""COCO-style detection metrics, with a per-class AP table by class name.

Predictions leave visiondet here as standard COCO results (``image_id``, ``category_id`` = the dataset's
own id, ``bbox`` = [x, y, w, h], ``score``). Every image of the ground truth is evaluated, including images
without objects, so false positives on them count.

Two evaluators give the same numbers: pycocotools' ``COCOeval`` (the reference, pure Python per image)
and faster-coco-eval's ``COCOeval_faster`` (the same algorithm with matching and accumulation in C++;
several times faster at COCO scale, every metric equal to 1e-4 in ``benchmarks/coco_scale.py`` and in the
tests). ``backend="auto"`` takes the faster one when it is installed and falls back to pycocotools.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torchvision.ops import box_convert

from detection.structures import Detections
from vision.data.cocofile import load_coco, paused_gc

BACKENDS = ("auto", "faster", "pycocotools")

# COCOeval.stats order
METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


class EvaluationError(ValueError):
    """Predictions that cannot be scored against a ground truth; the message says which and why."""


def detections_to_coco(
    image_id: int, detections: Detections, classes: Sequence[dict[str, Any]]
) -> list[dict]:
    """One image's Detections -> COCO result dicts (label ``i`` -> ``classes[i - 1]["id"]``, xyxy -> xywh)."""
    boxes = detections.boxes.detach().float().cpu()
    xywh = box_convert(boxes, "xyxy", "xywh")
    ids = [int(c["id"]) for c in classes]
    labels = detections.labels.detach().cpu().tolist()
    if any(not 1 <= label <= len(ids) for label in labels):
        raise EvaluationError(f"image {image_id}: labels {sorted(set(labels))} outside 1..{len(ids)}")
    return [
        {
            "image_id": int(image_id),
            "category_id": ids[label - 1],
            "bbox": [round(v, 3) for v in box],
            "score": s,
        }
        for label, box, s in zip(
            labels, xywh.tolist(), detections.scores.detach().float().cpu().tolist(), strict=True
        )
    ]


def load_ground_truth(annotations: str | os.PathLike | COCO) -> COCO:
    """A pycocotools COCO from a path (optional fields defaulted by vision.data) or as given."""
    if isinstance(annotations, COCO):
        return annotations

    return load_coco(annotations)


def evaluate_coco(
    ground_truth: str | os.PathLike | COCO,
    results: Sequence[dict[str, Any]],
    *,
    classes: Sequence[dict] | None = None,
    backend: str = "auto",
    image_ids: Collection[int] | None = None,
) -> dict[str, float]:
    """Box AP/AR of ``results`` (COCO result dicts) against ``ground_truth``.

    Returns the 12 COCO numbers (``AP`` = AP@[.5:.95], ``AP50``, ``AP75``, ``APs/m/l``, ``AR1/10/100``,
    ``ARs/m/l``) and, for each category with ground truth, ``AP/<name>`` and ``AP50/<name>``. Names come from
    ``classes`` (``[{"id", "name"}]``) or the ground truth's categories. No predictions give zeros.

    Args:
        backend: ``"faster"`` (faster-coco-eval), ``"pycocotools"`` (the reference) or ``"auto"`` (faster
            when installed, else pycocotools).
        image_ids: score these images of the ground truth only (None: all). Evaluation passes the images
            the model saw, so an image skipped as unreadable is neither a miss nor a negative.
    """
    if backend not in BACKENDS:
        raise EvaluationError(f"backend {backend!r}: expected one of {', '.join(BACKENDS)}")
    if backend == "auto":
        backend = "faster" if faster_available() else "pycocotools"
    gt = ground_truth_subset(load_ground_truth(ground_truth), image_ids)
    names = {c["id"]: c["name"] for c in gt.dataset.get("categories", [])}
    names.update({c["id"]: c["name"] for c in classes or []})
    check_results(gt, results)
    metrics = dict.fromkeys(METRIC_NAMES, 0.0)
    cat_ids = sorted(gt.getCatIds())
    with_gt = {a["category_id"] for a in gt.dataset["annotations"] if not a["iscrowd"]}  # one pass
    if not results or not gt.getImgIds():
        for cid in [c for c in cat_ids if c in with_gt]:
            metrics[f"AP/{names[cid]}"] = metrics[f"AP50/{names[cid]}"] = 0.0
        return metrics

    run = _run_faster if backend == "faster" else _run_pycocotools
    with paused_gc():  # both evaluators build a dict per detection and per match, and no cycle
        stats, precision, eval_cat_ids = run(gt, [dict(r) for r in results])  # loadRes writes into them
    # -1 means "no ground truth to measure against": report 0 rather than a negative AP
    metrics.update({name: max(float(v), 0.0) for name, v in zip(METRIC_NAMES, stats, strict=True)})
    for k, cid in enumerate(eval_cat_ids):  # precision: [IoU thresholds, recall points, classes, areas, dets]
        if cid not in with_gt:
            continue
        p = precision[:, :, k, 0, -1]  # all areas, 100 detections
        metrics[f"AP/{names[cid]}"] = _mean_valid(p)
        metrics[f"AP50/{names[cid]}"] = _mean_valid(p[0])
    return metrics


def faster_available() -> bool:
    """Whether faster-coco-eval imports here (its wheel carries compiled code)."""
    try:
        import faster_coco_eval  # noqa: F401
    except ImportError:
        return False
    return True


def _run_pycocotools(gt: COCO, results: list[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray, list[int]]:
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        gt = renumbered(gt)
        coco_eval = COCOeval(gt, gt.loadRes(results), iouType="bbox")
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    return coco_eval.stats, coco_eval.eval["precision"], [int(c) for c in coco_eval.params.catIds]


def _run_faster(gt: COCO, results: list[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray, list[int]]:
    import faster_coco_eval

    with contextlib.redirect_stdout(io.StringIO()):  # summarize() prints the table
        # faster-coco-eval has its own COCO class: it indexes the same dicts (no copy of the annotations)
        fast_gt = faster_coco_eval.COCO(renumbered(gt).dataset)
        coco_eval = faster_coco_eval.COCOeval_faster(
            fast_gt, fast_gt.loadRes(results), iouType="bbox", print_function=lambda *_: None
        )
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    stats = coco_eval.stats[: len(METRIC_NAMES)]
    return stats, coco_eval.eval["precision"], [int(c) for c in coco_eval.params.catIds]


def ground_truth_subset(gt: COCO, image_ids: Collection[int] | None) -> COCO:
    """``gt`` itself, or a copy holding only the images ``image_ids`` and their annotations."""
    if image_ids is None:
        return gt
    keep = {int(i) for i in image_ids}
    images = [im for im in gt.dataset.get("images", []) if im["id"] in keep]
    if len(images) == len(gt.dataset.get("images", [])):
        return gt
    copy = COCO()
    copy.dataset = {**gt.dataset, "images": images,
                    "annotations": [a for a in gt.dataset.get("annotations", []) if a["image_id"] in keep]}
    with contextlib.redirect_stdout(io.StringIO()):  # createIndex prints
        copy.createIndex()
    return copy


def renumbered(gt: COCO) -> COCO:
    """``gt`` itself, or a copy with annotation ids 1..A when one is 0 or below.

    Both evaluators record a match by writing the matched annotation's id and read 0 as "no match", so a
    ground-truth box with id 0 could never count as found. Ids play no other part in the metrics.
    """
    anns = gt.dataset.get("annotations", [])
    if all(a["id"] > 0 for a in anns):
        return gt
    copy = COCO()
    copy.dataset = {**gt.dataset, "annotations": [{**a, "id": i + 1} for i, a in enumerate(anns)]}
    copy.createIndex()
    return copy


def _mean_valid(values: np.ndarray) -> float:
    valid = values[values > -1]
    return float(valid.mean()) if valid.size else 0.0


def check_results(gt: COCO, results: Sequence[dict[str, Any]]) -> None:
    image_ids, cat_ids = set(gt.getImgIds()), set(gt.getCatIds())
    bad_images = sorted({r.get("image_id") for r in results} - image_ids, key=str)
    if bad_images:
        raise EvaluationError(f"predictions for images not in the ground truth: {bad_images[:10]}")
    bad_cats = sorted({r.get("category_id") for r in results} - cat_ids, key=str)
    if bad_cats:
        raise EvaluationError(
            f"predictions with category ids {bad_cats[:10]} that the ground truth does not declare "
            f"(it has {sorted(cat_ids)[:20]}); are labels written instead of the dataset's ids?"
        )
    for r in results:
        box = r.get("bbox")
        if not isinstance(box, list | tuple) or len(box) != 4 or "score" not in r:
            raise EvaluationError(f"not a COCO detection result (needs bbox [x, y, w, h] and score): {r}")


def load_results(path: str | os.PathLike) -> list[dict[str, Any]]:
    """A COCO results JSON file (a list of detections); errors name the file."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise EvaluationError(f"{path}: cannot read predictions: {exc}") from exc
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise EvaluationError(f"{path}: expected a JSON list of COCO detection results")
    return data


def format_table(metrics: dict[str, float], classes: Sequence[dict[str, Any]] | None = None) -> str:
    """The 12 COCO numbers, then one line per class: name, AP, AP50. Fractions in [0, 1], as the training
    log, metrics.jsonl and pycocotools write them (one unit everywhere, never percent)."""
    lines = ["  ".join(f"{name} {metrics.get(name, 0.0):.3f}" for name in METRIC_NAMES[:6])]
    lines.append("  ".join(f"{name} {metrics.get(name, 0.0):.3f}" for name in METRIC_NAMES[6:]))
    names = [c["name"] for c in classes] if classes else [k[3:] for k in metrics if k.startswith("AP/")]
    width = max([len(n) for n in names] + [5])
    lines.append(f"{'class':<{width}}     AP   AP50")
    for name in names:
        if f"AP/{name}" in metrics:
            lines.append(f"{name:<{width}}  {metrics[f'AP/{name}']:.3f}  {metrics[f'AP50/{name}']:.3f}")
        else:
            lines.append(f"{name:<{width}}      -      -  (no ground truth)")
    return "\n".join(lines)
