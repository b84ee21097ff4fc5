"""The real-imagery development set (benchmarks/realset.py) on a tiny build: what a user's COCO data has."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("skimage")

import importlib.util
import sys

from vision.data.coco import CocoDetection

# benchmarks/ is scripts, not an installed package: load the module from its file
_spec = importlib.util.spec_from_file_location(
    "benchmarks_realset", Path(__file__).resolve().parents[1] / "benchmarks" / "realset.py"
)
realset_module = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = realset_module  # dataclasses look their module up by name
_spec.loader.exec_module(realset_module)
CATEGORIES, MAX_SIDE = realset_module.CATEGORIES, realset_module.MAX_SIDE
TRAIN_BACKGROUNDS, VAL_BACKGROUNDS = realset_module.TRAIN_BACKGROUNDS, realset_module.VAL_BACKGROUNDS
build_realset = realset_module.build_realset


@pytest.fixture(scope="module")
def realset(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    out = tmp_path_factory.mktemp("realset")
    paths = build_realset(out, seed=3, num_train=20, num_val=10, negative_fraction=0.2)
    return {split: {"coco": json.loads(p.read_text()), "root": p.parent} for split, p in paths.items()}


def test_category_ids_are_non_contiguous(realset: dict[str, dict]) -> None:
    for split in ("train", "val"):
        ids = [c["id"] for c in realset[split]["coco"]["categories"]]
        assert ids == list(CATEGORIES)
        assert sorted(ids) != list(range(1, len(ids) + 1))
        used = {a["category_id"] for a in realset[split]["coco"]["annotations"]}
        assert used <= set(ids) and len(used) >= 3


def test_negative_images_in_both_splits(realset: dict[str, dict]) -> None:
    for split, count in (("train", 20), ("val", 10)):
        coco = realset[split]["coco"]
        annotated = {a["image_id"] for a in coco["annotations"]}
        negatives = [im for im in coco["images"] if im["id"] not in annotated]
        assert len(coco["images"]) == count
        assert len(negatives) == round(count * 0.2)


def test_boxes_inside_images_and_sized_like_the_issue(realset: dict[str, dict]) -> None:
    from PIL import Image

    for split in ("train", "val"):
        coco, root = realset[split]["coco"], realset[split]["root"]
        sizes = {im["id"]: (im["width"], im["height"]) for im in coco["images"]}
        for im in coco["images"]:
            with Image.open(Path(root) / "images" / im["file_name"]) as img:
                assert img.size == (im["width"], im["height"])
            assert 256 <= max(im["width"], im["height"]) <= 480
        for ann in coco["annotations"]:
            x, y, w, h = ann["bbox"]
            width, height = sizes[ann["image_id"]]
            assert 0 <= x and 0 <= y and x + w <= width and y + h <= height
            assert 20 <= max(w, h) <= MAX_SIDE + 1


def test_val_backgrounds_never_seen_in_training(realset: dict[str, dict]) -> None:
    train = {im["background"] for im in realset["train"]["coco"]["images"]}
    val = {im["background"] for im in realset["val"]["coco"]["images"]}
    assert train <= set(TRAIN_BACKGROUNDS) and val <= set(VAL_BACKGROUNDS)
    assert not train & val and len(val) == len(VAL_BACKGROUNDS)


def test_same_seed_same_set_and_loads_as_coco(realset: dict[str, dict], tmp_path: Path) -> None:
    again = build_realset(tmp_path, seed=3, num_train=20, num_val=10, negative_fraction=0.2)
    assert json.loads(again["val"].read_text()) == realset["val"]["coco"]
    root = realset["train"]["root"]
    dataset = CocoDetection(root / "images", root / "annotations.json")
    assert [c["id"] for c in dataset.classes] == sorted(CATEGORIES)  # the library maps ids to labels 1..K
    image, target = dataset[0]
    assert target["labels"].min() >= 1 and target["labels"].max() <= len(CATEGORIES)
