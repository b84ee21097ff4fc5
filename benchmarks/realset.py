"""A real-imagery detection development set, built offline from photographs that ship inside packages.

    python -m benchmarks.realset --out runs/realset --seed 0          # 800 train + 160 val images

Real object crops (a cat's face, an espresso cup, a rocket, an astronaut, coins, handwritten digits, people's
faces) are composited at 26-79 px into real photographs cropped, scaled and flipped to 256-480 px. The
photos come from scikit-image's ``skimage/data`` folder, scikit-learn's sample images and digits, and the
sample pictures matplotlib and gradio install. What makes it look like a user's data and not like the
synthetic shapes set:

- COCO JSON with non-contiguous category ids (3, 7, 12, ...), listed out of id order;
- negative images (no object) in both splits, and unannotated distractors (real crops of things that are
  not classes: a lion, a horse, a clock, a cameraman, non-face patches, a gift box...) pasted like objects;
- a validation split on background photographs the training split never shows, and, where a source has
  many instances (coins, digits, faces), instances the training split never shows either.

Each image entry carries ``background`` (the photo it was cut from) so the split's disjointness can be
checked. Needs scikit-image (a dev/benchmark dependency: ``pip install -e .[dev]``).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

# id -> name: the ids are deliberately sparse so label <-> category id mapping is exercised
CATEGORIES: dict[int, str] = {
    12: "rocket",
    3: "cat_face",
    7: "cup",
    18: "astronaut",
    25: "coin",
    31: "digit",
    44: "face",
}
MIN_SIDE, MAX_SIDE = 26, 79  # an object's longest side in the composite, px
IMAGE_MIN, IMAGE_MAX = 256, 480  # a composite's longest side, px
TRAIN_BACKGROUNDS = ("china", "brick", "grass", "hubble", "motorcycle", "tower", "retina", "cell")
VAL_BACKGROUNDS = ("flower", "cheetah", "gravel", "moon", "ihc")
COIN_TINTS = ((1.25, 0.9, 0.7), (1.2, 1.1, 0.7), (1.0, 1.0, 1.05))  # copper, brass, silver


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


def _photos() -> dict[str, np.ndarray]:
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


def _objects() -> dict[int, list[Patch]]:
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


def _distractors() -> list[Patch]:
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


# ---------------------------------------------------------------------------------------------- composing


def _background(rng: np.random.Generator, photo: np.ndarray) -> np.ndarray:
    """A random crop of ``photo`` (40-100% of its short side, aspect 3:4 to 4:3), flipped at random,
    resized so its longest side is 256-480 px."""
    h, w = photo.shape[:2]
    side = min(h, w) * rng.uniform(0.4, 1.0)
    aspect = rng.uniform(0.75, 4 / 3)  # width / height, like a user's photographs
    ch, cw = min(h, int(side / aspect**0.5)), min(w, int(side * aspect**0.5))
    y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    img = photo[y : y + ch, x : x + cw]
    if rng.random() < 0.5:
        img = img[:, ::-1]
    longest = int(rng.integers(IMAGE_MIN, IMAGE_MAX + 1))
    scale = longest / max(ch, cw)
    size = (max(IMAGE_MIN // 2, round(cw * scale)), max(IMAGE_MIN // 2, round(ch * scale)))
    return np.asarray(Image.fromarray(np.ascontiguousarray(img)).resize(size, Image.BILINEAR)).copy()


def _prepare(rng: np.random.Generator, patch: Patch, category: int | None) -> tuple[np.ndarray, np.ndarray]:
    """The patch at a random size (longest side 26-79 px), mirrored, lit and, for ink, coloured."""
    h, w = patch.alpha.shape
    longest = rng.uniform(MIN_SIDE, MAX_SIDE)
    aspect = rng.uniform(0.85, 1.15)  # a little stretch: the same photo never pastes twice alike
    sh, sw = h * aspect, w / aspect
    nh, nw = max(4, round(sh * longest / max(sh, sw))), max(4, round(sw * longest / max(sh, sw)))
    rgb = np.asarray(Image.fromarray(patch.rgb).resize((nw, nh), Image.BILINEAR)).astype(np.float32)
    alpha = np.asarray(Image.fromarray(patch.alpha).resize((nw, nh), Image.BILINEAR))
    if patch.flippable and rng.random() < 0.5:
        rgb, alpha = rgb[:, ::-1], alpha[:, ::-1]
    if category == 31:  # ink: one dark or bright colour for the whole digit
        colour = rng.uniform(0, 80, 3) if rng.random() < 0.6 else rng.uniform(180, 255, 3)
        rgb = np.broadcast_to(colour, rgb.shape).copy()
    elif category == 25:  # grey coins tinted copper, brass or silver
        rgb = rgb * np.array(COIN_TINTS[int(rng.integers(len(COIN_TINTS)))]) * rng.uniform(0.95, 1.05, 3)
    rgb = rgb * rng.uniform(0.75, 1.25) + rng.uniform(-20, 20)
    return np.clip(rgb, 0, 255), np.clip(alpha, 0, 1)


def _box_of(alpha: np.ndarray, x: int, y: int) -> list[float] | None:
    rows, cols = np.nonzero(alpha > 0.5)
    if rows.size == 0:
        return None
    x0, y0, x1, y1 = x + cols.min(), y + rows.min(), x + cols.max() + 1, y + rows.max() + 1
    return [float(x0), float(y0), float(x1), float(y1)]


def _overlaps(box: list[float], boxes: list[list[float]], limit: float = 0.15) -> bool:
    """True if ``box`` covers more than ``limit`` of itself or of any box in ``boxes``."""
    for other in boxes:
        iw = min(box[2], other[2]) - max(box[0], other[0])
        ih = min(box[3], other[3]) - max(box[1], other[1])
        if iw > 0 and ih > 0:
            area = lambda b: (b[2] - b[0]) * (b[3] - b[1])  # noqa: E731
            smaller = min(area(box), area(other))
            if iw * ih > limit * smaller:
                return True
    return False


def _paste(
    rng: np.random.Generator, canvas: np.ndarray, rgb: np.ndarray, alpha: np.ndarray, taken: list[list[float]]
) -> list[float] | None:
    """Blend the patch in at a random free place; its box (xyxy), or None if no free place was found."""
    h, w = alpha.shape
    H, W = canvas.shape[:2]
    if h >= H or w >= W:
        return None
    for _ in range(20):
        x, y = int(rng.integers(0, W - w + 1)), int(rng.integers(0, H - h + 1))
        box = _box_of(alpha, x, y)
        if box is None or _overlaps(box, taken):
            continue
        region = canvas[y : y + h, x : x + w].astype(np.float32)
        a = alpha[..., None]
        canvas[y : y + h, x : x + w] = np.clip(a * rgb + (1 - a) * region, 0, 255).astype(np.uint8)
        return box
    return None


def _compose(
    rng: np.random.Generator,
    photo: np.ndarray,
    objects: dict[int, list[Patch]],
    distractors: list[Patch],
    negative: bool,
) -> tuple[np.ndarray, list[tuple[int, list[float]]]]:
    canvas = _background(rng, photo)
    taken: list[list[float]] = []
    anns: list[tuple[int, list[float]]] = []
    ids = sorted(objects)
    for _ in range(0 if negative else int(rng.integers(1, 7))):
        category = ids[int(rng.integers(len(ids)))]
        pool = objects[category]
        rgb, alpha = _prepare(rng, pool[int(rng.integers(len(pool)))], category)
        box = _paste(rng, canvas, rgb, alpha, taken)
        if box is not None:
            taken.append(box)
            anns.append((category, box))
    for _ in range(int(rng.integers(0, 3))):
        rgb, alpha = _prepare(rng, distractors[int(rng.integers(len(distractors)))], None)
        box = _paste(rng, canvas, rgb, alpha, taken)
        if box is not None:
            taken.append(box)  # later objects keep clear of it: an annotated box is never half covered
    return canvas, anns


def _split_instances(objects: dict[int, list[Patch]], val: bool) -> dict[int, list[Patch]]:
    """Classes with many instances keep every fifth one for validation; single photos serve both splits."""
    out = {}
    for category, pool in objects.items():
        if len(pool) < 5:
            out[category] = pool
        else:
            out[category] = [p for i, p in enumerate(pool) if (i % 5 == 0) == val]
    return out


def build_realset(
    out: str | Path,
    *,
    seed: int = 0,
    num_train: int = 800,
    num_val: int = 160,
    negative_fraction: float = 0.1,
) -> dict[str, Path]:
    """Write ``out/{train,val}/images/*.jpg`` and ``out/{train,val}/annotations.json``; their paths."""
    out = Path(out)
    photos = _photos()
    objects, distractors = _objects(), _distractors()
    paths = {}
    for split, count, names in (("train", num_train, TRAIN_BACKGROUNDS), ("val", num_val, VAL_BACKGROUNDS)):
        rng = np.random.default_rng([seed, split == "val"])
        pool = _split_instances(objects, split == "val")
        # split distractors too: the val set's non-class things are not the ones training saw as background
        held = [d for i, d in enumerate(distractors) if (i % 4 == 0) == (split == "val")]
        folder = out / split / "images"
        folder.mkdir(parents=True, exist_ok=True)
        images, annotations = [], []
        num_negative = max(1, round(count * negative_fraction)) if count > 1 else 0
        negatives = set(rng.choice(count, size=num_negative, replace=False).tolist())
        for index in range(count):
            name = names[index % len(names)]
            canvas, anns = _compose(rng, photos[name], pool, held, index in negatives)
            file_name = f"{split}_{index:05d}.jpg"
            Image.fromarray(canvas).save(folder / file_name, quality=90)
            image_id = index + 1
            h, w = canvas.shape[:2]
            images.append(
                {"id": image_id, "file_name": file_name, "width": w, "height": h, "background": name}
            )
            for category, (x0, y0, x1, y1) in anns:
                annotations.append({
                    "id": len(annotations) + 1, "image_id": image_id, "category_id": category,
                    "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0), "iscrowd": 0,
                })
        coco = {
            "info": {"description": f"visiondet real-imagery development set ({split}, seed {seed})"},
            "images": images,
            "annotations": annotations,
            "categories": [{"id": i, "name": n, "supercategory": "object"} for i, n in CATEGORIES.items()],
        }
        paths[split] = out / split / "annotations.json"
        paths[split].write_text(json.dumps(coco))
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder to write train/ and val/ into")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-train", type=int, default=800)
    parser.add_argument("--num-val", type=int, default=160)
    parser.add_argument("--negative-fraction", type=float, default=0.1, help="images without objects")
    args = parser.parse_args(argv)
    paths = build_realset(
        args.out, seed=args.seed, num_train=args.num_train, num_val=args.num_val,
        negative_fraction=args.negative_fraction,
    )
    for split, path in paths.items():
        coco = json.loads(path.read_text())
        print(f"{split}: {len(coco['images'])} images, {len(coco['annotations'])} boxes -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
