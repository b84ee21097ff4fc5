"""The real-imagery development sets, built offline from photographs that ship inside packages.

    python -m benchmarks.realset --out runs/realset --seed 0              # detection: 800 train + 160 val
    python -m benchmarks.realset --task segmentation --out runs/realset_seg --seed 0
    python -m benchmarks.realset --task classification --out runs/realset_cls --seed 0

Real object crops (a cat's face, an espresso cup, a rocket, an astronaut, coins, handwritten digits, people's
faces) are composited at 26-79 px into real photographs cropped, scaled and flipped to 256-480 px
(benchmarks/realset_sources.py says where each picture comes from). What makes it look like a user's data
and not like the synthetic shapes set:

- COCO JSON with non-contiguous category ids (3, 7, 12, ...), listed out of id order;
- negative images (no object) in both splits, and unannotated distractors (real crops of things that are
  not classes: a lion, a horse, a clock, a cameraman, non-face patches, a gift box...) pasted like objects;
- a validation split on background photographs the training split never shows, and, where a source has
  many instances (coins, digits, faces), instances the training split never shows either.

The three tasks' sets are the same composed scenes (same seed, same pictures), written three ways:

- detection: ``{train,val}/images/*.jpg`` and ``{train,val}/annotations.json`` (COCO boxes). Each image
  entry carries ``background`` (the photo it was cut from) so the split's disjointness can be checked.
- segmentation: the same images and ``{train,val}/masks/<stem>.png`` (the VOC layout
  vision/data/segfolder.py reads): each pixel the label of what covers it once the pastes are blended
  (0 background, distractors included; 1..K the categories in id order, as ``classes.txt`` lists them),
  255 (ignore) where no one source covers three quarters of it: the blended borders.
- classification: ``{train,val}/<class>/*.jpg`` (the ImageFolder layout vision/data/folder.py reads):
  crops of each object with context and a ``background`` class (benchmarks/realset_crops.py).

Needs scikit-image (a dev/benchmark dependency: ``pip install -e .[dev]``).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

if __name__ == "__main__" and not __package__:  # run as a script: the repository root first on sys.path
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from benchmarks.realset_sources import Patch, load_distractors, load_objects, load_photos  # noqa: E402

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
SOLID = 0.75  # segmentation: a pixel takes a label where one source covers at least this much of it
IGNORE = 255


@dataclass
class Placed:
    """One pasted patch: its category id (None: a distractor), its box (xyxy, alpha > 0.5), and the alpha
    it was blended with, whose top-left corner lies at (x, y)."""

    category: int | None
    box: list[float]
    alpha: np.ndarray
    x: int
    y: int


@dataclass
class Scene:
    """One composed image of a split and everything pasted into it, in pasting order."""

    split: str
    index: int
    background: str  # the photograph it was cut from
    canvas: np.ndarray  # [H, W, 3] uint8
    placed: list[Placed]

    @property
    def file_stem(self) -> str:
        return f"{self.split}_{self.index:05d}"

    @property
    def objects(self) -> list[Placed]:
        """The annotated pastes (the categories'), not the distractors."""
        return [p for p in self.placed if p.category is not None]


def labels_of_categories() -> dict[int, int]:
    """Category id -> label 1..K in id order (as vision.data.coco maps a COCO file's ids)."""
    return {cid: i + 1 for i, cid in enumerate(sorted(CATEGORIES))}


def segmentation_classes() -> list[str]:
    """The names of labels 1..K of the segmentation masks (``data.options.classes``)."""
    return [CATEGORIES[cid] for cid in sorted(CATEGORIES)]


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
) -> tuple[list[float], int, int] | None:
    """Blend the patch in at a random free place; its box (xyxy) and top-left corner, or None if no free
    place was found."""
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
        return box, x, y
    return None


