"""Anchors and data: how well anchors cover a dataset's boxes, and anchors fitted to cover them.

Everything is measured as the RPN sees it: boxes are scaled by the model's resize (``min_size``,
``max_size``; every ``min_size`` of a multi-scale list counts) and anchors are the exact boxes
:class:`~detection.anchors.AnchorGenerator` makes (whole-pixel corners). Two placements:

- ``grid``: each anchor sits where the RPN puts it, on its level's grid over the image padded to
  ``size_divisible`` (centres at ``k * stride``, the stride inferred per level as AnchorGenerator infers it),
  and a box is compared with the nearest position of each anchor shape (IoU falls as the centres move
  apart along either axis, so the nearest position is the best one). This is the recall the RPN can reach.
- ``centred``: every anchor centred on the box (the upper bound usually quoted as "best possible recall").

Legend: M boxes, A anchor shapes (all levels), L levels.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from detection.anchors import AnchorGenerator
from detection.generation import generation_of
from detection.models import RPNConfig, rpn_levels

__all__ = [
    "AnchorLayout",
    "coco_boxes",
    "boxes_at_model_scale",
    "anchor_corners",
    "centred_iou",
    "grid_iou",
    "best_possible_recall",
    "fit_ratios",
    "fit_anchors",
    "size_summary",
    "AnchorReport",
    "anchor_report",
    "resolve_auto_anchors",
]

_CHUNK = 65_536  # boxes per block of IoUs: [_CHUNK, A] float64 stays a few MB


@dataclass
class AnchorLayout:
    """What the RPN's AnchorGenerator is built from, plus each level's nominal stride."""

    sizes: list[list[float]]  # per level
    ratios: list[float]  # height / width, the same on every level
    strides: list[int]  # per level, in model-input pixels

    def shapes(self) -> tuple[np.ndarray, np.ndarray]:
        """Corners [A, 4] of every zero-centred anchor (level-major) and the level index [A] of each."""
        corners = anchor_corners(self.sizes, self.ratios)
        levels = np.concatenate([np.full(len(c), i) for i, c in enumerate(corners)])
        return np.concatenate(corners), levels


def coco_boxes(data: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """Boxes [M, 4] xyxy and their image's (height, width) [M, 2] from a COCO instances dict.

    Crowd regions and boxes under 1 px are left out (training ignores them too); boxes are clipped to the
    image, as the datasets clip them.
    """
    sizes = {img["id"]: (float(img["height"]), float(img["width"])) for img in data.get("images", [])}
    boxes, hw = [], []
    for ann in data.get("annotations", []):
        if ann.get("iscrowd") or ann.get("image_id") not in sizes or len(ann.get("bbox") or ()) != 4:
            continue
        h, w = sizes[ann["image_id"]]
        x, y, bw, bh = (float(v) for v in ann["bbox"])
        x1, y1, x2, y2 = max(x, 0.0), max(y, 0.0), min(x + bw, w), min(y + bh, h)
        if x2 - x1 >= 1 and y2 - y1 >= 1:
            boxes.append((x1, y1, x2, y2))
            hw.append((h, w))
    return np.asarray(boxes, dtype=np.float64).reshape(-1, 4), np.asarray(hw, dtype=np.float64).reshape(-1, 2)


def boxes_at_model_scale(boxes: np.ndarray, image_hw: np.ndarray, min_size: int | Sequence[int],
                         max_size: int, size_divisible: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Boxes [M * S, 4] after the detector's resize for each of the S ``min_size`` values, and the padded
    (height, width) [M * S, 2] of their image.

    The resize is DetectionTransform's: scale ``min(min_size / short side, max_size / long side)``, output
    ``floor(side * scale)``, boxes scaled by output / input per axis, padding up to ``size_divisible``.
    """
    options = [min_size] if isinstance(min_size, int | float) else list(min_size)
    out_boxes, out_hw = [], []
    for target in options:  # (in place where it can: a COCO-sized set has close to a million boxes)
        scale = np.minimum(target / image_hw.min(axis=1), max_size / image_hw.max(axis=1))
        new_hw = np.floor(image_hw * scale[:, None])
        del scale
        scaled = boxes.copy()
        scaled[:, 0::2] *= (new_hw[:, 1] / image_hw[:, 1])[:, None]
        scaled[:, 1::2] *= (new_hw[:, 0] / image_hw[:, 0])[:, None]
        np.ceil(np.divide(new_hw, size_divisible, out=new_hw), out=new_hw)
        new_hw *= size_divisible
        out_boxes.append(scaled)
        out_hw.append(new_hw)
    if len(options) == 1:
        return out_boxes[0], out_hw[0]
    return np.concatenate(out_boxes), np.concatenate(out_hw)


