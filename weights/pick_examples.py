"""Choose the demo's bundled example images from freshly generated synthetic sets (see weights/build.sh).

    python weights/pick_examples.py DET_SET CLS_SET weights/examples

DET_SET: a `visiondet synth --task detection` folder; the scenes of its train and val splits with the most
objects (3 or more, all three classes among them when possible) are copied as ``scene_<n>.png``, and their
boxes saved as ``examples.json`` (COCO ``bbox`` x, y, w, h and class names) so tests can check detections
against the truth. CLS_SET: a `visiondet synth --task classification` folder; one image per class is copied
as ``shape_<class>.png``.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

NUM_SCENES = 4


def main(det_set: Path, cls_set: Path, out: Path) -> int:
    out.mkdir(parents=True, exist_ok=True)
    scenes = []
    for split in ("train", "val"):
        coco = json.loads((det_set / split / "annotations.json").read_text())
        names = {c["id"]: c["name"] for c in coco["categories"]}
        boxes: dict[int, list] = {}
        for ann in coco["annotations"]:
            obj = {"bbox": ann["bbox"], "name": names[ann["category_id"]]}
            boxes.setdefault(ann["image_id"], []).append(obj)
        for image in coco["images"]:
            objects = boxes.get(image["id"], [])
            kinds = len({o["name"] for o in objects})
            scenes.append((kinds, len(objects), det_set / split / "images" / image["file_name"], objects))
    # Most classes first, then most objects (within a readable 3..6), then file name for a stable choice.
    scenes = [s for s in scenes if 3 <= s[1] <= 6]
    scenes.sort(key=lambda s: (-s[0], -s[1], str(s[2])))
    record = {}
    for n, (_, _, path, objects) in enumerate(scenes[:NUM_SCENES], start=1):
        name = f"scene_{n}.png"
        shutil.copyfile(path, out / name)
        record[name] = objects
    (out / "examples.json").write_text(json.dumps(record, indent=1) + "\n")
    for folder in sorted(p for p in (cls_set / "train").iterdir() if p.is_dir()):
        first = sorted(folder.glob("*.png"))[0]
        shutil.copyfile(first, out / f"shape_{folder.name}.png")
    print(f"{out}: {len(record)} scenes, {len(list(out.glob('shape_*.png')))} single shapes")
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 4:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    sys.exit(main(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])))
