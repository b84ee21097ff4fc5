"""The score threshold a detector's checkpoint recommends: the one of best F1 on held-out images.

A detection counts as right the way COCO counts it at IoU 0.5: pycocotools' own matching (``COCOeval``,
greedy by score, the same class, at most 100 detections per image, detections on crowd regions neither
right nor wrong), pooled over every class. The rule has no parameter to tune: of the thresholds the
detections' own scores offer (none under :data:`LOWEST`), the one of highest F1, the harmonic mean of
precision and recall, as Ultralytics reports its best-F1 confidence.
"""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Collection, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from detection.evaluation import check_results, ground_truth_subset, load_ground_truth, renumbered

__all__ = ["LOWEST", "RULE", "ScoreCalibration", "choose_score_threshold"]

LOWEST = 0.05  # no threshold under this: the detectors' own default cut, under which boxes are noise
RULE = "max F1 at IoU 0.5 (COCO matching, all classes pooled)"


@dataclass(frozen=True)
class ScoreCalibration:
    """The chosen threshold and what it does on the images it was chosen on."""

    threshold: float
    precision: float  # of the detections scoring at least ``threshold``, the share that are right
    recall: float  # of the ground-truth boxes, the share found by those detections
    f1: float
    images: int  # images of the ground truth evaluated
    boxes: int  # ground-truth boxes counted (crowd regions are not)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def choose_score_threshold(
    ground_truth: str | os.PathLike | COCO,
    results: Sequence[dict[str, Any]],
    *,
    image_ids: Collection[int] | None = None,
) -> ScoreCalibration | None:
    """The score threshold of highest F1 for ``results`` (COCO result dicts) against ``ground_truth``.

    F1-max, parameter-free: every detection's own score (at least :data:`LOWEST`) is a candidate, and a
    candidate keeps every detection scoring that much or more (so equal scores are kept or dropped
    together); of equal F1s, the highest threshold. Matching is pycocotools' ``COCOeval.evaluate()`` at IoU
    0.5, area "all", 100 detections per image; its ``evalImgs`` are pooled over classes and images.

    Args:
        image_ids: evaluate these images of the ground truth only (None: all), as ``evaluate_coco``.

    Returns None when no threshold has a right detection (no results, no ground-truth boxes, or none
    matched): there is nothing to choose from.
    """
    gt = ground_truth_subset(load_ground_truth(ground_truth), image_ids)
    check_results(gt, results)
    if not results:
        return None
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        gt = renumbered(gt)  # (a ground-truth id 0 would read as "not matched")
        coco_eval = COCOeval(gt, gt.loadRes([dict(r) for r in results]), iouType="bbox")
        params = coco_eval.params
        params.iouThrs = np.array([0.5])  # index 0 of COCO's thresholds, alone: the rest is not needed
        params.areaRng, params.areaRngLbl = params.areaRng[:1], params.areaRngLbl[:1]  # "all"
        params.maxDets = [100]
        coco_eval.evaluate()
    scores, right, boxes = [], [], 0
    for one in coco_eval.evalImgs:  # one per class and image; None where neither has a box
        if one is None:
            continue
        counted = ~one["dtIgnore"][0]  # detections on crowd regions are neither right nor wrong
        scores.append(np.asarray(one["dtScores"], dtype=np.float64)[counted])
        right.append(one["dtMatches"][0][counted] > 0)
        boxes += int(np.count_nonzero(np.asarray(one["gtIgnore"]) == 0))
    images = len(gt.getImgIds())
    if not scores or boxes == 0:
        return None
    score, hit = np.concatenate(scores), np.concatenate(right)
    order = np.argsort(-score, kind="mergesort")
    score, hit = score[order], hit[order]
    tp = np.cumsum(hit)
    fp = np.cumsum(~hit)
    # a threshold at a score keeps every detection of that score: only the last of equal scores counts
    candidate = np.r_[score[1:] != score[:-1], True] & (score >= LOWEST)
    if not candidate.any() or tp[candidate].max() == 0:
        return None
    f1 = np.where(candidate, 2 * tp / (tp + fp + boxes), -1.0)  # 2TP / (2TP + FP + FN)
    best = int(np.argmax(f1))  # the first of equal F1s in descending score order: the highest threshold
    return ScoreCalibration(
        threshold=float(score[best]), precision=float(tp[best] / (tp[best] + fp[best])),
        recall=float(tp[best] / boxes), f1=float(f1[best]), images=images, boxes=boxes,
    )