def _compose(
    rng: np.random.Generator,
    photo: np.ndarray,
    objects: dict[int, list[Patch]],
    distractors: list[Patch],
    negative: bool,
) -> tuple[np.ndarray, list[Placed]]:
    canvas = _background(rng, photo)
    taken: list[list[float]] = []
    placed: list[Placed] = []
    ids = sorted(objects)
    for _ in range(0 if negative else int(rng.integers(1, 7))):
        category = ids[int(rng.integers(len(ids)))]
        pool = objects[category]
        rgb, alpha = _prepare(rng, pool[int(rng.integers(len(pool)))], category)
        where = _paste(rng, canvas, rgb, alpha, taken)
        if where is not None:
            box, x, y = where
            taken.append(box)
            placed.append(Placed(category, box, alpha, x, y))
    for _ in range(int(rng.integers(0, 3))):
        rgb, alpha = _prepare(rng, distractors[int(rng.integers(len(distractors)))], None)
        where = _paste(rng, canvas, rgb, alpha, taken)
        if where is not None:
            box, x, y = where
            taken.append(box)  # later objects keep clear of it: an annotated box is never half covered
            placed.append(Placed(None, box, alpha, x, y))
    return canvas, placed


def _split_instances(objects: dict[int, list[Patch]], val: bool) -> dict[int, list[Patch]]:
    """Classes with many instances keep every fifth one for validation; single photos serve both splits."""
    out = {}
    for category, pool in objects.items():
        if len(pool) < 5:
            out[category] = pool
        else:
            out[category] = [p for i, p in enumerate(pool) if (i % 5 == 0) == val]
    return out


SPLITS = (("train", TRAIN_BACKGROUNDS), ("val", VAL_BACKGROUNDS))


def compose_scenes(split: str, count: int, *, seed: int = 0, negative_fraction: float = 0.1
                   ) -> Iterator[Scene]:
    """The ``count`` scenes of ``split`` ("train" or "val"), the same for every task given the same seed."""
    names = dict(SPLITS)[split]
    photos = load_photos()
    rng = np.random.default_rng([seed, split == "val"])
    pool = _split_instances(load_objects(), split == "val")
    # split distractors too: the val set's non-class things are not the ones training saw as background
    held = [d for i, d in enumerate(load_distractors()) if (i % 4 == 0) == (split == "val")]
    num_negative = max(1, round(count * negative_fraction)) if count > 1 else 0
    negatives = set(rng.choice(count, size=num_negative, replace=False).tolist())
    for index in range(count):
        name = names[index % len(names)]
        canvas, placed = _compose(rng, photos[name], pool, held, index in negatives)
        yield Scene(split, index, name, canvas, placed)


def save_atomic(image: Image.Image, path: Path, **options: object) -> None:
    """Write ``path`` whole or not at all (an interrupted build leaves no truncated file behind)."""
    partial = path.with_name(f".{path.name}.partial")
    image.save(partial, format="PNG" if path.suffix == ".png" else "JPEG", **options)
    partial.replace(path)


def _write_json(path: Path, data: object) -> None:
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(json.dumps(data))
    partial.replace(path)


def split_counts(num_train: int, num_val: int) -> list[tuple[str, int]]:
    return [("train", num_train), ("val", num_val)]


# --------------------------------------------------------------------------------------------- detection


def _coco(split: str, seed: int, scenes: list[dict], annotations: list[dict]) -> dict:
    return {
        "info": {"description": f"visiondet real-imagery development set ({split}, seed {seed})"},
        "images": scenes,
        "annotations": annotations,
        "categories": [{"id": i, "name": n, "supercategory": "object"} for i, n in CATEGORIES.items()],
    }


