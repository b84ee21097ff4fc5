"""Write the demo's real-photo example images (see weights/build.sh examples_real and weights/README.md).

    python weights/pick_real_examples.py weights/examples_real

Every picture ships inside an installed package (nothing is downloaded) and none is a training image of the
real-photo models (benchmarks/realset.py, seed 0):

- ``photo_<thing>.jpg``: the four photographs the single-photo categories were cut from (skimage's
  chelsea, coffee, rocket, astronaut), whole. Training saw only a crop of each, pasted small into other
  photographs; the thing is the very one it learned, so these show that instance, not its category.
- ``crop_<class>.jpg``: the first validation crop of each class with many instances (coin, face, digit),
  as benchmarks/realset_crops.py cuts it: an instance training never shows, on a photograph training never
  shows, composited.
- ``scene_real_<n>.jpg``: the first validation scenes with 3 to 5 objects of at least 3 categories, each at
  least ``MIN_OBJECT`` px long (the upper half of the sets' 26-79 px: a size the models were trained on that
  is also readable on the page); composited into held-out photographs.
- ``photo_lion.jpg``: gradio's lion.jpg, a distractor only the validation split shows: none of the
  categories, for "none of these".

``examples.json`` gives each file its caption (the gallery's accessible name), the tab it belongs to
(``classification`` or ``scenes``: detection, segmentation, how it works), where it comes from, and for a
scene its boxes (COCO x, y, w, h and class names) and its index among ``compose_scenes("val", NUM_VAL)``,
from which tests rebuild its masks (benchmarks.realset.label_map).
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.realset import CATEGORIES, compose_scenes  # noqa: E402
from benchmarks.realset_crops import CROP_SIZE, scene_crops  # noqa: E402
from benchmarks.realset_sources import _package_dir, _skimage_file  # noqa: E402

SEED = 0  # the real-photo models' sets (weights/build.sh real_data)
NUM_VAL = 160  # benchmarks.realset's default validation count: the scenes are those the models validated on
PHOTO_SIDE = 320  # px, the longest side of a whole photograph
MIN_OBJECT = 40  # px, the shortest longest-side of a scene's objects
NUM_SCENES = 2
CROP_CLASSES = ("coin", "face", "digit")
PHOTOS = (  # file, source, thing, the class it was learned as
    ("photo_cat.jpg", "skimage chelsea.png", "a cat", "cat_face"),
    ("photo_cup.jpg", "skimage coffee.png", "a cup of coffee", "cup"),
    ("photo_rocket.jpg", "skimage rocket.jpg", "a rocket on its launch pad", "rocket"),
    ("photo_astronaut.jpg", "skimage astronaut.png", "an astronaut", "astronaut"),
)
QUALITY = 88


def _save(rgb: np.ndarray, path: Path, longest: int | None = None) -> None:
    image = Image.fromarray(np.ascontiguousarray(rgb))
    if longest is not None and max(image.size) > longest:
        scale = longest / max(image.size)
        image = image.resize((round(image.width * scale), round(image.height * scale)), Image.LANCZOS)
    image.save(path, quality=QUALITY)


def _counts(names: list[str]) -> str:
    return ", ".join(f"{n} {name}{'s' * (n != 1)}" for name, n in Counter(names).items())


def main(out: Path) -> int:
    out.mkdir(parents=True, exist_ok=True)
    record: dict[str, dict] = {}
    for name, source, thing, label in PHOTOS:
        _save(np.asarray(Image.open(_skimage_file(source.split()[1])).convert("RGB")), out / name, PHOTO_SIDE)
        record[name] = {"tab": "classification", "label": label, "source": source,
                        "caption": f"Example photograph: {thing}, the one the {label} class was learned from "
                                   f"({source})"}

    crops: dict[str, dict] = {}
    scenes: list[dict] = []
    rng = np.random.default_rng([SEED, True, 2])  # benchmarks/realset_crops.py's validation crops, in order
    for scene in compose_scenes("val", NUM_VAL, seed=SEED):
        for k, (label, (x, y, side)) in enumerate(scene_crops(rng, scene)):
            if label in CROP_CLASSES and label not in crops:
                crop = Image.fromarray(scene.canvas).crop((x, y, x + side, y + side))
                crops[label] = {"image": np.asarray(crop.resize((CROP_SIZE, CROP_SIZE), Image.BILINEAR)),
                                "source": f"benchmarks/realset.py validation crop {scene.file_stem}_{k}"}
        names = [CATEGORIES[o.category] for o in scene.objects]
        sides = [max(o.box[2] - o.box[0], o.box[3] - o.box[1]) for o in scene.objects]
        if (len(scenes) < NUM_SCENES and 3 <= len(names) <= 5 and len(set(names)) >= 3
                and min(sides) >= MIN_OBJECT):
            scenes.append({"scene": scene, "names": names})
        if len(crops) == len(CROP_CLASSES) and len(scenes) == NUM_SCENES:
            break
    for label in CROP_CLASSES:
        name = f"crop_{label}.jpg"
        _save(crops[label]["image"], out / name)
        record[name] = {"tab": "classification", "label": label, "source": crops[label]["source"],
                        "caption": f"Example composited crop: a {label} the models never trained on, on a "
                                   "held-out photograph (benchmarks/realset.py validation)"}
    for n, item in enumerate(scenes, start=1):
        scene, name = item["scene"], f"scene_real_{n}.jpg"
        _save(scene.canvas, out / name)
        objects = [{"bbox": [o.box[0], o.box[1], o.box[2] - o.box[0], o.box[3] - o.box[1]],
                    "name": CATEGORIES[o.category]} for o in scene.objects]
        caption = (f"Example composited scene: {_counts(item['names'])} pasted into a held-out photograph "
                   f"({scene.background}; benchmarks/realset.py validation)")
        source = f"benchmarks/realset.py validation scene {scene.file_stem}"
        record[name] = {"tab": "scenes", "source": source, "objects": objects, "caption": caption,
                        "realset": {"split": "val", "count": NUM_VAL, "seed": SEED, "index": scene.index}}
    lion = _package_dir("gradio") / "media_assets" / "images" / "lion.jpg"
    _save(np.asarray(Image.open(lion).convert("RGB")), out / "photo_lion.jpg", PHOTO_SIDE)
    record["photo_lion.jpg"] = {"tab": "both", "label": None, "source": "gradio lion.jpg",
                                "caption": "Example photograph with none of the known categories: a lion "
                                           "(gradio lion.jpg)"}
    (out / "examples.json").write_text(json.dumps(record, indent=1) + "\n")
    sizes = {p.name: p.stat().st_size for p in out.glob("*.jpg")}
    print(f"{out}: {len(sizes)} pictures, {sum(sizes.values()) / 1e3:.0f} KB in all, largest "
          f"{max(sizes.values()) / 1e3:.0f} KB")
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    sys.exit(main(Path(sys.argv[1])))
