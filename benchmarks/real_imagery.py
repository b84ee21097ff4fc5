"""Real photographs on the CPU, same wall-clock budget: torchvision's reference recipe against visiondet's.

    python benchmarks/real_imagery.py                       # 20 minutes each (about 45 minutes in all)
    python benchmarks/real_imagery.py --minutes 8           # a shorter budget for both, said in the table
    python benchmarks/real_imagery.py --parallel --threads 1   # both at once: a busy machine slows both alike
    python benchmarks/real_imagery.py --parallel --threads 1 --seeds 3   # issue 25's goals: three seeds
    python benchmarks/real_imagery.py --step-cost --threads 1  # CPU seconds per training step of each recipe
    python benchmarks/real_imagery.py --smoke                  # seconds: proves the script, measures nothing

On the real-imagery development set (benchmarks/realset.py; built into --data when missing), in one run:

(a) torchvision's reference recipe, exactly as issue 14 words it: ``FasterRCNN`` on
    ``resnet_fpn_backbone("resnet18", weights=None, norm_layer=nn.BatchNorm2d, trainable_layers=5)``
    (from scratch, batch norm trained), SGD lr 0.02 momentum 0.9 weight decay 1e-4, 200-iteration linear
    warm-up then the lr held (its step decays, at epochs 16 and 22 of 26, lie far past any CPU budget),
    batch 4, min_size 320, max_size 480, horizontal flip; trained until the budget is spent;
(b) ``visiondet train configs/detection/faster_rcnn_r18_fpn_cpu.yaml train.time_budget=<minutes>m`` in a
    subprocess: the recipe's defaults, the data paths and the budget, nothing fitted to this set. Its
    ``data.val`` is left out, so, like the reference, it spends the whole budget training (no evaluation
    inside the budget) and its ``last.pt`` is scored, not a checkpoint picked on the validation split.

Both are then scored by the same code: every validation image through the model, pycocotools COCOeval on the
validation annotations. Printed side by side: AP, AP50, optimizer steps, images seen, training minutes;
with ``--seeds N``, each seed in turn (both recipes at each), then the mean and standard deviation over the
seeds. Goals (issue 25), on the means: visiondet's AP >= 0.65 and AP50 >= 0.88, each >= 3x the
reference's (issue 14's, met since: AP50 >= 0.65 and >= 2.5x).
"""

from __future__ import annotations

import argparse
import json
import os
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

CONFIG = ROOT / "configs" / "detection" / "faster_rcnn_r18_fpn_cpu.yaml"
GOALS = {"AP": 0.65, "AP50": 0.88}  # issue 25: visiondet's means over the seeds, and each >= GOAL_RATIO x
GOAL_RATIO = 3.0                     # the reference's mean, the same run
REFERENCE = "torchvision reference"

# image [3, H, W] in [0, 1] -> (boxes [N, 4] xyxy, scores [N], category ids [N])
Predict = Callable[["torch.Tensor"], tuple["torch.Tensor", "torch.Tensor", list[int]]]  # noqa: F821


# ------------------------------------------------------------------------------------------------ scoring


def _read(path: Path) -> torch.Tensor:  # noqa: F821
    import numpy as np
    import torch
    from PIL import Image

    with Image.open(path) as img:
        array = np.asarray(img.convert("RGB"))
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255)


def evaluate(predict: Predict, images: Path, annotations: Path) -> dict[str, float]:
    """COCO box AP of ``predict`` over every image of the split (pycocotools, the annotation file's ids)."""
    import contextlib
    import io

    import torch
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(annotations))
    results = []
    with torch.inference_mode():
        for image_id in sorted(gt.imgs):
            boxes, scores, categories = predict(_read(images / gt.imgs[image_id]["file_name"]))
            for box, score, category in zip(boxes.tolist(), scores.tolist(), categories, strict=True):
                x0, y0, x1, y1 = box
                results.append({"image_id": image_id, "category_id": category, "score": score,
                                "bbox": [x0, y0, x1 - x0, y1 - y0]})
    if not results:
        return {"AP": 0.0, "AP50": 0.0, "AP_small": 0.0, "detections": 0}
    with contextlib.redirect_stdout(io.StringIO()):
        coco_eval = COCOeval(gt, gt.loadRes(results), "bbox")
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    # AP_small: objects under 32 x 32 px (COCO's "small"); -1 when the split has none
    return {"AP": float(coco_eval.stats[0]), "AP50": float(coco_eval.stats[1]),
            "AP_small": float(coco_eval.stats[3]), "detections": len(results)}


