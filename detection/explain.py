"""How a detector of the R-CNN family reached its answer, stage by stage, for the demo's "how it works" view.

For one image, :func:`explain` runs the detector's own parts one after the other and keeps what each stage
produced, in the image's pixels:

- Faster R-CNN (learned proposals: a RegionProposalNetwork): the anchors at a chosen position (every
  level's anchors centred on the feature cell nearest to it) with their objectness; the best-scored anchors
  moved by their regression deltas, before NMS; the proposals after the RPN's NMS (exactly those the RoI
  heads receive); the final detections.
- Fast R-CNN and R-CNN (proposals from outside the network; R-CNN's RoI heads compute features per
  warped region): the proposals of selective search (or the given ones) instead of anchors; the
  best-scored regions (each with its most likely class and that class's refined box) before the per-class
  NMS; the same after NMS; the detections.

Nothing here re-runs or changes the model: every number comes from ``model.inspect(image)``, the
detector's own intermediate results (the RPN's raw predictions, its candidates before NMS and the
proposals with their objectness; every region's class scores and boxes before NMS; the final detections,
which equal ``model([image])``'s). Only the panels' own views are computed here: the anchors at one
position, and the per-class NMS without a score cut that separates the "before" and "after" panels.

Legend: A anchors at the chosen position, T boxes shown for a stage (at most ``top_n``), K object classes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from detection.generation import Generation
from detection.interfaces import detections_from_scores
from detection.models import TwoStageDetector
from detection.rpn import RegionProposalNetwork, RPNPredictions
from detection.structures import Detections, Thresholds
from detection.transform import ImageBatch, scale_boxes

__all__ = ["Stage", "Explanation", "explain"]


@dataclass
class Stage:
    """Boxes of one stage in the original image's pixels, best first.

    boxes: [T, 4] float32 xyxy; scores: [T] float32 (objectness, or a class probability); labels: [T] int64
    (a class label 1..K where the stage has classes, else 0); ``names[i]`` describes box ``i`` in words
    (anchor level, size and ratio; class name is left to the caller); ``total``: how many boxes the stage
    had before keeping the best ``top_n``.
    """

    boxes: Tensor
    scores: Tensor
    labels: Tensor
    total: int
    names: list[str] = field(default_factory=list)


@dataclass
class Explanation:
    """What :func:`explain` returns.

    generation: the detector's (detection.generation: what it can do, its title). anchors: the anchors at
    ``position`` (Faster R-CNN), or None. proposals_source: the proposals before scoring (selective search
    / given; None for Faster R-CNN, whose proposals are scored anchors). before_nms / after_nms: see the
    module docstring. detections: the model's final answer. position: the (x, y) the anchors were taken at,
    in image pixels, snapped to the feature cell's centre on the finest level. input_size: (h, w) the
    network saw after resizing.
    """

    generation: Generation
    image_size: tuple[int, int]
    input_size: tuple[int, int]
    anchors: Stage | None
    proposals_source: Stage | None
    before_nms: Stage
    after_nms: Stage
    detections: Detections
    position: tuple[float, float] | None = None
    nms_thresh: float = 0.0


@torch.inference_mode()
def explain(
    model: nn.Module,
    image: Tensor,
    *,
    position: tuple[float, float] | None = None,
    top_n: int = 50,
    proposals: Tensor | None = None,
    thresholds: Thresholds | None = None,
) -> Explanation:
    """Run ``model`` (in eval mode) on one image and keep every stage.

    image: [3, H, W] float in [0, 1] on the model's device. position: (x, y) in image pixels for the anchors
    (default: the image centre). top_n: boxes kept for the before/after-NMS stages and shown from the
    proposal source. proposals: [P, 4] xyxy boxes in image pixels for detectors with external proposals
    (default: the model's own source, e.g. selective search). thresholds: the post-processing cuts of the
    final detections and the NMS of the panels (None: the model's own).
    """
    if model.training:
        raise ValueError("explain needs the model in eval mode (call model.eval())")
    if image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"expected one [3, H, W] image, got shape {tuple(image.shape)}")
    if top_n < 1:
        raise ValueError(f"top_n must be at least 1, got {top_n}")
    if not isinstance(model, TwoStageDetector):
        raise ValueError(f"cannot explain a {type(model).__name__}: expected a Faster R-CNN, Fast R-CNN or "
                         "R-CNN")
    generation = model.generation
    height, width = int(image.shape[1]), int(image.shape[2])
    if position is None:
        position = (width / 2.0, height / 2.0)
    seen = model.inspect(image, proposals, thresholds=thresholds)
    batch, stages, nms = seen.batch, seen.stages, seen.thresholds.nms_thresh
    anchors = proposals_source = None
    if generation.learned_proposals:
        # The RPN's own stages: its candidates (before its NMS), then the proposals the heads received.
        anchors, position = _anchors_at(model.proposal_generator, stages.predictions, position, batch)
        (candidates,), (kept,) = stages.candidates, stages.proposals
        before = _top(candidates.boxes, candidates.scores, None, top_n, batch)
        after = _top(kept.boxes, kept.scores, None, top_n, batch)
        nms = model.proposal_generator.nms_thresh
    else:
        # The heads' stages: every region's best class before the per-class NMS, then after it.
        proposals_source = _top(stages.proposals[0].boxes, None, None, top_n, batch)
        before, after = _before_after(seen.class_boxes, seen.class_scores, nms, top_n, batch)
    return Explanation(generation, (height, width), batch.image_sizes[0], anchors, proposals_source, before,
                       after, seen.detections, position, nms)


# ---- Faster R-CNN ------------------------------------------------------------------------------------------


def _anchors_at(rpn: RegionProposalNetwork, predictions: RPNPredictions, position: tuple[float, float],
                batch: ImageBatch) -> tuple[Stage, tuple[float, float]]:
    """Every level's anchors on the feature cell nearest to ``position`` (image pixels), with the
    objectness the RPN head gave them."""
    anchors, objectness = predictions.anchors, predictions.objectness[0]
    padded = tuple(batch.tensors.shape[-2:])
    (in_h, in_w), (orig_h, orig_w) = batch.image_sizes[0], batch.original_sizes[0]
    x = float(position[0]) * in_w / orig_w
    y = float(position[1]) * in_h / orig_h
    boxes, scores, labels, names = [], [], [], []
    start, snapped = 0, None
    for level, (level_anchors, (grid_h, grid_w)) in enumerate(zip(anchors, predictions.grid_sizes,
                                                                  strict=True)):
        # The generator's own stride convention: padded size // grid size.
        stride_h, stride_w = padded[0] // grid_h, padded[1] // grid_w
        i = min(max(round(y / stride_h), 0), grid_h - 1)
        j = min(max(round(x / stride_w), 0), grid_w - 1)
        if snapped is None:
            snapped = (j * stride_w * orig_w / in_w, i * stride_h * orig_h / in_h)
        per_cell = level_anchors.shape[0] // (grid_h * grid_w)
        first = (i * grid_w + j) * per_cell
        boxes.append(level_anchors[first : first + per_cell])
        scores.append(torch.sigmoid(objectness[start + first : start + first + per_cell]))
        labels.append(torch.full((per_cell,), level, dtype=torch.int64, device=objectness.device))
        sizes, ratios = rpn.anchor_generator.sizes[level], rpn.anchor_generator.aspect_ratios[level]
        name = rpn.in_features[level]
        # cell_anchors is ratio-major: all sizes of the first ratio, then the next ratio.
        names += [f"{name} {s:g}px {_ratio(r)}" for r in ratios for s in sizes]
        start += level_anchors.shape[0]
    boxes_t = scale_boxes(torch.cat(boxes), batch.image_sizes[0], batch.original_sizes[0])
    stage = Stage(boxes_t.float(), torch.cat(scores).float(), torch.cat(labels), len(boxes_t), names)
    return stage, snapped


def _ratio(r: float) -> str:
    """An anchor aspect ratio (height / width) as width:height text: 0.5 -> "2:1" (wide), 2 -> "1:2"."""
    return f"1:{r:g}" if r >= 1 else f"{1 / r:g}:1"


# ---- detectors with external proposals --------------------------------------------------------------------


def _before_after(boxes: Tensor, scores: Tensor, nms_thresh: float, top_n: int, batch) -> tuple[Stage, Stage]:
    """boxes [P, K, 4] per class, scores [P, K] (column k is label k + 1), in the network's input pixels.

    Before NMS: each region once, with its most likely class and that class's box. After NMS: the per-class
    NMS the detector runs, with no score threshold, so that the only difference between the two is NMS.
    """
    best, best_class = scores.max(dim=1)
    best_boxes = boxes[torch.arange(len(boxes), device=boxes.device), best_class]
    before = _top(best_boxes, best, best_class + 1, top_n, batch)
    every_region = Thresholds(0.0, nms_thresh, max(boxes.shape[0] * boxes.shape[1], 1))
    # The count after NMS over every region (not only the shown ones) for the text beside the panel.
    every = detections_from_scores(boxes, scores, batch.image_sizes[0], every_region)
    nms = every.filter(slice(0, top_n))
    after = _top(nms.boxes, nms.scores, nms.labels, top_n, batch)
    after.total = len(every)
    return before, after


# ---- helpers -----------------------------------------------------------------------------------------------


def _top(boxes: Tensor, scores: Tensor | None, labels: Tensor | None, top_n: int, batch) -> Stage:
    """The ``top_n`` best boxes (the given order when unscored) in the original image's pixels."""
    total = int(boxes.shape[0])
    if scores is not None:
        order = scores.argsort(descending=True, stable=True)[:top_n]
        boxes, scores = boxes[order], scores[order]
        labels = labels[order] if labels is not None else None
    else:
        boxes = boxes[:top_n]
        scores = torch.zeros(len(boxes), device=boxes.device)
    if labels is None:
        labels = torch.zeros(len(boxes), dtype=torch.int64, device=boxes.device)
    boxes = scale_boxes(boxes.float(), batch.image_sizes[0], batch.original_sizes[0])
    return Stage(boxes, scores.float(), labels, total)
