"""Decoded-and-augmented images per second: our detection training pipeline against torchvision's.

    nice -n 10 .venv/bin/python benchmarks/data.py                 # 96 JPEGs of about 640x480, 3 rounds
    .venv/bin/python benchmarks/data.py --images 32 --rounds 1     # quick look

Both sides read the same JPEG files and the same boxes and do the same work per item, one process and one
thread each (what a DataLoader worker does):

- ours: ``CocoDetection`` with ``build_transforms(None, "detection", train=True, size=512)``: decode
  (``read_image``, Pillow), longest side to 512, box-safe random crop (p=0.5), horizontal flip (p=0.5),
  colour jitter (p=0.8), boxes carried along, ``to_tensor``.
- torchvision (the reference): ``PIL.Image.open`` + ``transforms.v2`` on the PIL image: Resize(longest
  512), RandomIoUCrop (p=0.5; torchvision's box-keeping crop), RandomHorizontalFlip, ColorJitter (p=0.8),
  ToImage, ToDtype(float32, scale), SanitizeBoundingBoxes.
- also shown, for context: ours with an antialiased downscale (``area_for_downscale="image"``; Pillow's
  resize always antialiases, our default bilinear resize does not, like torchvision's own detection
  transform), and the v2 pipeline on uint8 tensors decoded by ``torchvision.io.decode_jpeg``.

Rounds alternate between the pipelines and the table shows each one's median, so load from other
processes on a shared machine hits all alike. Goal: ours at least 1.5x the PIL reference.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torchvision  # noqa: E402
from PIL import Image  # noqa: E402
from sklearn.datasets import load_sample_images  # noqa: E402
from torchvision import tv_tensors  # noqa: E402
from torchvision.transforms import v2  # noqa: E402

from vision.data.coco import CocoDetection  # noqa: E402
from vision.data.transforms import build_transforms  # noqa: E402

REFERENCE = "torchvision v2 on PIL images (reference)"


def write_dataset(folder: Path, count: int, seed: int = 0) -> Path:
    """JPEGs cut from scikit-learn's two sample photos (real texture), 1-8 random boxes each, COCO JSON."""
    rng = np.random.default_rng(seed)
    photos = load_sample_images().images  # two 427 x 640 RGB photos
    images, annotations = [], []
    (folder / "images").mkdir(parents=True, exist_ok=True)
    for image_id in range(1, count + 1):
        photo = photos[image_id % 2]
        width, height = int(rng.integers(560, 641)), int(rng.integers(380, 427))
        x0, y0 = int(rng.integers(0, 641 - width)), int(rng.integers(0, 428 - height))
        crop = photo[y0 : y0 + height, x0 : x0 + width]
        if image_id % 3 == 0:
            crop = np.ascontiguousarray(crop.transpose(1, 0, 2))  # some portrait images
        height, width = crop.shape[:2]
        name = f"{image_id:05d}.jpg"
        cv2.imwrite(str(folder / "images" / name), cv2.cvtColor(crop, cv2.COLOR_RGB2BGR),
                    [cv2.IMWRITE_JPEG_QUALITY, 90])
        images.append({"id": image_id, "file_name": name, "width": width, "height": height})
        for _ in range(int(rng.integers(1, 9))):
            w, h = rng.uniform(20, width / 2), rng.uniform(20, height / 2)
            x, y = rng.uniform(0, width - w), rng.uniform(0, height - h)
            annotations.append({"id": len(annotations) + 1, "image_id": image_id,
                                "category_id": int(rng.integers(1, 4)), "bbox": [x, y, w, h],
                                "area": w * h, "iscrowd": 0})
    path = folder / "annotations.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations,
                                "categories": [{"id": i, "name": f"c{i}"} for i in (1, 2, 3)]}))
    return path


