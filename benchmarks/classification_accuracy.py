"""Classification end to end on the CPU: synthetic shapes, ResNet-18 from scratch, validation top-1.

Generates the synthetic classification set (`visiondet synth --task classification`), trains
configs/classification/resnet18_shapes.yaml on it, then evaluates best.pt again through
`apps.tasks.load_model` (as `visiondet evaluate` does) and prints the figures. Goal: top-1 >= 95% in a
few minutes. Not a test: run it by hand, ideally on a quiet machine:

    nice -n 10 .venv/bin/python benchmarks/classification_accuracy.py [--num-images 4000] [--keep DIR]
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

CONFIG = ROOT / "configs" / "classification" / "resnet18_shapes.yaml"
GOAL = 0.95


def _cpu_seconds() -> float:
    """CPU time of this process and of its finished children (the DataLoader workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-images", type=int, default=4000, help="train + val images (20%% val)")
    parser.add_argument("--seed", type=int, default=0, help="dataset seed")
    parser.add_argument("--keep", metavar="DIR", help="keep data and run here (default: a temp folder)")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. train.epochs=8")
    args = parser.parse_args()

    import torch

    from apps.config import SplitConfig, load_config
    from apps.engine.loader import eval_loader
    from apps.engine.trainer import train
    from apps.tasks import load_model
    from vision.data.synthetic import make_shapes

    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="visiondet_cls_bench_"))
    started = time.perf_counter()
    splits = make_shapes("classification", work / "data", num_images=args.num_images, seed=args.seed)
    made = time.perf_counter()
    exp = load_config(CONFIG, [f"data.train.root={splits['train']}", f"data.val.root={splits['val']}",
                               f"output_dir={work / 'run'}", *args.overrides])
    cpu_before = _cpu_seconds()
    result = train(exp)
    trained = time.perf_counter()
    cpu = _cpu_seconds() - cpu_before

    loaded = load_model(result.run_dir / "best.pt", "cpu")
    dataset = loaded.task.build_eval_dataset(SplitConfig(root=str(splits["val"])), loaded)
    loader = eval_loader(dataset, loaded.task.collate, batch_size=64, workers=0)
    with torch.inference_mode():
        metrics = loaded.task.evaluate(loaded.model, loader, torch.device("cpu"), loaded.classes)

    print()
    print(f"data:      {args.num_images} images ({len(dataset)} val), generated in {made - started:.1f} s")
    print(f"training:  {CONFIG.relative_to(ROOT)} {' '.join(args.overrides)}".rstrip())
    print(f"           {result.epochs_done} epochs in {trained - made:.0f} s wall, {cpu:.0f} s CPU "
          f"({torch.get_num_threads()} threads, {os.cpu_count()} cores; {result.status})")
    print(loaded.task.format_metrics(metrics))
    verdict = "meets" if metrics["top1"] >= GOAL else "MISSES"
    print(f"validation top-1 {metrics['top1']:.2%} ({verdict} the goal of {GOAL:.0%}); "
          f"run folder {result.run_dir}")
    return 0 if metrics["top1"] >= GOAL else 1


if __name__ == "__main__":
    sys.exit(main())
