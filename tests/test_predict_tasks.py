"""`visiondet predict` with real segmentation and detection checkpoints (tiny, random weights)."""

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from apps.cli import main
from apps.predict import Predictor
from vision.checkpoint import save_checkpoint
from vision.data.images import read_image

CLASSES = [{"id": 3, "name": "road"}, {"id": 7, "name": "sky"}]


def checkpoint(path: Path, task: str, cfg, model, preprocess: dict) -> Path:
    ckpt = {"format": "visiondet", "version": 1, "task": task, "model": dataclasses.asdict(cfg),
            "classes": CLASSES, "preprocess": preprocess, "state_dict": model.state_dict()}
    return save_checkpoint(ckpt, path)


def noise(h, w, seed):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def write_images(src: Path) -> dict[str, tuple[int, int]]:
    sizes = {"x/a.png": (30, 40), "x/a.jpg": (30, 40), "y/b.png": (24, 24)}
    for i, (name, (h, w)) in enumerate(sizes.items()):
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(noise(h, w, i)).save(src / name)
    return sizes


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.mark.parametrize("size", [None, 32])
def test_segmentation_masks_and_overlays(tmp_path, size):
    from vision.segmentation import SegmentationConfig, build_segmentation_model

    torch.manual_seed(0)
    cfg = SegmentationConfig(arch="fcn_resnet18", num_classes=2)
    weights = checkpoint(tmp_path / "seg.pt", "segmentation", cfg, build_segmentation_model(cfg,
                         load_pretrained=False), {"size": size})
    src, out = tmp_path / "src", tmp_path / "out"
    sizes = write_images(src)
    code = main(["predict", "--weights", str(weights), "--source", str(src), "--output", str(out),
                 "--workers", "0", "--batch-size", "3", "--save-images", "--no-progress"])
    assert code == 0
    records = {r["file"]: r for r in lines(out / "predictions.jsonl")}
    # a.png and a.jpg in one folder: their masks keep apart
    assert {n: r["mask"] for n, r in records.items()} == {
        "x/a.jpg": "masks/x/a.jpg.png", "x/a.png": "masks/x/a.png.png", "y/b.png": "masks/y/b.png"}
    predictor = Predictor(weights, "cpu")
    for name, (h, w) in sizes.items():
        mask = np.asarray(Image.open(out / records[name]["mask"]))
        assert mask.shape == (h, w) and mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 1, 2}
        [direct] = predictor.predict([read_image(src / name)])
        np.testing.assert_array_equal(mask, direct.mask)  # batched stream == one image in memory
        pixels = {c["name"]: c["pixels"] for c in records[name]["classes"]}
        assert pixels == {CLASSES[k - 1]["name"]: int((mask == k).sum()) for k in (1, 2) if (mask == k).any()}
        assert np.asarray(Image.open(out / "images" / name)).shape == (h, w, 3)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["done"] == 3 and summary["outputs"]["masks"] == "masks/"
    assert sum(summary["images_per_class"].values()) == sum(len(r["classes"]) for r in records.values())