class TorchvisionDetection(torch.utils.data.Dataset):
    """The reference: PIL decode (or ``decode_jpeg`` with ``tensor=True``) + ``transforms.v2``."""

    def __init__(self, folder: Path, annotations: Path, size: int, tensor: bool):
        data = json.loads(annotations.read_text())
        self.items = []
        for img in data["images"]:
            boxes = [[x, y, x + w, y + h] for a in data["annotations"] if a["image_id"] == img["id"]
                     for x, y, w, h in [a["bbox"]]]
            labels = [a["category_id"] for a in data["annotations"] if a["image_id"] == img["id"]]
            self.items.append((folder / img["file_name"], boxes, labels))
        self.tensor = tensor
        self.transforms = v2.Compose([
            v2.Resize(size=None, max_size=size, antialias=True),
            v2.RandomApply([v2.RandomIoUCrop()], p=0.5),
            v2.RandomHorizontalFlip(p=0.5),
            v2.RandomApply([v2.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.02)], p=0.8),
            v2.ToImage(),
            v2.ToDtype(torch.float32, scale=True),
            v2.SanitizeBoundingBoxes(),
        ])

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        path, boxes, labels = self.items[index]
        if self.tensor:
            image = torchvision.io.decode_jpeg(torchvision.io.read_file(str(path)))
            canvas = tuple(image.shape[-2:])
        else:
            image = Image.open(path).convert("RGB")
            canvas = (image.height, image.width)
        target = {"boxes": tv_tensors.BoundingBoxes(torch.tensor(boxes), format="XYXY", canvas_size=canvas),
                  "labels": torch.tensor(labels)}
        return self.transforms(image, target)


def images_per_second(dataset, repeats: int = 1) -> float:
    start = time.perf_counter()
    for _ in range(repeats):
        for i in range(len(dataset)):
            image, target = dataset[i]
            assert image.dtype == torch.float32 and target["boxes"].shape[-1] == 4
    return repeats * len(dataset) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=96)
    parser.add_argument("--size", type=int, default=512, help="longest side after resizing")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    cv2.setNumThreads(1)  # one thread per process on both sides, as in DataLoader workers
    torch.set_num_threads(1)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        annotations = write_dataset(Path(tmp), args.images)
        images = Path(tmp) / "images"
        default = build_transforms(None, "detection", train=True, size=args.size)
        # the default pipeline written out as a config list, with INTER_AREA for downscaling
        antialiased = build_transforms([
            {"name": "LongestMaxSize", "max_size": args.size, "area_for_downscale": "image"},
            {"name": "BBoxSafeRandomCrop", "p": 0.5},
            {"name": "HorizontalFlip", "p": 0.5},
            {"name": "ColorJitter", "brightness": 0.2, "contrast": 0.2, "saturation": 0.2, "hue": 0.02,
             "p": 0.8},
        ], "detection", train=True)
        datasets = {
            "visiondet (default pipeline)": CocoDetection(images, annotations, transforms=default),
            "visiondet, antialiased resize": CocoDetection(images, annotations, transforms=antialiased),
            REFERENCE: TorchvisionDetection(images, annotations, args.size, tensor=False),
            "torchvision v2 on tensors (decode_jpeg)": TorchvisionDetection(images, annotations, args.size,
                                                                             tensor=True),
        }
        for dataset in datasets.values():  # warm-up: first-call costs, file cache
            images_per_second(dataset)
        rates: dict[str, list[float]] = {name: [] for name in datasets}
        for _ in range(args.rounds):
            for name, dataset in datasets.items():
                rates[name].append(images_per_second(dataset))
    medians = {name: statistics.median(r) for name, r in rates.items()}
    reference = medians[REFERENCE]
    print(f"{args.images} JPEGs (~640x480, 1-8 boxes), longest side {args.size}, 1 thread, "
          f"median of {args.rounds} rounds; torch {torch.__version__}, torchvision {torchvision.__version__}")
    print(f"{'pipeline':<46} {'images/s':>9} {'vs PIL reference':>17}")
    for name, rate in medians.items():
        print(f"{name:<46} {rate:>9.1f} {rate / reference:>16.2f}x")


if __name__ == "__main__":
    main()
