"""Accuracy of the small shipped detector: Faster R-CNN R18-FPN trained from scratch on the CPU on the
synthetic shapes set, then its validation AP50 (goal: >= 0.9). About 20 minutes on an idle 2-core CPU.

    python benchmarks/detection_accuracy.py                  # writes data and a run under runs/
    python benchmarks/detection_accuracy.py --epochs 2       # a quick check that it learns

Equivalent to:
    visiondet synth --task detection --out runs/shapes_det --num-images 2000 --image-size 128 160
    visiondet train configs/detection/faster_rcnn_r18_fpn_shapes.yaml data.train.images=... (see below)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Run as a script, this file's folder comes first on sys.path: put the repository root there instead.
if __package__ in (None, ""):
    sys.path[0] = str(ROOT)

CONFIG = ROOT / "configs" / "detection" / "faster_rcnn_r18_fpn_shapes.yaml"
GOAL_AP50 = 0.9


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT / "runs" / "shapes_det", help="dataset folder")
    parser.add_argument(
        "--out", type=Path, default=None, help="run folder (default: a new runs/detection/expN)"
    )
    parser.add_argument("--num-images", type=int, default=2000, help="train + val images to synthesise")
    parser.add_argument("--epochs", type=int, default=None, help="override the config's epochs")
    parser.add_argument("overrides", nargs="*", help="more key=value config overrides")
    args = parser.parse_args()

    import torch

    from apps.config import load_config
    from apps.engine.trainer import train
    from vision.data.synthetic import make_shapes

    if not (args.data / "val" / "annotations.json").is_file():
        make_shapes("detection", args.data, num_images=args.num_images, seed=0, image_size=(128, 160))
    overrides = [
        f"data.train.images={args.data / 'train' / 'images'}",
        f"data.train.annotations={args.data / 'train' / 'annotations.json'}",
        f"data.val.images={args.data / 'val' / 'images'}",
        f"data.val.annotations={args.data / 'val' / 'annotations.json'}",
        "device=cpu",
    ]
    if args.out is not None:
        overrides.append(f"output_dir={args.out}")
    if args.epochs is not None:
        overrides.append(f"train.epochs={args.epochs}")
    exp = load_config(CONFIG, overrides + list(args.overrides))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; config {CONFIG.relative_to(ROOT)}")
    start = time.perf_counter()
    result = train(exp)
    minutes = (time.perf_counter() - start) / 60
    rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    vals = [r for r in rows if r["kind"] == "val"]
    best = max(vals, key=lambda r: r["AP"])
    print(f"\ntrained {result.epochs_done} epochs in {minutes:.1f} min; run folder {result.run_dir}")
    print("epoch  AP50    AP")
    for r in vals:
        print(f"{r['epoch']:5d}  {r['AP50']:.3f}  {r['AP']:.3f}")
    per_class = "  ".join(f"{k[5:]} {v:.3f}" for k, v in best.items() if k.startswith("AP50/"))
    verdict = "met" if best["AP50"] >= GOAL_AP50 else "NOT met"
    print(
        f"best.pt (epoch {best['epoch']}): AP50 {best['AP50']:.3f} ({per_class}), AP {best['AP']:.3f}; "
        f"goal AP50 >= {GOAL_AP50}: {verdict}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