# ------------------------------------------------------------------------------------ (a) the reference


class _ReferenceData:
    """The split as torchvision's detection references feed it: image tensor, boxes, labels 1..K, h-flip."""

    def __init__(self, images: Path, annotations: Path, category_ids: list[int], train: bool) -> None:
        coco = json.loads(annotations.read_text())
        self.images, self.train = images, train
        self.label = {cid: i + 1 for i, cid in enumerate(category_ids)}
        self.items = [(im["file_name"], []) for im in coco["images"]]
        index = {im["id"]: i for i, im in enumerate(coco["images"])}
        for ann in coco["annotations"]:
            self.items[index[ann["image_id"]]][1].append(ann)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:  # noqa: F821
        import torch

        file_name, anns = self.items[i]
        image = _read(self.images / file_name)
        boxes = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)],
                             dtype=torch.float32).reshape(-1, 4)
        labels = torch.tensor([self.label[a["category_id"]] for a in anns], dtype=torch.int64)
        if self.train and torch.rand(()) < 0.5:
            image = image.flip(-1)
            boxes = torch.stack([image.shape[-1] - boxes[:, 2], boxes[:, 1],
                                 image.shape[-1] - boxes[:, 0], boxes[:, 3]], dim=1)
        return image, {"boxes": boxes, "labels": labels}


