"""Semantic segmentation of real photographs on the CPU, same wall-clock budget: torchvision's FCN reference
recipe against visiondet's.

    python benchmarks/real_segmentation.py --parallel --threads 1        # 20 minutes each, both at once
    python benchmarks/real_segmentation.py --minutes 3 --parallel --threads 1   # a shorter budget, said
    python benchmarks/real_segmentation.py --smoke                       # seconds: proves the script

On the real-imagery segmentation set (benchmarks/realset.py --task segmentation; built into --data when
missing): the detection set's 800 + 160 photographs with a label per pixel (0 background, the 7 categories,
255 on blended borders). In one run, the same machinery as benchmarks/real_imagery.py (imported from it):

(a) torchvision's segmentation reference recipe for FCN-ResNet (references/segmentation/train.py):
    ``fcn_resnet50(weights=None, weights_backbone=None, aux_loss=True)`` (from scratch, nothing downloaded),
    cross-entropy + 0.5 x the auxiliary head's, SGD lr 0.02 momentum 0.9 weight decay 1e-4, the "poly"
    schedule (power 0.9), random resize of the short side to 0.5-2x the base size, horizontal flip, random
    crop (padding ignored), batch 4 (its per-GPU batch). Scaled for the CPU, and only so: the poly schedule
    runs over the budget instead of 30 epochs; the base size is each image's own short side (its 520 is
    VOC's ~375 px images upsampled 1.4x), the crop 256 (its 480, with these 256-480 px images, is mostly
    padding), and evaluation at each image's own size (its 520 short side, scaled alike);
(b) ``visiondet train configs/segmentation/deeplabv3plus_r18_real_cpu.yaml train.time_budget=<minutes>m``
    in a subprocess: the recipe's defaults, the data paths and the budget, nothing fitted to this set, no
    validation inside the budget; its ``last.pt`` is scored.

Both are scored by the same code (vision.segmentation.SegmentationMetric, background included, 255
ignored) on every validation image at its own size. Goal (issue 26): mIoU >= 0.70 and >= 2x the reference's.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):  # run as a script: the repository root, not benchmarks/, first on sys.path
    sys.path[0] = str(ROOT)

from benchmarks.real_imagery import side_by_side, start_visiondet, wait_visiondet  # noqa: E402
from benchmarks.realset import segmentation_classes  # noqa: E402

CONFIG = ROOT / "configs" / "segmentation" / "deeplabv3plus_r18_real_cpu.yaml"
GOAL_MIOU, GOAL_RATIO = 0.70, 2.0
SMOKE_SCENES = {"num_train": 8, "num_val": 3}
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]

# image [1, 3, H, W] in [0, 1] -> label map [1, H, W]
Predict = Callable[["torch.Tensor"], "torch.Tensor"]  # noqa: F821


def _pair(images: Path, masks: Path, stem: str) -> tuple[torch.Tensor, torch.Tensor]:  # noqa: F821
    """(image [3, H, W] float in [0, 1], mask [H, W] int64) of one file pair."""
    import numpy as np
    import torch
    from PIL import Image

    with Image.open(images / f"{stem}.jpg") as img:
        image = torch.from_numpy(np.asarray(img.convert("RGB")).copy()).permute(2, 0, 1).float().div_(255)
    with Image.open(masks / f"{stem}.png") as m:
        mask = torch.from_numpy(np.asarray(m).astype(np.int64))
    return image, mask


def stems(split: Path) -> list[str]:
    return sorted(p.stem for p in (split / "masks").glob("*.png"))


def evaluate(predict: Predict, data: Path, limit: int | None = None) -> dict[str, float]:
    """mIoU (background included), pixel accuracy and per-class IoU of ``predict`` over the validation
    images, each at its own size."""
    import torch

    from vision.segmentation import SegmentationMetric

    names = segmentation_classes()
    metric = SegmentationMetric(len(names) + 1)
    val = data / "val"
    with torch.inference_mode():
        for stem in stems(val)[:limit]:
            image, mask = _pair(val / "images", val / "masks", stem)
            metric.update(predict(image[None]), mask[None])
    out = metric.compute()
    per_class = dict(zip(["background", *names], out["per_class_iou"], strict=True))
    return {"mIoU": out["miou"], "pixel_acc": out["pixel_accuracy"],
            **{f"IoU/{k}": v for k, v in per_class.items()}}


# ------------------------------------------------------------------------------------ (a) the reference


class _ReferenceData:
    """The training split as torchvision's segmentation references augment it: random resize of the short
    side to 0.5-2x the base (here the image's own short side), horizontal flip, random crop padded with 0
    (image) and 255 (mask), normalised."""

    def __init__(self, data: Path, crop: int) -> None:
        self.split, self.crop, self.stems = data / "train", crop, stems(data / "train")

    def __len__(self) -> int:
        return len(self.stems)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:  # noqa: F821
        import torch.nn.functional as F
        from torchvision.transforms import functional as TF

        image, mask = _pair(self.split / "images", self.split / "masks", self.stems[i])
        size = int(min(image.shape[-2:]) * random.uniform(0.5, 2.0))
        image = TF.resize(image, size, antialias=True)
        mask = TF.resize(mask[None], size, interpolation=TF.InterpolationMode.NEAREST)[0]
        if random.random() < 0.5:
            image, mask = image.flip(-1), mask.flip(-1)
        h, w = image.shape[-2:]
        pad_h, pad_w = max(self.crop - h, 0), max(self.crop - w, 0)
        image = F.pad(image, (0, pad_w, 0, pad_h), value=0.0)
        mask = F.pad(mask, (0, pad_w, 0, pad_h), value=255)
        y = random.randint(0, image.shape[-2] - self.crop)
        x = random.randint(0, image.shape[-1] - self.crop)
        image = image[:, y : y + self.crop, x : x + self.crop]
        mask = mask[y : y + self.crop, x : x + self.crop]
        return TF.normalize(image, MEAN, STD), mask


def run_reference(data: Path, minutes: float, seed: int, crop: int, batch_size: int, limit: int | None
                  ) -> dict[str, float]:
    import torch
    import torch.nn.functional as F
    from torchvision.models.segmentation import fcn_resnet50
    from torchvision.transforms import functional as TF

    torch.manual_seed(seed)
    random.seed(seed)
    model = fcn_resnet50(weights=None, weights_backbone=None, num_classes=len(segmentation_classes()) + 1,
                         aux_loss=True)
    params = [{"params": [p for p in model.backbone.parameters() if p.requires_grad]},
              {"params": [p for p in model.classifier.parameters() if p.requires_grad]},
              {"params": [p for p in model.aux_classifier.parameters() if p.requires_grad], "lr": 0.02 * 10}]
    optimizer = torch.optim.SGD(params, lr=0.02, momentum=0.9, weight_decay=1e-4)
    base_lrs = [group["lr"] for group in optimizer.param_groups]
    # one loading process beside the training one, as the visiondet recipe (data.workers: 1) has
    loader = torch.utils.data.DataLoader(_ReferenceData(data, crop), batch_size=batch_size, shuffle=True,
                                         num_workers=1, persistent_workers=True, drop_last=True,
                                         worker_init_fn=lambda w: random.seed(seed * 100 + w))
    model.train()
    steps, start, budget = 0, time.perf_counter(), minutes * 60
    while time.perf_counter() - start < budget:
        for images, masks in loader:
            elapsed = time.perf_counter() - start
            for group, lr in zip(optimizer.param_groups, base_lrs, strict=True):  # poly over the budget
                group["lr"] = lr * max(0.0, 1 - elapsed / budget) ** 0.9
            out = model(images)
            loss = (F.cross_entropy(out["out"], masks, ignore_index=255)
                    + 0.5 * F.cross_entropy(out["aux"], masks, ignore_index=255))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            steps += 1
            if steps % 10 == 0:
                print(f"  reference step {steps}: loss {loss.item():.3f}, {elapsed / 60:.1f} min", flush=True)
            if time.perf_counter() - start >= budget:
                break
    trained = (time.perf_counter() - start) / 60
    model.eval()

    def predict(image: torch.Tensor) -> torch.Tensor:
        return model(TF.normalize(image, MEAN, STD))["out"].argmax(1)

    metrics = evaluate(predict, data, limit)
    return {**metrics, "steps": steps, "images": steps * batch_size, "minutes": trained}


# ------------------------------------------------------------------------------------ (b) visiondet


def finish_visiondet(process: object, data: Path, out: Path, start: float, limit: int | None
                     ) -> dict[str, float]:
    from apps.tasks import load_model

    ckpt, steps, trained = wait_visiondet(process, out, start)
    model = load_model(out / "last.pt", "cpu").model.eval()

    def predict(image: torch.Tensor) -> torch.Tensor:  # noqa: F821
        logits, _ = model(image)
        return logits.argmax(1)

    batch = int(ckpt["config"]["train"]["batch_size"])
    return {**evaluate(predict, data, limit), "steps": steps, "images": steps * batch, "minutes": trained}


# ---------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=20.0, help="training budget of each recipe")
    parser.add_argument("--data", type=Path, default=ROOT / "runs" / "realset_seg",
                        help="the segmentation set (built when absent)")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "real_segmentation",
                        help="visiondet's runs (one dated sub-folder each)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads, each recipe")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--reference-crop", type=int, default=256, help="the reference's crop (its own: 480)")
    parser.add_argument("--max-val", type=int, help="score only the first N validation images (exploration)")
    parser.add_argument("--only", choices=["reference", "visiondet"], help="run one side (exploration)")
    parser.add_argument("--parallel", action="store_true",
                        help="train both at the same time (a shared, busy machine: give --threads 1)")
    parser.add_argument("--smoke", action="store_true",
                        help="a tiny set and a few seconds each: proves the script, measures nothing")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument("overrides", nargs="*", help="visiondet overrides (exploration; not the benchmark)")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    crop, batch = args.reference_crop, 4
    if args.smoke:
        work = Path(tempfile.mkdtemp(prefix="visiondet_real_seg_smoke_"))
        args.data, args.out, args.minutes, args.parallel = work / "data", work / "run", 0.05, True
        args.overrides = [*args.overrides, "train.batch_size=2", "train.warmup_iters=2",
                          "data.options.crop_size=64"]
        crop, batch = 64, 2
    if not (args.data / "val" / "masks").is_dir():
        from benchmarks.realset import build_segmentation_set

        build_segmentation_set(args.data, seed=0, **(SMOKE_SCENES if args.smoke else {}))
    print(f"torch {torch.__version__}, {args.threads} threads, {args.minutes:g} min each; data {args.data}",
          flush=True)
    args.out = args.out / time.strftime("%Y%m%d-%H%M%S")  # train refuses a used folder: a fresh one each run
    data_keys = [f"data.train.images={args.data / 'train' / 'images'}",
                 f"data.train.masks={args.data / 'train' / 'masks'}"]
    def reference() -> dict:
        return run_reference(args.data, args.minutes, args.seed, crop, batch, args.max_val)

    def ours() -> subprocess.Popen:
        return start_visiondet(args.data, args.minutes, args.out, args.threads, args.overrides,
                               seed=args.seed, config=CONFIG, data_overrides=data_keys)

    def finish(process: subprocess.Popen, start: float) -> dict:
        return finish_visiondet(process, args.data, args.out, start, args.max_val)

    rows = side_by_side(reference, ours, finish, parallel=args.parallel, name="visiondet " + CONFIG.stem,
                        only=args.only)
    report(rows, bool(args.overrides) and not args.smoke)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    if args.smoke:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def report(rows: dict[str, dict[str, float]], overridden: bool) -> None:
    print(f"\n{'recipe':38s} {'mIoU':>6s} {'pixacc':>6s} {'steps':>6s} {'images':>7s} {'minutes':>7s}")
    for name, r in rows.items():
        print(f"{name:38s} {r['mIoU']:6.3f} {r['pixel_acc']:6.3f} {r['steps']:6d} {r['images']:7d} "
              f"{r['minutes']:7.1f}")
        print("  IoU: " + ", ".join(f"{k[4:]} {v:.2f}" for k, v in r.items() if k.startswith("IoU/")))
    if len(rows) == 2:
        ref, ours = rows.values()
        ratio = ours["mIoU"] / ref["mIoU"] if ref["mIoU"] > 0 else float("inf")
        met = ratio >= GOAL_RATIO and ours["mIoU"] >= GOAL_MIOU
        print(f"mIoU ratio {ratio:.2f}x, goal >= {GOAL_RATIO}x and mIoU >= {GOAL_MIOU}: "
              f"{'met' if met else 'NOT met'}" + (" [overrides given: not the recipe's defaults]"
                                                  if overridden else ""))


if __name__ == "__main__":
    sys.exit(main())