def anchor_corners(sizes: Sequence[Sequence[float]], ratios: Sequence[float]) -> list[np.ndarray]:
    """Zero-centred anchors [A_l, 4] of each level, exactly as AnchorGenerator makes them."""
    generator = AnchorGenerator(sizes, [list(ratios)])
    return [generator.cell_anchors(level).double().numpy() for level in range(len(generator.sizes))]


def centred_iou(box_wh: np.ndarray, anchor_wh: np.ndarray) -> np.ndarray:
    """IoU [M, A] of boxes and anchors sharing a centre: ``min(w) min(h) / (union)``."""
    inter = (np.minimum(box_wh[:, None, 0], anchor_wh[None, :, 0])
             * np.minimum(box_wh[:, None, 1], anchor_wh[None, :, 1]))
    union = box_wh[:, None, 0] * box_wh[:, None, 1] + anchor_wh[None, :, 0] * anchor_wh[None, :, 1] - inter
    return inter / union


def _overlap(lo_a: np.ndarray, hi_a: np.ndarray, lo_b: np.ndarray, hi_b: np.ndarray) -> np.ndarray:
    return np.clip(np.minimum(hi_a, hi_b) - np.maximum(lo_a, lo_b), 0.0, None)


def grid_iou(boxes: np.ndarray, padded_hw: np.ndarray, corners: np.ndarray, levels: np.ndarray,
             strides: Sequence[int]) -> np.ndarray:
    """IoU [M, A] of each box with the nearest grid position of each anchor shape.

    Level ``l`` of an image padded to ``H x W`` has ``ceil(H / stride_l)`` rows (what strided convolutions
    and FPN's extra pooled level give) and AnchorGenerator infers its stride as ``H // rows``; anchors are
    centred on ``(col * stride_w, row * stride_h)``.
    """
    cx = (boxes[:, 0] + boxes[:, 2]) / 2
    cy = (boxes[:, 1] + boxes[:, 3]) / 2
    out = np.zeros((len(boxes), len(corners)))
    for a, (corner, level) in enumerate(zip(corners, levels, strict=True)):
        nominal = strides[int(level)]
        rows, cols = np.ceil(padded_hw[:, 0] / nominal), np.ceil(padded_hw[:, 1] / nominal)
        step_h, step_w = padded_hw[:, 0] // rows, padded_hw[:, 1] // cols
        ax = np.clip(np.round(cx / step_w), 0, cols - 1) * step_w
        ay = np.clip(np.round(cy / step_h), 0, rows - 1) * step_h
        x1, y1, x2, y2 = ax + corner[0], ay + corner[1], ax + corner[2], ay + corner[3]
        inter = _overlap(boxes[:, 0], boxes[:, 2], x1, x2) * _overlap(boxes[:, 1], boxes[:, 3], y1, y2)
        area_b = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        out[:, a] = inter / (area_b + (corner[2] - corner[0]) * (corner[3] - corner[1]) - inter)
    return out


