"""Synthetic shapes datasets: layout, determinism, annotation consistency, loadable by our datasets."""

import hashlib
import json

import numpy as np
import pytest

from vision.data.coco import CocoDetection, CocoSegmentation
from vision.data.folder import ImageFolderDataset
from vision.data.images import read_image
from vision.data.synthetic import make_shapes


def _digest(folder):
    h = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        h.update(path.relative_to(folder).as_posix().encode())
        h.update(path.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def detection(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes")
    make_shapes("detection", out, num_images=20, seed=0)
    return out


def test_detection_layout_and_coco_content(detection):
    train = json.loads((detection / "train" / "annotations.json").read_text())
    val = json.loads((detection / "val" / "annotations.json").read_text())
    assert len(train["images"]) == 16 and len(val["images"]) == 4
    assert [c["name"] for c in train["categories"]] == ["circle", "square", "triangle"]
    names = [img["file_name"] for img in train["images"] + val["images"]]
    assert len(set(names)) == 20  # train and val never share a file name
    with_objects = {a["image_id"] for a in train["annotations"]}
    assert len(with_objects) < len(train["images"])  # some images are empty negatives
    assert {a["category_id"] for a in train["annotations"]} == {1, 2, 3}
    for img in train["images"]:
        assert 160 <= img["width"] <= 256 and 160 <= img["height"] <= 256
        pixels = read_image(detection / "train" / "images" / img["file_name"])
        assert pixels.shape == (img["height"], img["width"], 3)
    sizes = []
    for a in train["annotations"]:
        img = train["images"][a["image_id"] - 1]
        x, y, w, h = a["bbox"]
        assert 0 <= x and 0 <= y and x + w <= img["width"] + 0.01 and y + h <= img["height"] + 0.01
        poly = np.array(a["segmentation"][0]).reshape(-1, 2)
        np.testing.assert_allclose([poly[:, 0].min(), poly[:, 1].min()], [x, y], atol=0.02)
        assert a["iscrowd"] == 0 and 0 < a["area"] <= w * h + 1
        sizes.append(max(w, h))
    assert 10 <= min(sizes) and max(sizes) <= 81 and max(sizes) - min(sizes) > 20  # several sizes


def test_same_seed_same_bytes_other_seed_other_data(detection, tmp_path):
    make_shapes("detection", tmp_path / "again", num_images=20, seed=0)
    assert _digest(tmp_path / "again") == _digest(detection)
    make_shapes("detection", tmp_path / "other", num_images=20, seed=1)
    assert _digest(tmp_path / "other") != _digest(detection)


def test_shapes_are_drawn_where_annotated(detection):
    data = json.loads((detection / "train" / "annotations.json").read_text())
    ds = CocoSegmentation(detection / "train" / "images", detection / "train" / "annotations.json")
    image_id = data["annotations"][0]["image_id"]
    index = ds.ids.index(image_id)
    image, target = ds[index]
    inside = image[:, target > 0].mean(dim=1)
    outside = image[:, target == 0].mean(dim=1)
    assert (target > 0).any() and set(target.unique().tolist()) <= {0, 1, 2, 3}
    assert not np.allclose(inside.numpy(), outside.numpy(), atol=0.02)  # objects differ from the background


def test_loads_as_a_detection_dataset(detection):
    ds = CocoDetection(detection / "val" / "images", detection / "val" / "annotations.json", with_masks=True)
    image, target = ds[0]
    assert image.shape[0] == 3 and target["masks"].shape[0] == target["boxes"].shape[0]


def test_classification_layout(tmp_path):
    splits = make_shapes("classification", tmp_path, num_images=9, seed=3, image_size=48)
    assert splits == {"train": tmp_path / "train", "val": tmp_path / "val"}
    train = ImageFolderDataset(tmp_path / "train")
    assert [c["name"] for c in train.classes] == ["circle", "square", "triangle"]
    assert sorted(train.targets) == [0, 0, 0, 1, 1, 2, 2]  # 7 train images, classes in turn
    assert train[0][0].shape == (3, 48, 48)
    assert sorted(p.parent.name for p in (tmp_path / "val").rglob("*.png")) == ["circle", "square"]


@pytest.mark.parametrize("kwargs,message", [
    ({"task": "boxes"}, "unknown task 'boxes'"),
    ({"num_images": 0}, "num_images must be at least 1"),
    ({"val_fraction": 1.0}, r"val_fraction must be in \[0, 1\)"),
    ({"image_size": 8}, "at least 32 px"),
])
def test_bad_arguments(tmp_path, kwargs, message):
    args = {"task": "detection", "num_images": 2, "seed": 0, **kwargs}
    with pytest.raises(ValueError, match=message):
        make_shapes(args.pop("task"), tmp_path, **args)


def test_an_existing_set_is_reused_and_another_one_refused(tmp_path):
    make_shapes("classification", tmp_path, num_images=12, seed=0, image_size=48)
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*.png")}
    make_shapes("classification", tmp_path, num_images=12, seed=0, image_size=48)  # same request: kept
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*.png")} == before
    # a bigger set over the small one would leave the small one's val images among the new ones
    with pytest.raises(ValueError, match=r"val: not empty"):
        make_shapes("classification", tmp_path, num_images=40, seed=0, image_size=48)
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*.png")} == before
    stray = tmp_path / "mine"
    (stray / "train").mkdir(parents=True)
    (stray / "train" / "notes.txt").write_text("the user's own file")
    with pytest.raises(ValueError, match="not empty"):
        make_shapes("detection", stray, num_images=4, seed=0)
    assert (stray / "train" / "notes.txt").read_text() == "the user's own file"
