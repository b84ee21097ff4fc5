"""Drawing predictions on images: boxes with labels and scores, segmentation overlays with outlines and a
legend strip below the picture, classification top-k text.

Everything takes and returns ``np.ndarray`` (H, W, 3) uint8 RGB and never modifies its input. It is the one
drawing module: ``visiondet data preview`` (vision.data.preview), the batch predictor (``visiondet predict
--save-images``, through the tasks' results) and the Gradio demo all draw with it.
A class keeps one colour everywhere: colour ``k`` of :func:`class_colors` belongs to label ``k``
(detection and segmentation labels ``1..K``, ``0`` background; classification labels ``0..K-1``).
"""

from __future__ import annotations

import colorsys
from collections.abc import Sequence
from functools import lru_cache

import cv2
import numpy as np
from PIL import Image, ImageDraw, ImageFont

# Inverse of the golden ratio: successive multiples modulo 1 spread hues as evenly as possible
# for any number of classes, so neighbouring labels never get near-identical colours.
_GOLDEN = 0.6180339887498949
IGNORE_LABEL = 255  # segmentation "ignore" pixels are left undrawn


def class_colors(num: int) -> np.ndarray:
    """Distinct colours for labels ``0..num-1``: [num, 3] uint8 RGB, the same for every call."""
    colors = np.zeros((num, 3), dtype=np.uint8)
    for k in range(num):
        hue = (0.05 + k * _GOLDEN) % 1.0
        # Alternate saturation and brightness too: hues alone get close after ~10 classes.
        saturation = (0.9, 0.6, 0.75)[k % 3]
        value = (0.95, 0.8)[(k // 3) % 2]
        colors[k] = [round(255 * c) for c in colorsys.hsv_to_rgb(hue, saturation, value)]
    return colors


def color_of(label: int) -> tuple[int, int, int]:
    """The colour of one label, consistent with :func:`class_colors`."""
    r, g, b = class_colors(label + 1)[label]
    return int(r), int(g), int(b)


def _text_color(rgb: Sequence[int]) -> tuple[int, int, int]:
    # Rec. 601 luma: dark text on light labels, white text on dark ones.
    luma = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]
    return (0, 0, 0) if luma > 140 else (255, 255, 255)


@lru_cache(maxsize=16)
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def _line_width(height: int, width: int) -> int:
    # Thin enough for small thumbnails, still visible on 4k photos.
    return max(1, round(0.002 * (height + width)))


def _check_image(image: np.ndarray) -> None:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        got = f"{image.dtype} array of shape {image.shape}" if isinstance(image, np.ndarray) else type(image)
        raise ValueError(f"expected an (H, W, 3) uint8 RGB image, got {got}")


def _label_box(
    draw: ImageDraw.ImageDraw, xy: tuple[float, float], text: str, color: tuple[int, int, int], font, limit
) -> None:
    """A filled label with ``text``, its bottom-left corner at ``xy`` (moved inside the image if needed)."""
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    pad = 2
    w, h = right - left + 2 * pad, bottom - top + 2 * pad
    x = min(max(0.0, xy[0]), max(0.0, limit[0] - w))
    y = xy[1] - h
    if y < 0:  # no room above the box: put the label just inside its top edge
        y = xy[1]
    y = min(y, max(0.0, limit[1] - h))
    draw.rectangle((x, y, x + w, y + h), fill=color)
    draw.text((x + pad - left, y + pad - top), text, fill=_text_color(color), font=font)


def draw_detections(
    image: np.ndarray,
    boxes: np.ndarray,
    labels: np.ndarray,
    scores: np.ndarray | None = None,
    names: Sequence[str] | None = None,
    *,
    line_width: int | None = None,
) -> np.ndarray:
    """Draw boxes with "name score" labels, one colour per class.

    image: (H, W, 3) uint8 RGB. boxes: [D, 4] xyxy pixels. labels: [D] int (colour index; detection
    labels are 1..K). scores: [D] in [0, 1] or None. names: text per label index (``names[label]``);
    the label number is shown when None. Returns a new image.
    """
    _check_image(image)
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    if len(labels) != len(boxes) or (scores is not None and len(scores) != len(boxes)):
        raise ValueError(f"got {len(boxes)} boxes, {len(labels)} labels and "
                         f"{'no' if scores is None else len(scores)} scores; they must match")
    if names is not None and len(labels) and int(labels.max()) >= len(names):
        raise ValueError(f"label {int(labels.max())} has no name: only {len(names)} names given")
    height, width = image.shape[:2]
    line_width = line_width or _line_width(height, width)
    font = _font(max(10, 4 * line_width + 6))
    colors = class_colors(int(labels.max()) + 1 if len(labels) else 1)
    canvas = Image.fromarray(image)
    draw = ImageDraw.Draw(canvas)
    # Lowest score first, so the most confident boxes and labels end up on top.
    order = np.argsort(scores, kind="stable") if scores is not None else np.arange(len(boxes))
    for i in order:
        x0, y0, x1, y1 = np.clip(boxes[i], 0, [width - 1, height - 1, width - 1, height - 1])
        if x1 < x0 or y1 < y0:
            continue
        color = tuple(int(c) for c in colors[labels[i]])
        draw.rectangle((x0, y0, x1, y1), outline=color, width=line_width)
        name = names[labels[i]] if names is not None else str(int(labels[i]))
        text = name if scores is None else f"{name} {float(scores[i]):.2f}"
        _label_box(draw, (x0, y0), text, color, font, (width, height))
    return np.asarray(canvas)


def colorize_mask(mask: np.ndarray, num_labels: int | None = None) -> np.ndarray:
    """Index mask (H, W) -> colour picture (H, W, 3) uint8: label k gets ``class_colors()[k]``,
    background (0) and ignore (255) are black."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"expected an (H, W) index mask, got shape {mask.shape}")
    valid = mask != IGNORE_LABEL
    top = int(mask[valid].max()) if valid.any() else 0
    colors = class_colors(max(top + 1, num_labels or 0))
    colors[0] = 0
    out = colors[np.where(valid, mask, 0)]
    return out


def overlay_mask(
    image: np.ndarray,
    mask: np.ndarray,
    names: Sequence[str] | None = None,
    *,
    alpha: float = 0.45,
    legend: bool = True,
) -> np.ndarray:
    """Blend class colours over ``image`` where ``mask`` has a class (labels 1..K; 0 and 255 untouched), and
    outline every class region in its full colour.

    image: (H, W, 3) uint8; mask: (H, W) int index mask of the same size; names: text per label
    (``names[k]`` for label k, entry 0 the background). A legend of the classes present goes in a strip
    below the picture (:func:`draw_legend`). The outlines are why: a blue class blended over a green object
    and a green class over a blue one both come out teal, and only the unblended edge tells them apart.
    """
    _check_image(image)
    mask = np.asarray(mask)
    if mask.shape != image.shape[:2]:
        raise ValueError(f"mask of shape {mask.shape} does not match image of size {image.shape[:2]}")
    colors = colorize_mask(mask)
    painted = (mask != 0) & (mask != IGNORE_LABEL)
    out = image.copy()
    blend = (1.0 - alpha) * image[painted].astype(np.float32) + alpha * colors[painted].astype(np.float32)
    out[painted] = np.round(blend).astype(np.uint8)
    present = [int(k) for k in np.unique(mask[painted])]
    width = _line_width(*mask.shape)
    kernel = np.ones((2 * width + 1, 2 * width + 1), np.uint8)
    for k in present:
        region = (mask == k).astype(np.uint8)
        edge = region.astype(bool) & ~cv2.erode(region, kernel, borderType=cv2.BORDER_REPLICATE).astype(bool)
        out[edge] = colors[edge]
    if legend:
        entries = [(names[k] if names is not None else str(k), color_of(k)) for k in present]
        out = draw_legend(out, entries)
    return out


def draw_legend(image: np.ndarray, entries: Sequence[tuple[str, tuple[int, int, int]]],
                title: str | None = None) -> np.ndarray:
    """``image`` with a white strip below it: an optional ``title`` line, then a colour swatch and name per
    entry, laid out left to right and wrapped. Returns a new, taller image (the same one when there is
    nothing to write).

    Below, not on top: a legend drawn inside the picture hides part of it, and viewers (Gradio's image
    toolbar, a zoomed thumbnail) cover the corners where legends usually go.
    """
    _check_image(image)
    if not entries and not title:
        return image.copy()
    height, width = image.shape[:2]
    font = _font(max(11, min(24, width // 32)))
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line = probe.textbbox((0, 0), "Ag", font=font)[3] + 6
    swatch = line - 8
    # lay the entries out in rows first, to know how tall the strip must be
    rows: list[list[tuple[int, str, tuple[int, int, int]]]] = [[]]
    x = 6
    for name, color in entries:
        w = swatch + 6 + probe.textlength(name, font=font) + 14
        if rows[-1] and x + w > width - 6:
            rows.append([])
            x = 6
        rows[-1].append((round(x), name, tuple(color)))
        x += w
    lines = (1 if title else 0) + (len(rows) if entries else 0)
    canvas = Image.new("RGB", (width, height + lines * line + 6), (255, 255, 255))
    canvas.paste(Image.fromarray(image), (0, 0))
    draw = ImageDraw.Draw(canvas)
    y = height + 4
    if title:
        draw.text((6, y), title, fill=(0, 0, 0), font=font)
        y += line
    for row in rows if entries else []:
        for x0, name, color in row:
            draw.rectangle((x0, y + 3, x0 + swatch, y + 3 + swatch), fill=color, outline=(0, 0, 0))
            draw.text((x0 + swatch + 6, y), name, fill=(0, 0, 0), font=font)
        y += line
    return np.asarray(canvas)


def draw_topk(image: np.ndarray, entries: Sequence[tuple[str, float]]) -> np.ndarray:
    """Classification result as text lines "name 87.3%" on a panel in the top-left corner.

    entries: (name, probability) pairs, most likely first. Returns a new image.
    """
    _check_image(image)
    if not entries:
        return image.copy()
    height, width = image.shape[:2]
    font = _font(max(10, min(height, width) // 20))
    canvas = Image.fromarray(image)
    draw = ImageDraw.Draw(canvas)
    lines = [f"{name} {100.0 * prob:.1f}%" for name, prob in entries]
    boxes = [draw.textbbox((0, 0), text, font=font) for text in lines]
    line = max(b[3] - b[1] for b in boxes) + 4
    panel_w = max(b[2] - b[0] for b in boxes) + 8
    draw.rectangle((0, 0, min(width - 1, panel_w), min(height - 1, line * len(lines) + 4)), fill=(0, 0, 0))
    y = 4
    for i, (text, box) in enumerate(zip(lines, boxes, strict=True)):
        # The most likely class in white, the runners-up in grey.
        fill = (255, 255, 255) if i == 0 else (190, 190, 190)
        draw.text((4 - box[0], y - box[1]), text, fill=fill, font=font)
        y += line
    return np.asarray(canvas)
