"""The real-imagery development set (benchmarks/realset.py) on a tiny build: what a user's COCO data has."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("skimage")

import sys

import numpy as np
from PIL import Image

from vision.data.check import CheckReport
from vision.data.check_folders import check_image_folder, check_mask_folder
from vision.data.coco import CocoDetection
from vision.data.folder import ImageFolderDataset
from vision.data.segfolder import MaskFolderSegmentation

# benchmarks/ is scripts beside the package, not installed: the repository root makes it importable
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.realset import (  # noqa: E402
    CATEGORIES,
    MAX_SIDE,
    TRAIN_BACKGROUNDS,
    VAL_BACKGROUNDS,
    build_realset,
    build_segmentation_set,
    segmentation_classes,
)
from benchmarks.realset_crops import BACKGROUND, CROP_SIZE, build_classification_set  # noqa: E402

SIZES = {"seed": 3, "num_train": 20, "num_val": 10, "negative_fraction": 0.2}


@pytest.fixture(scope="module")
def realset(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    out = tmp_path_factory.mktemp("realset")
    paths = build_realset(out, **SIZES)
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
    again = build_realset(tmp_path, **SIZES)
    assert json.loads(again["val"].read_text()) == realset["val"]["coco"]
    root = realset["train"]["root"]
    dataset = CocoDetection(root / "images", root / "annotations.json")
    assert [c["id"] for c in dataset.classes] == sorted(CATEGORIES)  # the library maps ids to labels 1..K
    image, target = dataset[0]
    assert target["labels"].min() >= 1 and target["labels"].max() <= len(CATEGORIES)


# ---- the segmentation and classification sets: the same scenes, written for the other two tasks


@pytest.fixture(scope="module")
def segset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("realset_seg")
    build_segmentation_set(out, **SIZES)
    return out


@pytest.fixture(scope="module")
def clsset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("realset_cls")
    build_classification_set(out, **SIZES)
    return out


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_segmentation_scenes_are_the_detection_scenes(realset: dict[str, dict], segset: Path) -> None:
    for split in ("train", "val"):
        assert json.loads((segset / split / "annotations.json").read_text()) == realset[split]["coco"]
        assert _files(segset / split / "images") == _files(realset[split]["root"] / "images")
    assert (segset / "classes.txt").read_text().split() == segmentation_classes()


def test_masks_line_up_with_the_boxes(segset: Path) -> None:
    """Every labelled pixel lies in a box of its category; each box holds pixels of its category, and its
    object (its label or the ignored blend around it, or an object pasted over its edge) reaches every
    side of the box."""
    names = segmentation_classes()
    label_of = {cid: names.index(name) + 1 for cid, name in CATEGORIES.items()}
    checked = 0
    for split in ("train", "val"):
        coco = json.loads((segset / split / "annotations.json").read_text())
        for im in coco["images"]:
            mask = np.asarray(Image.open(segset / split / "masks" / f"{Path(im['file_name']).stem}.png"))
            assert mask.shape == (im["height"], im["width"])
            assert set(np.unique(mask).tolist()) <= set(range(len(names) + 1)) | {255}
            inside = np.zeros((len(names) + 1, *mask.shape), bool)
            for ann in (a for a in coco["annotations"] if a["image_id"] == im["id"]):
                x, y, w, h = (int(v) for v in ann["bbox"])
                label = label_of[ann["category_id"]]
                inside[label, y : y + h, x : x + w] = True
                box = mask[y : y + h, x : x + w]
                assert (box == label).sum() > 0.1 * w * h, f"{im['file_name']}: {names[label - 1]} unlabelled"
                ys, xs = np.nonzero(box != 0)
                assert xs.min() <= 1 and ys.min() <= 1 and xs.max() >= w - 2 and ys.max() >= h - 2
                checked += 1
            for label in range(1, len(names) + 1):
                assert not ((mask == label) & ~inside[label]).any(), f"{im['file_name']}: label outside box"
    assert checked > 20


def test_blended_borders_are_ignored(segset: Path) -> None:
    masks = [np.asarray(Image.open(p)) for p in sorted((segset / "train" / "masks").glob("*.png"))]
    labelled = sum(int(((m > 0) & (m < 255)).sum()) for m in masks)
    ignored = sum(int((m == 255).sum()) for m in masks)
    assert 0 < ignored < labelled  # borders only: most of each object keeps its label


def test_segmentation_set_passes_data_check_and_loads(segset: Path) -> None:
    for split in ("train", "val"):
        images, masks = segset / split / "images", segset / split / "masks"
        report = check_mask_folder(images, masks, segmentation_classes(), workers=1)
        assert report.ok, report.to_text()
        dataset = MaskFolderSegmentation(images, masks, segmentation_classes())
        assert len(dataset) == SIZES[f"num_{split}"]
        image, target = dataset[0]
        assert target.shape == image.shape[1:]


def test_mask_check_finds_what_training_refuses(segset: Path, tmp_path: Path) -> None:
    import shutil

    images, masks = tmp_path / "images", tmp_path / "masks"
    shutil.copytree(segset / "val" / "images", images)
    shutil.copytree(segset / "val" / "masks", masks)
    (masks / "val_00000.png").unlink()
    Image.fromarray(np.full((8, 8), 9, np.uint8)).save(masks / "val_00001.png")
    report = check_mask_folder(images, masks, segmentation_classes(), workers=1)
    codes = {f.code: f.examples for f in report.errors}
    assert codes["missing_mask"] == ["val_00000.jpg"] and "size_mismatch" in codes
    Image.fromarray(np.full(Image.open(images / "val_00001.jpg").size[::-1], 9, np.uint8)).save(
        masks / "val_00001.png")
    report = check_mask_folder(images, masks, segmentation_classes(), workers=1)
    assert [e.split()[0] for e in next(f for f in report.errors if f.code == "bad_mask_value").examples] \
        == ["val_00001.png"]


def test_classification_crops_one_per_object_plus_background(realset: dict[str, dict], clsset: Path) -> None:
    for split in ("train", "val"):
        counts = {d.name: len(list(d.glob("*.jpg"))) for d in (clsset / split).iterdir()}
        assert sorted(counts) == sorted([*CATEGORIES.values(), BACKGROUND])
        boxes = {name: 0 for name in CATEGORIES.values()}
        for ann in realset[split]["coco"]["annotations"]:
            boxes[CATEGORIES[ann["category_id"]]] += 1
        assert {n: c for n, c in counts.items() if n != BACKGROUND} == boxes
        assert counts[BACKGROUND] > 0
    with Image.open(next((clsset / "val" / BACKGROUND).glob("*.jpg"))) as crop:
        assert crop.size == (CROP_SIZE, CROP_SIZE)


def test_classification_set_passes_data_check_and_loads(clsset: Path) -> None:
    for split in ("train", "val"):
        report = check_image_folder(clsset / split, workers=1)
        assert report.ok and not report.findings, report.to_text()
    dataset = ImageFolderDataset(clsset / "train")
    assert [c["name"] for c in dataset.classes] == sorted([*CATEGORIES.values(), BACKGROUND])


def test_class_folder_check_finds_what_training_loses(clsset: Path, tmp_path: Path) -> None:
    import shutil

    root = tmp_path / "train"
    shutil.copytree(clsset / "val", root)
    (root / "cup" / "broken.jpg").write_bytes(b"not a jpeg")
    (root / "loose.jpg").write_bytes((root / "coin").joinpath(next((root / "coin").iterdir())).read_bytes())
    (root / "empty").mkdir()
    report = check_image_folder(root, workers=1)
    assert isinstance(report, CheckReport) and not report.ok
    found = {f.code: f.examples for f in report.findings}
    assert found["unreadable_image"][0].startswith("cup/broken.jpg")
    assert found["loose_image"] == ["loose.jpg"] and found["unused_category"] == ["empty"]


def test_same_seed_same_segmentation_and_classification_sets(tmp_path: Path) -> None:
    small = {**SIZES, "num_train": 6, "num_val": 3}
    first, second = tmp_path / "a", tmp_path / "b"
    for out in (first, second):
        build_segmentation_set(out / "seg", **small)
        build_classification_set(out / "cls", **small)
    assert _files(first) == _files(second)
    other = tmp_path / "c"
    build_segmentation_set(other, **{**small, "seed": 4})
    assert _files(other / "val" / "masks") != _files(first / "seg" / "val" / "masks")