def _ious(boxes: np.ndarray, padded_hw: np.ndarray, layout: AnchorLayout, placement: str) -> np.ndarray:
    corners, levels = layout.shapes()
    if placement == "grid":
        return grid_iou(boxes, padded_hw, corners, levels, layout.strides)
    if placement == "centred":
        wh = np.stack([boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]], axis=1)
        return centred_iou(wh, np.stack([corners[:, 2] - corners[:, 0], corners[:, 3] - corners[:, 1]], 1))
    raise ValueError(f"placement must be 'grid' or 'centred', got {placement!r}")


def best_possible_recall(boxes: np.ndarray, padded_hw: np.ndarray, layout: AnchorLayout, *,
                         placement: str = "grid", thresholds: Sequence[float] = (0.5, 0.7)
                         ) -> dict[float, float]:
    """Fraction of boxes whose best anchor reaches each IoU threshold (1.0 for no boxes)."""
    if not len(boxes):
        return {t: 1.0 for t in thresholds}
    # in chunks of boxes: the [M, A] IoU matrix of a COCO-sized set alone would be about 100 MB
    best = np.concatenate([_ious(boxes[i:i + _CHUNK], padded_hw[i:i + _CHUNK], layout, placement).max(axis=1)
                           for i in range(0, len(boxes), _CHUNK)])
    return {t: float((best >= t).mean()) for t in thresholds}


# ---------------------------------------------------------------------------------------------- fitting


def _kmeans_1d(values: np.ndarray, k: int, iters: int = 50) -> np.ndarray:
    """Sorted centres of at most k clusters of 1-D values (Lloyd's algorithm from the k quantile midpoints;
    a cluster left without values is dropped)."""
    centres = np.quantile(values, (np.arange(k) + 0.5) / k)
    for _ in range(iters):
        assign = np.abs(values[:, None] - centres[None]).argmin(axis=1)
        used = [j for j in range(len(centres)) if (assign == j).any()]
        new = np.array([values[assign == j].mean() for j in used])
        if len(new) == len(centres) and np.allclose(new, centres):
            break
        centres = new
    return np.sort(centres)


def fit_ratios(boxes: np.ndarray, k: int = 3) -> list[float]:
    """``k`` aspect ratios (height / width) from 1-D k-means on the boxes' log ratios, rounded to 2
    decimals; ratios within 10 % of each other are merged (all-square data gives ``[1.0]``)."""
    if not len(boxes):
        raise ValueError("no boxes to fit aspect ratios to")
    log_r = np.log((boxes[:, 3] - boxes[:, 1]) / (boxes[:, 2] - boxes[:, 0]))
    merged: list[float] = []
    for c in _kmeans_1d(log_r, min(k, len(log_r))):
        if not merged or c - math.log(merged[-1]) > math.log(1.1):
            merged.append(round(float(math.exp(c)), 2))
    return merged


def _fitness(best_iou: np.ndarray) -> float:
    """What the fit maximises: best possible recall at 0.5 and at 0.7 plus the mean best IoU (each in
    [0, 1]; the recalls are what matter, the mean breaks their ties towards tighter anchors)."""
    return float((best_iou >= 0.5).mean() + (best_iou >= 0.7).mean() + best_iou.mean())


