"""Pictures and text for the demo page: results and the "how it works" stages drawn at a readable size.

Synthetic scenes are 160-256 px: drawn as they are, a browser stretches them and the labels blur. Every
picture is therefore drawn on a display copy whose longer side is at least ``DISPLAY_MIN_SIDE`` (and never
larger than the inference copy), with boxes scaled from the original image's pixels.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import cv2
import numpy as np

from apps.tasks.inference.base import Result
from apps.tasks.inference.detection import DetectionResult
from detection.explain import Explanation, Stage
from vision import visualize

__all__ = ["DISPLAY_MIN_SIDE", "display_copy", "draw_detections", "draw_result", "explanation_panels",
           "explanation_text"]

DISPLAY_MIN_SIDE = 640


def display_copy(image: np.ndarray) -> tuple[np.ndarray, float]:
    """(picture to draw on, its scale from ``image``): small images enlarged to ``DISPLAY_MIN_SIDE``."""
    height, width = image.shape[:2]
    if max(height, width) >= DISPLAY_MIN_SIDE:
        return image.copy(), 1.0
    scale = DISPLAY_MIN_SIDE / max(height, width)
    size = (round(width * scale), round(height * scale))
    return cv2.resize(image, size, interpolation=cv2.INTER_LINEAR), scale


def draw_detections(image: np.ndarray, result: DetectionResult, scale: float = 1.0) -> np.ndarray:
    """``result`` (boxes in ``image``'s pixels / ``scale``) drawn on a display copy of ``image``."""
    canvas, view = display_copy(image)
    return result.draw(canvas, scale=scale * view)


def draw_result(image: np.ndarray, result: Result) -> np.ndarray:
    """Any task's ``result`` of ``image`` drawn on a display copy of it."""
    canvas, view = display_copy(image)
    return result.draw(canvas, scale=view)


# ---- "how it works" ----------------------------------------------------------------------------------------


def _rank_colors(count: int) -> list[tuple[int, int, int]]:
    """Best-first boxes fade from bright yellow to dark orange, so the ranking shows without any text."""
    start, end = np.array([255, 230, 0]), np.array([200, 70, 0])
    steps = np.linspace(0.0, 1.0, max(count, 2))[:count]
    return [tuple(int(c) for c in start + t * (end - start)) for t in steps]


def _outline(canvas: np.ndarray, boxes: np.ndarray, colors: Sequence[tuple[int, int, int]]) -> np.ndarray:
    """Thin rectangles, the first box drawn last (on top)."""
    for box, color in reversed(list(zip(boxes, colors, strict=True))):
        x0, y0, x1, y1 = (int(round(v)) for v in box)
        cv2.rectangle(canvas, (x0, y0), (x1, y1), color, 1, lineType=cv2.LINE_AA)
    return canvas


Legend = list[tuple[str, tuple[int, int, int]]]


def _stage_picture(image: np.ndarray, stage: Stage, scale: float, class_names: Sequence[str]
                   ) -> tuple[np.ndarray, Legend]:
    """Unlabelled boxes: class colours (and their legend) when the stage has classes, else rank colours."""
    canvas, view = display_copy(image)
    boxes = stage.boxes.cpu().numpy() * (scale * view)
    labels = stage.labels.cpu().tolist()
    if not any(labels):
        return _outline(canvas, boxes, _rank_colors(len(boxes))), []
    _outline(canvas, boxes, [visualize.color_of(k) for k in labels])
    return canvas, [(_name(class_names, k), visualize.color_of(k)) for k in sorted(set(labels))]


def _name(class_names: Sequence[str], label: int) -> str:
    return class_names[label - 1] if 0 < label <= len(class_names) else str(label)


def _anchor_picture(image: np.ndarray, stage: Stage, position: tuple[float, float], scale: float
                    ) -> tuple[np.ndarray, Legend]:
    """The anchors coloured by feature level, a legend with each level's anchor size and best objectness, and
    the position as a cross. (One text label per anchor would cover the picture: 15 anchors sit on one
    point with FPN.)"""
    canvas, view = display_copy(image)
    boxes = stage.boxes.cpu().numpy() * (scale * view)
    levels = stage.labels.cpu().tolist()
    scores = stage.scores.cpu().tolist()
    colors = [visualize.color_of(level + 1) for level in levels]
    for box, color in zip(boxes, colors, strict=True):
        x0, y0, x1, y1 = (int(round(v)) for v in box)
        cv2.rectangle(canvas, (x0, y0), (x1, y1), color, 2, lineType=cv2.LINE_AA)
    entries = []
    for level in sorted(set(levels)):
        members = [i for i, lv in enumerate(levels) if lv == level]
        size = " ".join(stage.names[members[0]].split()[:2])  # "p2 16px"
        best = max(scores[i] for i in members)
        entries.append((f"{size}: objectness up to {best:.2f}", visualize.color_of(level + 1)))
    x, y = (int(round(v * scale * view)) for v in position)
    cv2.drawMarker(canvas, (x, y), (255, 255, 255), cv2.MARKER_CROSS, 18, 4)
    cv2.drawMarker(canvas, (x, y), (220, 0, 0), cv2.MARKER_CROSS, 16, 2)
    return canvas, entries


def explanation_panels(image: np.ndarray, explanation: Explanation, result: DetectionResult, scale: float,
                       class_names: Sequence[str], titles: Sequence[str]) -> list[np.ndarray]:
    """Four pictures: anchors (or the external proposals), before NMS, after NMS, final detections, each with
    its title and legend in a strip below it (nothing over the picture), padded to one height.

    ``image`` is the picture the detector ran on, ``scale`` its size over the original image's (boxes in
    ``explanation`` and ``result`` are in original pixels).
    """
    if explanation.anchors is not None:
        first = _anchor_picture(image, explanation.anchors, explanation.position, scale)
    else:
        first = _stage_picture(image, explanation.proposals_source, scale, class_names)
    pictures = [
        first,
        _stage_picture(image, explanation.before_nms, scale, class_names),
        _stage_picture(image, explanation.after_nms, scale, class_names),
        (draw_detections(image, result, scale), []),
    ]
    panels = [visualize.draw_legend(canvas, entries, title=title)
              for (canvas, entries), title in zip(pictures, titles, strict=True)]
    height = max(p.shape[0] for p in panels)
    return [np.pad(p, ((0, height - p.shape[0]), (0, 0), (0, 0)), constant_values=255) for p in panels]


def explanation_text(e: Explanation, kept: int, threshold: float) -> dict[str, Any]:
    """Panel titles and a paragraph on what happened, with this image's counts."""
    shown = lambda s: min(len(s.boxes), s.total)  # noqa: E731
    h, w = e.input_size
    if e.generation.learned_proposals:
        x, y = e.position
        first = f"1 · {len(e.anchors.boxes)} anchors at ({x:.0f}, {y:.0f})"
        body = (
            f"**Faster R-CNN.** The image is resized to {w}×{h} and the backbone computes its feature maps. "
            f"At every position of every map the region proposal network scores a fixed set of reference "
            f"boxes, the *anchors* (panel 1: those at the cross; click the picture to move it), and predicts "
            f"how to move each one onto an object. The best {e.before_nms.total} moved anchors (the top of "
            f"each level) go to non-maximum suppression at IoU {e.nms_thresh:g} (panel 2 shows the "
            f"{shown(e.before_nms)} best), which leaves {e.after_nms.total} *proposals* (panel 3). The "
            f"Fast R-CNN head pools each proposal's features, classifies it and refines its box: "
            f"{kept} detections score at least {threshold:.2f} (panel 4)."
        )
    else:
        source = e.proposals_source
        first = f"1 · selective search: first {shown(source)} of {source.total} proposals"
        how = ("warps every proposal (with 16 px of context) to a fixed size and runs the whole CNN on each "
               "one; a linear SVM per class scores the region's features and a ridge regressor per class "
               "moves its box (R-CNN)"
               if e.generation.features_per_region else
               f"runs the CNN once on the image resized to {w}×{h}, pools each proposal's features from it "
               f"(RoI pooling), then one softmax scores every class and a regression layer refines the box "
               f"per class (Fast R-CNN)")
        body = (
            f"**{e.generation.title}.** No anchors: selective search groups "
            f"similar neighbouring pixels into {source.total} candidate boxes (panel 1). The detector "
            f"{how}. Panel 2: the "
            f"{shown(e.before_nms)} best-scored regions (each with its most likely class) before "
            f"non-maximum suppression; panel 3: after per-class NMS at IoU {e.nms_thresh:g} "
            f"({e.after_nms.total} boxes remain); panel 4: the {kept} detections scoring at least "
            f"{threshold:.2f}."
        )
    titles = [first, f"2 · top {shown(e.before_nms)} before NMS", f"3 · top {shown(e.after_nms)} after NMS",
              f"4 · {kept} final detections"]
    return {"titles": titles, "body": body}
