"""The real things benchmarks/realset.py composites: background photographs, object crops, distractors.

Every picture ships inside an installed package (nothing is downloaded): scikit-image's ``skimage/data``
folder, scikit-learn's sample images and digits, and the sample pictures matplotlib and gradio install.
Objects come as :class:`Patch` (RGB and an alpha in [0, 1]): a silhouette where the photo gives one (coins,
digits' ink, the horse), a rectangle with feathered edges otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
from PIL import Image

__all__ = ["Patch", "load_distractors", "load_objects", "load_photos"]


@dataclass
class Patch:
    """An RGB crop and its alpha in [0, 1] (the object's silhouette, or a feathered rectangle)."""

    rgb: np.ndarray  # [h, w, 3] uint8
    alpha: np.ndarray  # [h, w] float32
    flippable: bool = True  # digits are not mirrored (a mirrored 3 is no digit)


# ------------------------------------------------------------------------------------------------ sources


def _package_dir(module: str) -> Path:
    import importlib

    return Path(importlib.import_module(module).__file__).parent


def _skimage_file(name: str) -> Path:
    try:
        folder = _package_dir("skimage.data")
    except ImportError as exc:
        raise SystemExit(
            "benchmarks.realset needs scikit-image (a dev dependency): pip install -e .[dev]"
        ) from exc
    return folder / name


def _photo(path: Path) -> np.ndarray:
    if not path.is_file():
        raise SystemExit(f"{path}: sample photograph missing (is the package that ships it installed?)")
    return np.asarray(Image.open(path).convert("RGB"))


@cache  # read once per process: each set's two splits and the tests share them
def load_photos() -> dict[str, np.ndarray]:
    """Background photographs by name (grayscale ones become three equal channels)."""
    sk = lambda name: _photo(_skimage_file(name))  # noqa: E731
    sklearn_images = _package_dir("sklearn.datasets") / "images"
    gradio_images = _package_dir("gradio") / "media_assets" / "images"
    return {
        "china": _photo(sklearn_images / "china.jpg"),
        "flower": _photo(sklearn_images / "flower.jpg"),
        "brick": sk("brick.png"),
        "grass": sk("grass.png"),
        "gravel": sk("gravel.png"),
        "hubble": sk("hubble_deep_field.jpg"),
        "motorcycle": sk("motorcycle_left.png"),
        "retina": sk("retina.jpg"),
        "cell": sk("cell.png"),
        "moon": sk("moon.png"),
        "ihc": sk("ihc.png"),
        "tower": _photo(gradio_images / "tower.jpg"),
        "cheetah": _photo(gradio_images / "cheetah.jpg"),
    }


def _feathered(rgb: np.ndarray, border: int = 3) -> Patch:
    """A rectangular crop whose edges fade over ``border`` px, so no hard seam outlines it."""
    h, w = rgb.shape[:2]
    ramp = lambda n: np.minimum(np.arange(n) + 1, np.arange(n)[::-1] + 1) / border  # noqa: E731
    alpha = np.clip(np.minimum(ramp(h)[:, None], ramp(w)[None, :]), 0, 1).astype(np.float32)
    return Patch(np.ascontiguousarray(rgb), alpha)


def _coins() -> list[Patch]:
    """The 24 coins of skimage's coins.png, each cut out by its own thresholded silhouette."""
    from scipy import ndimage
    from skimage.filters import sobel
    from skimage.segmentation import watershed

    gray = _photo(_skimage_file("coins.png"))[..., 0]
    # the classic region-based segmentation of this photo: watershed on the edge map from sure markers
    markers = np.zeros_like(gray, dtype=np.int32)
    markers[gray < 30] = 1
    markers[gray > 150] = 2
    mask = ndimage.binary_fill_holes(watershed(sobel(gray), markers) == 2)
    labels, _ = ndimage.label(mask)
    patches = []
    for sl in ndimage.find_objects(labels):
        region = labels[sl] > 0
        if region.shape[0] < 15 or region.shape[1] < 15:
            continue
        rgb = np.repeat(gray[sl][..., None], 3, axis=2)
        patches.append(Patch(rgb, region.astype(np.float32)))
    return patches


def _digits() -> list[Patch]:
    """scikit-learn's 1,797 real 8x8 handwritten digits as ink (alpha = darkness) of a random colour later."""
    from sklearn.datasets import load_digits

    images = load_digits().images  # [N, 8, 8] in 0..16
    patches = []
    for img in images:
        alpha = (img / 16.0).astype(np.float32)
        rows, cols = np.nonzero(alpha > 0.5)  # the box's own threshold
        alpha = alpha[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
        patches.append(Patch(np.zeros((*alpha.shape, 3), np.uint8), alpha, flippable=False))
    return patches


def _lfw() -> tuple[list[Patch], list[Patch]]:
    """skimage's LFW subset: 100 faces of people and 100 non-face patches (25x25 grayscale)."""
    data = np.load(_skimage_file("lfw_subset.npy"))  # [200, 25, 25] floats in 0..1, faces first
    rgb = [np.repeat((d * 255).astype(np.uint8)[..., None], 3, axis=2) for d in data]
    return [_feathered(r, 2) for r in rgb[:100]], [_feathered(r, 2) for r in rgb[100:]]


@cache  # read once per process: each set's two splits and the tests share them
def load_objects() -> dict[int, list[Patch]]:
    """Every class's instances: category id -> patches."""
    sk = lambda name: _photo(_skimage_file(name))  # noqa: E731
    crop = lambda img, x0, y0, x1, y1: _feathered(img[y0:y1, x0:x1])  # noqa: E731
    faces, _ = _lfw()
    return {
        3: [crop(sk("chelsea.png"), 95, 15, 400, 300)],
        7: [crop(sk("coffee.png"), 170, 10, 432, 305)],
        12: [crop(sk("rocket.jpg"), 288, 120, 362, 422)],
        18: [crop(sk("astronaut.png"), 40, 10, 380, 470)],
        25: _coins(),
        31: _digits(),
        44: faces,
    }


@cache  # read once per process: each set's two splits and the tests share them
def load_distractors() -> list[Patch]:
    """Real things that are not classes; pasted like objects, never annotated."""
    sk = lambda name: _photo(_skimage_file(name))  # noqa: E731
    gradio_images = _package_dir("gradio") / "media_assets" / "images"
    mpl = _package_dir("matplotlib") / "mpl-data" / "sample_data"
    horse = np.asarray(Image.open(_skimage_file("horse.png")).convert("L")) < 128
    _, non_faces = _lfw()
    present = np.asarray(Image.open(mpl / "Minduka_Present_Blue_Pack.png").convert("RGBA"))
    return [
        _feathered(_photo(gradio_images / "lion.jpg")[20:220, 30:230]),
        Patch(np.full((*horse.shape, 3), 60, np.uint8), horse.astype(np.float32)),
        _feathered(sk("clock_motion.png")[40:260, 80:330]),
        _feathered(sk("camera.png")[30:300, 150:400]),
        _feathered(sk("text.png")[:, :220]),
        _feathered(sk("chessboard_RGB.png")),
        Patch(present[..., :3].copy(), present[..., 3].astype(np.float32) / 255),
        *non_faces[:60],
    ]