def fit_anchors(boxes: np.ndarray, padded_hw: np.ndarray, *, strides: Sequence[int],
                sizes_per_level: Sequence[int], ratios: Sequence[float] | None = None, num_ratios: int = 3,
                sizes: Sequence[Sequence[float]] | None = None,
                initial: Sequence[Sequence[float]] | None = None, max_boxes: int = 2000, seed: int = 0
                ) -> AnchorLayout:
    """Anchors that cover ``boxes`` (already at model scale) on the real grid.

    Ratios: given, or :func:`fit_ratios`. Sizes: given, or fitted by coordinate ascent on
    :func:`_fitness` of the best grid IoUs: each size in turn tried over a geometric grid (steps of
    2^(1/8)) between its neighbours, so sizes never decrease from one level to the next, and never below the
    level's stride (a smaller anchor leaves gaps between its grid positions). The ascent starts from
    k-means on log sqrt(area) (one cluster per size, finest level first), from sizes spread geometrically
    over the 2-98 % quantiles, and from ``initial`` (e.g. the configured sizes), and keeps the best, so
    the fitted sizes are never worse on that measure than ``initial`` with the same ratios. Beyond
    ``max_boxes`` boxes a seeded sample is used.
    """
    if not len(boxes):
        raise ValueError("no boxes to fit anchors to")
    if len(boxes) > max_boxes:
        keep = np.random.default_rng(seed).choice(len(boxes), max_boxes, replace=False)
        boxes, padded_hw = boxes[keep], padded_hw[keep]
    ratios = list(ratios) if ratios is not None else fit_ratios(boxes, num_ratios)
    if sizes is not None:
        return AnchorLayout([list(map(float, s)) for s in sizes], ratios, list(strides))
    counts = list(sizes_per_level)
    slot_level = [lvl for lvl, n in enumerate(counts) for _ in range(n)]
    floors = [float(strides[lvl]) for lvl in slot_level]
    side = np.sqrt((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))
    kmeans = [float(np.exp(c)) for c in _kmeans_1d(np.log(side), len(slot_level))]
    kmeans += [kmeans[-1] * 2.0 ** (i + 1) for i in range(len(slot_level) - len(kmeans))]  # few sizes
    lo_q, hi_q = np.quantile(side, [0.02, 0.98])
    spread = list(np.geomspace(lo_q, hi_q, len(slot_level))) if len(slot_level) > 1 else [float(lo_q)]
    starts = [kmeans, spread] + ([[float(v) for level in initial for v in level]] if initial else [])

    def slot_best(j: int, size: float) -> np.ndarray:  # best IoU of every box with slot j's anchors
        corners = anchor_corners([[size]], ratios)[0]
        return grid_iou(boxes, padded_hw, corners, np.zeros(len(corners), int), [strides[slot_level[j]]]
                        ).max(axis=1)

    candidates = np.exp2(np.arange(np.floor(np.log2(side.min()) * 8) - 8,
                                   np.ceil(np.log2(side.max()) * 8) + 9) / 8)
    results = []
    for flat in starts:
        flat = [max(s, f) for s, f in zip(flat, floors, strict=True)]
        for j in range(1, len(flat)):
            flat[j] = max(flat[j], flat[j - 1])
        best = np.stack([slot_best(j, s) for j, s in enumerate(flat)])  # [slots, M]
        score = _fitness(best.max(axis=0))
        for _ in range(4):
            changed = False
            for j in range(len(flat)):
                others = np.delete(best, j, axis=0).max(axis=0) if len(flat) > 1 else np.zeros(len(boxes))
                lo = max(flat[j - 1] if j else 0.0, floors[j])
                hi = flat[j + 1] if j + 1 < len(flat) else math.inf
                for size in candidates[(candidates >= lo) & (candidates <= hi)]:
                    trial = slot_best(j, float(size))
                    trial_score = _fitness(np.maximum(others, trial))
                    if trial_score > score + 1e-9:
                        flat[j], best[j], score, changed = float(size), trial, trial_score, True
            if not changed:
                break
        results.append((score, flat))
    flat = max(results, key=lambda r: r[0])[1]  # (the first of equal scores)
    fitted, start = [], 0
    for n in counts:
        fitted.append([round(float(s), 1) for s in flat[start:start + n]])
        start += n
    return AnchorLayout(fitted, ratios, list(strides))


def size_summary(boxes: np.ndarray) -> dict[str, list[float]]:
    """Quantiles (0, 5, 25, 50, 75, 95, 100 %) of box width, height, sqrt(area) and height / width."""
    if not len(boxes):
        return {}
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    q = (0, 0.05, 0.25, 0.5, 0.75, 0.95, 1.0)
    return {name: [float(v) for v in np.quantile(values, q)]
            for name, values in (("width", w), ("height", h), ("sqrt(area)", np.sqrt(w * h)),
                                 ("height/width", h / w))}


# ------------------------------------------------------------------------------------ detector configs