def run_reference(data: Path, minutes: float, seed: int) -> dict[str, float]:
    import torch
    from torch import nn
    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone

    torch.manual_seed(seed)
    coco = json.loads((data / "train" / "annotations.json").read_text())
    categories = sorted(c["id"] for c in coco["categories"])  # label i is the i-th id, as visiondet maps
    backbone = resnet_fpn_backbone(backbone_name="resnet18", weights=None, norm_layer=nn.BatchNorm2d,
                                   trainable_layers=5)
    model = FasterRCNN(backbone, num_classes=len(categories) + 1, min_size=320, max_size=480)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.02, momentum=0.9, weight_decay=1e-4)
    warmup = 200
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda it: 0.001 + (1 - 0.001) * it / warmup if it < warmup else 1.0
    )
    dataset = _ReferenceData(data / "train" / "images", data / "train" / "annotations.json", categories, True)
    # one loading process beside the training one, as the visiondet recipe (data.workers: 1) has
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, shuffle=True, num_workers=1,
                                         collate_fn=lambda batch: tuple(zip(*batch, strict=True)),
                                         persistent_workers=True)
    model.train()
    steps, seen, start = 0, 0, time.perf_counter()
    budget = minutes * 60
    while time.perf_counter() - start < budget:
        for images, targets in loader:
            losses = model(list(images), list(targets))
            loss = sum(losses.values())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            steps += 1
            seen += len(images)
            if steps % 20 == 0:
                print(f"  reference step {steps}: loss {loss.item():.3f}, "
                      f"{(time.perf_counter() - start) / 60:.1f} min", flush=True)
            if time.perf_counter() - start >= budget:
                break
    trained = (time.perf_counter() - start) / 60
    model.eval()

    def predict(image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        out = model([image])[0]
        return out["boxes"], out["scores"], [categories[int(label) - 1] for label in out["labels"]]

    metrics = evaluate(predict, data / "val" / "images", data / "val" / "annotations.json")
    return {**metrics, "steps": steps, "images": seen, "minutes": trained}


# ------------------------------------------------------------------------------------ (b) visiondet


def start_visiondet(
    data: Path, minutes: float, out: Path, threads: int, extra: list[str], *, seed: int,
    config: Path = CONFIG, data_overrides: list[str] | None = None,
) -> subprocess.Popen:
    """``visiondet train`` with the recipe, the training data, the budget and the reference's ``seed``, in
    its own process. ``data_overrides``: the data keys of another task's recipe (default: the detection
    set's)."""
    if data_overrides is None:
        data_overrides = [
            f"data.train.images={data / 'train' / 'images'}",
            f"data.train.annotations={data / 'train' / 'annotations.json'}",
        ]
    overrides = [
        *data_overrides,
        "data.val=null",  # scored below by the same code as the reference, which validates nothing either
        f"train.time_budget={minutes:g}m",
        f"seed={seed}",
        f"output_dir={out}",
        *extra,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    return subprocess.Popen([sys.executable, "-m", "apps.cli", "train", str(config), *overrides],
                            cwd=ROOT, env=env)


def wait_visiondet(process: subprocess.Popen, out: Path, start: float) -> tuple[dict, int, float]:
    """Once ``visiondet train`` has ended: its ``last.pt`` (loaded), optimizer steps and training minutes
    (the trainer's own clock, start-up excluded as for the reference; the wall time if it kept none)."""
    import torch

    if process.wait() != 0:
        raise SystemExit(f"visiondet train failed (exit code {process.returncode}); its log is above")
    ckpt = torch.load(out / "last.pt", map_location="cpu", weights_only=True)
    budget = ckpt["train_state"].get("time_budget") or {}
    trained = (float(budget["elapsed"]) if "elapsed" in budget else time.perf_counter() - start) / 60
    return ckpt, int(ckpt["train_state"]["step"]), trained


def finish_visiondet(process: subprocess.Popen, data: Path, out: Path, start: float) -> dict[str, float]:
    ckpt, steps, trained = wait_visiondet(process, out, start)
    batch = int(ckpt["config"]["train"]["batch_size"])
    metrics = score_checkpoint(out / "last.pt", data)
    return {**metrics, "steps": steps, "images": steps * batch, "minutes": trained,
            "seed": int(ckpt["config"]["seed"])}



def side_by_side(reference: Callable[[], dict], start: Callable[[], subprocess.Popen],
                 finish: Callable[[subprocess.Popen, float], dict], *, parallel: bool, name: str,
                 only: str | None = None) -> dict[str, dict]:
    """The reference recipe in this process and visiondet's in a subprocess (``start``), at once when
    ``parallel`` (a busy machine then slows both alike), else one after the other; ``only`` ("reference"
    or "visiondet", the scripts' ``--only``) runs one side. Returns the rows by recipe name, the
    reference's first."""
    ours, theirs = only != "reference", only != "visiondet"
    rows: dict[str, dict] = {}
    process, began = None, time.perf_counter()
    if ours and parallel:
        process = start()
    if theirs:
        rows[REFERENCE] = reference()
        print(f"reference: {json.dumps(rows[REFERENCE])}", flush=True)
    if ours:
        if process is None:
            began, process = time.perf_counter(), start()
        rows[name] = finish(process, began)
    return rows


def score_checkpoint(path: Path, data: Path) -> dict[str, float]:
    """A visiondet detector checkpoint scored on ``data``'s validation split by :func:`evaluate`."""
    import torch

    from apps.tasks import load_model

    loaded = load_model(path, "cpu")
    model, classes = loaded.model.eval(), loaded.classes

    def predict(image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        (det,), _ = model([image])
        return det.boxes, det.scores, [int(classes[int(label) - 1]["id"]) for label in det.labels]

    return evaluate(predict, data / "val" / "images", data / "val" / "annotations.json")


# ------------------------------------------------------------------------------ step cost (CPU seconds)


def step_costs(data: Path, steps: int = 3) -> None:
    """CPU seconds (process time) per training step on the same real batches of 4: the reference, the
    recipe, and the recipe with one choice undone. Process time moves far less than wall time when
    the machine is shared."""
    from dataclasses import replace

    import torch
    from torch import nn
    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone

    from apps.config import load_config
    from detection.models import build_detector

    coco = json.loads((data / "train" / "annotations.json").read_text())
    categories = sorted(c["id"] for c in coco["categories"])
    dataset = _ReferenceData(data / "train" / "images", data / "train" / "annotations.json", categories, True)
    batches = [[dataset[i] for i in range(j * 4, j * 4 + 4)] for j in range(steps + 1)]

    def cost(model: nn.Module) -> float:
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        model.train()
        spent = []
        for batch in batches:  # the first step pays for lazy initialisation: not counted
            images, targets = [b[0] for b in batch], [b[1] for b in batch]
            start = time.process_time()
            out = model(images, targets)
            loss = sum((out[1] if isinstance(out, tuple) else out).values())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            spent.append(time.process_time() - start)
        return sum(spent[1:]) / steps

    torch.manual_seed(0)
    backbone = resnet_fpn_backbone(backbone_name="resnet18", weights=None, norm_layer=nn.BatchNorm2d,
                                   trainable_layers=5)
    recipe = load_config(CONFIG, [f"data.train.images={data / 'train' / 'images'}",
                                  f"data.train.annotations={data / 'train' / 'annotations.json'}",
                                  "data.val=null"]).model
    recipe = replace(recipe, num_classes=len(categories))
    wide = replace(recipe, min_size=320, max_size=480, fpn_channels=256,
                   rpn=replace(recipe.rpn, pre_nms_top_n_train=2000, post_nms_top_n_train=2000),
                   roi=replace(recipe.roi, representation_size=1024, batch_size_per_image=512))
    rows = [
        ("torchvision reference (320/480 px, FPN 256, head 1024, 512 RoIs)",
         FasterRCNN(backbone, num_classes=len(categories) + 1, min_size=320, max_size=480)),
        ("visiondet recipe", build_detector(recipe)),
        ("visiondet recipe at 320/480 px", build_detector(replace(recipe, min_size=320, max_size=480))),
        ("visiondet recipe with torchvision's widths and sampling, 320/480", build_detector(wide)),
    ]
    print(f"CPU seconds per training step (batch 4, {torch.get_num_threads()} thread(s), mean of {steps})")
    for name, model in rows:
        print(f"  {name:66s} {cost(model):6.2f}", flush=True)


# ------------------------------------------------------------------------------------------- summary


def summarize(runs: dict[int, dict[str, dict]]) -> dict[str, dict[str, tuple[float, float]]]:
    """Per recipe, the mean and sample standard deviation (NaN for one seed) over the seeds of ``runs``
    (seed -> recipe -> row) of AP, AP50, AP_small, steps and minutes: the ablation study's arithmetic."""
    from benchmarks.ablation_stats import mean_std

    keys = ("AP", "AP50", "AP_small", "steps", "minutes")
    return {name: {key: mean_std([float(rows[name][key]) for rows in runs.values()]) for key in keys}
            for name in next(iter(runs.values()))}


def goal_lines(summary: dict[str, dict[str, tuple[float, float]]], seeds: int) -> list[str]:
    """Issue 25's goals on the means: visiondet's level, and its ratio to the reference's."""
    ours = next(name for name in summary if name != REFERENCE)
    lines = []
    for key, level in GOALS.items():
        mean, ref = summary[ours][key][0], summary[REFERENCE][key][0]
        ratio = mean / ref if ref > 0 else float("inf")
        level_said = "met" if mean >= level else f"missed by {level - mean:.3f}"
        ratio_said = "met" if ratio >= GOAL_RATIO else "missed"
        lines.append(f"{key} {mean:.3f} (goal >= {level}: {level_said}), {ratio:.2f}x the reference's "
                     f"{ref:.3f} (goal >= {GOAL_RATIO:g}x: {ratio_said})")
    if seeds < 3:
        lines.append(f"{seeds} seed(s): the goals ask for the mean of three (--seeds 3)")
    return lines


def report(runs: dict[int, dict[str, dict]], overridden: bool) -> None:
    head = f"{'recipe':34s} {'AP50':>6s} {'AP':>6s} {'steps':>6s}"
    print(f"\n{'seed':>4s} {head} {'images':>7s} {'minutes':>7s}")
    for seed, rows in runs.items():
        for name, r in rows.items():
            print(f"{seed:4d} {name:34s} {r['AP50']:6.3f} {r['AP']:6.3f} {r['steps']:6d} {r['images']:7d} "
                  f"{r['minutes']:7.1f}")
    if len(next(iter(runs.values()))) < 2:
        return
    summary = summarize(runs)
    if len(runs) > 1:
        print(f"\nmean +- standard deviation over {len(runs)} seeds")
        print(f"{head}  (+- AP50, AP, steps)")
        for name, c in summary.items():
            print(f"{name:34s} {c['AP50'][0]:6.3f} {c['AP'][0]:6.3f} {c['steps'][0]:6.0f}  "
                  f"(+- {c['AP50'][1]:.3f}, {c['AP'][1]:.3f}, {c['steps'][1]:.0f})")
    for line in goal_lines(summary, len(runs)):
        print(line + (" [overrides given: not the recipe's defaults]" if overridden else ""))


# ---------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=20.0, help="training budget of each recipe")
    parser.add_argument("--data", type=Path, default=ROOT / "runs" / "realset",
                        help="the set (built when absent)")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "real_imagery",
                        help="visiondet's run (with --seeds above 1, one sub-folder seed<k> each)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads, each recipe")
    parser.add_argument("--seed", type=int, default=0, help="the first seed")
    parser.add_argument("--seeds", type=int, default=1,
                        help="seeds --seed, --seed + 1, ... one after the other (both recipes at each)")
    parser.add_argument("--only", choices=["reference", "visiondet"], help="run one side (exploration)")
    parser.add_argument("--parallel", action="store_true",
                        help="train both at the same time (a shared, busy machine: give --threads 1)")
    parser.add_argument("--step-cost", action="store_true",
                        help="only print CPU seconds per training step of each recipe (a minute or two)")
    parser.add_argument("--smoke", action="store_true",
                        help="a tiny set and a few seconds each: proves the script, measures nothing")
    parser.add_argument("--json", type=Path, help="also write every seed's rows and the summary here")
    parser.add_argument("overrides", nargs="*", help="visiondet overrides (exploration; not the benchmark)")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    if args.smoke:
        work = Path(tempfile.mkdtemp(prefix="visiondet_real_imagery_smoke_"))
        args.data, args.out, args.minutes, args.parallel = work / "data", work / "run", 0.05, True
        args.overrides = [*args.overrides, "train.warmup_iters=2", "model.min_size=96", "model.max_size=128"]
    if not (args.data / "val" / "annotations.json").is_file():
        from benchmarks.realset import build_realset

        build_realset(args.data, seed=0, **({"num_train": 8, "num_val": 3} if args.smoke else {}))
    print(f"torch {torch.__version__}, {args.threads} threads, {args.minutes:g} min each; data {args.data}",
          flush=True)
    if args.step_cost:
        step_costs(args.data)
        return 0

    runs: dict[int, dict[str, dict]] = {}
    for seed in range(args.seed, args.seed + args.seeds):
        out = args.out / f"seed{seed}" if args.seeds > 1 else args.out

        def reference(seed: int = seed) -> dict:
            return run_reference(args.data, args.minutes, seed)

        def ours(seed: int = seed, out: Path = out) -> subprocess.Popen:
            return start_visiondet(args.data, args.minutes, out, args.threads, args.overrides, seed=seed)

        def finish(process: subprocess.Popen, start: float, out: Path = out) -> dict:
            return finish_visiondet(process, args.data, out, start)

        if args.seeds > 1:
            print(f"seed {seed} ({seed - args.seed + 1} of {args.seeds})", flush=True)
        runs[seed] = side_by_side(reference, ours, finish, parallel=args.parallel,
                                  name="visiondet " + CONFIG.stem, only=args.only)
    report(runs, bool(args.overrides) and not args.smoke)
    if args.json:
        summary = summarize(runs) if len(next(iter(runs.values()))) == 2 else {}
        args.json.write_text(json.dumps({"runs": runs, "summary": summary}, indent=2))
    if args.smoke:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
