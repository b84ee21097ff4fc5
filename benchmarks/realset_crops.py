"""The real-imagery classification set: crops of benchmarks/realset.py's composed scenes.

    python -m benchmarks.realset --task classification --out runs/realset_cls --seed 0

``{train,val}/<class>/*.jpg`` (the ImageFolder layout vision/data/folder.py reads): 96 x 96 crops of each
annotated object with context around it (1.5-2.2 times its longest side, its centre moved a little), and a
``background`` class of crops that show no category: the photographs themselves and the distractors (a
lion, a clock, non-face patches...). The scenes are those of the detection and segmentation sets (same seed,
same pictures), so the validation split's crops, background ones included, come from photographs,
instances and distractors the training split never shows: what a "none of these" threshold is chosen on.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from benchmarks.realset import (
    CATEGORIES,
    MAX_SIDE,
    MIN_SIDE,
    Scene,
    compose_scenes,
    save_atomic,
    split_counts,
)

__all__ = ["BACKGROUND", "build_classification_set", "scene_crops"]

BACKGROUND = "background"  # the class of crops with no category in them
CROP_SIZE = 96  # px
CONTEXT = (1.5, 2.2)  # a crop's side over its object's longest side


def _square(rng: np.random.Generator, box: list[float], size: tuple[int, int]) -> tuple[int, int, int]:
    """A square (x, y, side) around ``box`` with context (CONTEXT times its longest side), its centre moved
    a little at random, inside an image of ``size`` (H, W)."""
    x0, y0, x1, y1 = box
    side = int(round(max(x1 - x0, y1 - y0) * rng.uniform(*CONTEXT)))
    side = min(side, *size)
    cx = (x0 + x1) / 2 + rng.uniform(-0.12, 0.12) * side
    cy = (y0 + y1) / 2 + rng.uniform(-0.12, 0.12) * side
    x = int(np.clip(round(cx - side / 2), 0, size[1] - side))
    y = int(np.clip(round(cy - side / 2), 0, size[0] - side))
    return x, y, side


def _empty_square(rng: np.random.Generator, scene: Scene) -> tuple[int, int, int] | None:
    """A square the size of an object crop that touches no annotated box, or None after 20 tries."""
    h, w = scene.canvas.shape[:2]
    for _ in range(20):
        side = min(int(round(rng.uniform(MIN_SIDE, MAX_SIDE) * rng.uniform(*CONTEXT))), h, w)
        x, y = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
        clear = all(b[2] <= x or b[0] >= x + side or b[3] <= y or b[1] >= y + side
                    for b in (o.box for o in scene.objects))
        if clear:
            return x, y, side
    return None


def _touches_object(square: tuple[int, int, int], scene: Scene, limit: float = 0.1) -> bool:
    """True if ``square`` holds more than ``limit`` of an annotated box (a distractor's crop must not show
    a category)."""
    x, y, side = square
    for b in (o.box for o in scene.objects):
        iw = min(b[2], x + side) - max(b[0], x)
        ih = min(b[3], y + side) - max(b[1], y)
        if iw > 0 and ih > 0 and iw * ih > limit * (b[2] - b[0]) * (b[3] - b[1]):
            return True
    return False


def scene_crops(rng: np.random.Generator, scene: Scene, background_share: float = 0.3
                ) -> list[tuple[str, tuple[int, int, int]]]:
    """(class name, square) of the classification crops of one scene: every annotated object; a crop
    of the photograph where nothing is pasted, with probability ``background_share``; each distractor
    that leaves the categories out of its crop, with the same probability ("background" both)."""
    size = scene.canvas.shape[:2]
    crops = [(CATEGORIES[o.category], _square(rng, o.box, size)) for o in scene.objects]
    if rng.random() < background_share:
        empty = _empty_square(rng, scene)
        if empty is not None:
            crops.append((BACKGROUND, empty))
    for p in scene.placed:
        if p.category is None and rng.random() < background_share:
            square = _square(rng, p.box, size)
            if not _touches_object(square, scene):
                crops.append((BACKGROUND, square))
    return crops


def build_classification_set(
    out: str | Path,
    *,
    seed: int = 0,
    num_train: int = 800,
    num_val: int = 160,
    negative_fraction: float = 0.1,
    crop_size: int = CROP_SIZE,
) -> dict[str, Path]:
    """``out/{train,val}/<class>/*.jpg``: ``crop_size`` squares of the scenes' objects with context and a
    background class; the split roots."""
    out = Path(out)
    paths = {}
    for split, count in split_counts(num_train, num_val):
        root = out / split
        for name in (*CATEGORIES.values(), BACKGROUND):
            (root / name).mkdir(parents=True, exist_ok=True)
        # its own generator: the scenes stay exactly those of the detection and segmentation sets
        rng = np.random.default_rng([seed, split == "val", 2])
        for scene in compose_scenes(split, count, seed=seed, negative_fraction=negative_fraction):
            image = Image.fromarray(scene.canvas)
            for k, (name, (x, y, side)) in enumerate(scene_crops(rng, scene)):
                crop = image.crop((x, y, x + side, y + side)).resize((crop_size, crop_size), Image.BILINEAR)
                save_atomic(crop, root / name / f"{scene.file_stem}_{k}.jpg", quality=92)
        paths[split] = root
    return paths
