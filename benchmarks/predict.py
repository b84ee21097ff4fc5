"""Images per second of `visiondet predict` against a plain per-image loop, same model, same files, on CPU.

    nice -n 10 .venv/bin/python benchmarks/predict.py     # 200 synthetic JPEGs, resnet18 at 96 px
    .venv/bin/python benchmarks/predict.py --weights weights/detector.pt --images 50

The plain loop is what a user writes first: for each file, decode it (``read_image``) and run the model on
it alone (``Predictor.predict([image])``), writing nothing. `visiondet predict` does the same work plus its
outputs (predictions.jsonl, summary.json), with ``--workers`` DataLoader processes decoding while the
model runs batches of ``--batch-size``. Both times include loading the checkpoint. The two are run in
turns (``--rounds``), and the table reports the median of each, so load from other processes on a shared
machine hits both alike. Goal: at least 1.5x with 2 workers.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch

from apps.cli import main as visiondet
from apps.predict.predictor import Predictor
from apps.predict.sources import find_images
from vision.checkpoint import save_checkpoint
from vision.classification import Classifier, ClassifierConfig
from vision.data.images import read_image


def synthetic_images(folder: Path, count: int, width: int, height: int, seed: int = 0) -> None:
    """Noisy backgrounds with a few filled shapes, as JPEG (quality 90) in 4 subfolders."""
    rng = np.random.default_rng(seed)
    for i in range(count):
        image = rng.integers(60, 200, (height, width, 3), dtype=np.uint8)
        image = cv2.GaussianBlur(image, (0, 0), 3)
        for _ in range(3):
            color = tuple(int(c) for c in rng.integers(0, 256, 3))
            x, y = int(rng.integers(0, width)), int(rng.integers(0, height))
            r = int(rng.integers(10, min(width, height) // 4))
            if rng.random() < 0.5:
                cv2.circle(image, (x, y), r, color, -1)
            else:
                cv2.rectangle(image, (x - r, y - r), (x + r, y + r), color, -1)
        path = folder / f"part{i % 4}" / f"{i:04d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(path), image[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, 90])


def classifier_checkpoint(path: Path, backbone: str, size: int) -> Path:
    torch.manual_seed(0)
    cfg = ClassifierConfig(backbone=backbone, num_classes=10)
    model = Classifier(cfg, load_pretrained=False)
    classes = [{"id": i + 1, "name": f"class{i}"} for i in range(10)]
    ckpt = {"format": "visiondet", "version": 1, "task": "classification", "model": dataclasses.asdict(cfg),
            "classes": classes, "preprocess": {"size": size}, "state_dict": model.state_dict()}
    return save_checkpoint(ckpt, path)


def plain_loop(weights: Path, folder: Path) -> float:
    """Seconds for: load, then read and predict each file alone."""
    start = time.perf_counter()
    predictor = Predictor(weights, "cpu")
    for file in find_images([folder]).files:
        predictor.predict([read_image(file.path)])
    return time.perf_counter() - start


def visiondet_predict(weights: Path, folder: Path, output: Path, batch_size: int, workers: int) -> float:
    start = time.perf_counter()
    code = visiondet(["predict", "--weights", str(weights), "--source", str(folder), "--output", str(output),
                      "--batch-size", str(batch_size), "--workers", str(workers), "--device", "cpu",
                      "--overwrite", "--no-progress"])
    if code != 0:
        raise SystemExit(f"visiondet predict failed with exit code {code}")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--weights", type=Path, default=None, help="any visiondet checkpoint (default: a "
                        "random-weight classifier built here)")
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--size", type=int, default=96, help="classifier input side")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads for both (default: torch's own choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory(prefix="visiondet-bench-") as tmp:
        tmp = Path(tmp)
        folder = tmp / "images"
        synthetic_images(folder, args.images, args.width, args.height)
        weights = args.weights or classifier_checkpoint(tmp / "model.pt", args.backbone, args.size)
        print(f"{args.images} JPEGs of {args.width}x{args.height}, model {weights.name} "
              f"({'given' if args.weights else f'{args.backbone} classifier at {args.size} px'}), "
              f"torch threads {torch.get_num_threads()}, batch {args.batch_size}, workers {args.workers}")
        plain, ours = [], []
        for r in range(args.rounds):
            plain.append(plain_loop(weights, folder))
            ours.append(visiondet_predict(weights, folder, tmp / "out", args.batch_size, args.workers))
            print(f"round {r + 1}: plain loop {plain[-1]:.2f} s, visiondet predict {ours[-1]:.2f} s")
    t_plain, t_ours = statistics.median(plain), statistics.median(ours)
    print(f"\n{'':<28}{'seconds':>10}{'images/s':>10}")
    print(f"{'plain per-image loop':<28}{t_plain:>10.2f}{args.images / t_plain:>10.1f}")
    print(f"{'visiondet predict':<28}{t_ours:>10.2f}{args.images / t_ours:>10.1f}")
    print(f"speed-up: {t_plain / t_ours:.2f}x (goal >= 1.5x)")


if __name__ == "__main__":
    main()