def _write_scenes(out: Path, split: str, count: int, seed: int, negative_fraction: float, *, masks: bool
                  ) -> Path:
    """``out/<split>/images/*.jpg`` and ``annotations.json`` (and ``masks/*.png``); the JSON's path."""
    folder = out / split / "images"
    folder.mkdir(parents=True, exist_ok=True)
    if masks:
        (out / split / "masks").mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for scene in compose_scenes(split, count, seed=seed, negative_fraction=negative_fraction):
        file_name = f"{scene.file_stem}.jpg"
        save_atomic(Image.fromarray(scene.canvas), folder / file_name, quality=90)
        if masks:
            save_atomic(Image.fromarray(label_map(scene)), out / split / "masks" / f"{scene.file_stem}.png")
        image_id = scene.index + 1
        h, w = scene.canvas.shape[:2]
        images.append({"id": image_id, "file_name": file_name, "width": w, "height": h,
                       "background": scene.background})
        for obj in scene.objects:
            x0, y0, x1, y1 = obj.box
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id, "category_id": obj.category,
                "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0), "iscrowd": 0,
            })
    path = out / split / "annotations.json"
    _write_json(path, _coco(split, seed, images, annotations))
    return path


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
    return {split: _write_scenes(out, split, count, seed, negative_fraction, masks=False)
            for split, count in split_counts(num_train, num_val)}


# ------------------------------------------------------------------------------------------ segmentation


def label_map(scene: Scene, solid: float = SOLID) -> np.ndarray:
    """``[H, W]`` uint8: each pixel's label once the pastes are blended as the canvas was (a later paste
    covers ``alpha`` of what lay under it), 0 for the photograph and the distractors, 255 where no one
    source covers ``solid`` of the pixel (the blended borders)."""
    labels = labels_of_categories()
    h, w = scene.canvas.shape[:2]
    share = np.zeros((len(labels) + 1, h, w), np.float32)  # how much of each pixel each label's sources make
    share[0] = 1.0
    for p in scene.placed:
        ph, pw = p.alpha.shape
        region = share[:, p.y : p.y + ph, p.x : p.x + pw]
        region *= 1.0 - p.alpha
        region[labels.get(p.category, 0)] += p.alpha
    out = share.argmax(axis=0).astype(np.uint8)
    out[share.max(axis=0) < solid] = IGNORE
    return out


def build_segmentation_set(
    out: str | Path,
    *,
    seed: int = 0,
    num_train: int = 800,
    num_val: int = 160,
    negative_fraction: float = 0.1,
) -> dict[str, Path]:
    """The detection set's images (and annotations.json) with ``out/{train,val}/masks/<stem>.png`` and
    ``out/classes.txt`` (names of labels 1..K); the mask folders' paths."""
    out = Path(out)
    paths = {}
    for split, count in split_counts(num_train, num_val):
        _write_scenes(out, split, count, seed, negative_fraction, masks=True)
        paths[split] = out / split / "masks"
    (out / "classes.txt").write_text("\n".join(segmentation_classes()) + "\n")
    return paths


# ------------------------------------------------------------------------------------------------ command

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder to write train/ and val/ into")
    parser.add_argument("--task", choices=["classification", "detection", "segmentation"],
                        default="detection", help="COCO boxes (default), PNG masks or class folders of crops")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-train", type=int, default=800, help="composed training images")
    parser.add_argument("--num-val", type=int, default=160, help="composed validation images")
    parser.add_argument("--negative-fraction", type=float, default=0.1, help="images without objects")
    args = parser.parse_args(argv)
    if args.task == "classification":
        from benchmarks.realset_crops import build_classification_set  # it imports this module

        build = build_classification_set
    else:
        build = build_realset if args.task == "detection" else build_segmentation_set
    paths = build(
        args.out, seed=args.seed, num_train=args.num_train, num_val=args.num_val,
        negative_fraction=args.negative_fraction,
    )
    for split, path in paths.items():
        if args.task == "detection":
            coco = json.loads(path.read_text())
            print(f"{split}: {len(coco['images'])} images, {len(coco['annotations'])} boxes -> {path}")
        elif args.task == "segmentation":
            masks = len(list(path.glob("*.png")))
            print(f"{split}: {masks} masks -> {path} (label names: {args.out / 'classes.txt'})")
        else:
            counts = {d.name: len(list(d.glob("*.jpg"))) for d in sorted(path.iterdir()) if d.is_dir()}
            print(f"{split}: {sum(counts.values())} crops {counts} -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