@dataclass
class AnchorReport:
    """How a detector's anchors cover a set of boxes, and the anchors fitted to them (grid and centred
    best possible recall at IoU 0.5 and 0.7, in that order of keys)."""

    num_boxes: int
    min_size: list[int]
    max_size: int
    sizes_in_file: dict[str, list[float]]  # size_summary of the boxes as annotated
    sizes_in_model: dict[str, list[float]]  # and as the RPN sees them
    configured: AnchorLayout
    configured_grid: dict[float, float]
    configured_centred: dict[float, float]
    fitted: AnchorLayout
    fitted_grid: dict[float, float]
    fitted_centred: dict[float, float]


def anchor_report(cfg: Any, boxes: np.ndarray, image_hw: np.ndarray, *, fit_sizes: bool = True,
                  fit_ratios: bool = True) -> AnchorReport:
    """Coverage of ``boxes`` ([M, 4] xyxy in their images of ``image_hw`` [M, 2]) by the anchors of the
    detector config ``cfg`` (a DetectorConfig; "auto" entries count as the architecture's defaults), and
    anchors fitted to them (sizes and/or ratios; the same number of sizes per level, at most as many
    ratios)."""
    sizes, strides = rpn_levels(cfg)
    rpn = cfg.rpn or RPNConfig()
    ratios = RPNConfig().aspect_ratios if rpn.aspect_ratios == "auto" else list(rpn.aspect_ratios)
    configured = AnchorLayout(sizes, ratios, strides)
    scaled, padded = boxes_at_model_scale(boxes, image_hw, cfg.min_size, cfg.max_size, cfg.size_divisible)
    fitted = fit_anchors(scaled, padded, strides=strides, sizes_per_level=[len(s) for s in sizes],
                         num_ratios=len(ratios), ratios=None if fit_ratios else ratios,
                         sizes=None if fit_sizes else sizes, initial=sizes)
    return AnchorReport(
        num_boxes=len(boxes),
        min_size=[cfg.min_size] if isinstance(cfg.min_size, int) else list(cfg.min_size),
        max_size=cfg.max_size, sizes_in_file=size_summary(boxes), sizes_in_model=size_summary(scaled),
        configured=configured,
        configured_grid=best_possible_recall(scaled, padded, configured),
        configured_centred=best_possible_recall(scaled, padded, configured, placement="centred"),
        fitted=fitted,
        fitted_grid=best_possible_recall(scaled, padded, fitted),
        fitted_centred=best_possible_recall(scaled, padded, fitted, placement="centred"),
    )


def resolve_auto_anchors(cfg: Any, boxes: np.ndarray, image_hw: np.ndarray
                         ) -> tuple[Any, AnchorReport | None]:
    """``cfg`` with ``rpn.anchor_sizes`` / ``rpn.aspect_ratios`` "auto" replaced by values fitted to the
    boxes (the other one kept as configured), and the report; ``(cfg, None)`` when nothing is "auto"."""
    from dataclasses import replace

    if cfg.rpn is None or "auto" not in (cfg.rpn.anchor_sizes, cfg.rpn.aspect_ratios):
        return cfg, None
    if not generation_of(cfg.arch).learned_proposals:
        raise ValueError(f"rpn anchors 'auto': {cfg.arch} has no RPN (anchors belong to faster_rcnn_* archs)")
    if not len(boxes):
        raise ValueError("rpn anchors 'auto': the training annotations hold no boxes to fit anchors to")
    fit_sizes, fit_ratios = cfg.rpn.anchor_sizes == "auto", cfg.rpn.aspect_ratios == "auto"
    report = anchor_report(cfg, boxes, image_hw, fit_sizes=fit_sizes, fit_ratios=fit_ratios)
    rpn = replace(cfg.rpn, anchor_sizes=report.fitted.sizes if fit_sizes else cfg.rpn.anchor_sizes,
                  aspect_ratios=report.fitted.ratios)
    return replace(cfg, rpn=rpn), report
