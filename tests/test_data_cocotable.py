"""The flat-array COCO table behind the datasets: the same samples as a per-annotation reading through
pycocotools, no Python object per image or per box (what keeps DataLoader workers' memory flat), and one
on-disk copy mapped by every process (what DDP ranks share)."""

import gc
import json
import multiprocessing
import pickle
import warnings

import numpy as np
import pytest

from vision.data.coco import CocoDetection, load_coco, xywh_to_xyxy
from vision.data.cococache import cached_coco_table
from vision.data.cocotable import PackedBytes, read_coco_table


def write_random_coco(tmp_path, num_images, seed=0):
    """A COCO file (no image files: every size is in the JSON) with shuffled annotations, non-contiguous
    ids, crowd, boxes reaching outside the image and some under 1 px after clipping."""
    rng = np.random.default_rng(seed)
    cats = [{"id": c, "name": f"c{c}"} for c in (90, 3, 17, 0)]  # any order, 0 included
    image_ids = rng.choice(10 * num_images, num_images, replace=False) + 1
    images = [{"id": int(i), "file_name": f"d{int(i) % 3}/{int(i)}.jpg", "width": int(rng.integers(20, 90)),
               "height": int(rng.integers(20, 90))} for i in image_ids]
    anns = []
    for img in images:
        for _ in range(int(rng.integers(0, 6))):
            x, y = rng.uniform(-10, img["width"]), rng.uniform(-10, img["height"])
            w, h = rng.uniform(0.2, 40), rng.uniform(0.2, 40)
            anns.append({"id": int(rng.integers(1, 10**9)), "image_id": img["id"],
                         "category_id": int(rng.choice([c["id"] for c in cats])),
                         "bbox": [round(float(v), 2) for v in (x, y, w, h)],
                         "iscrowd": int(rng.random() < 0.15)})
    ids = rng.choice(10**6, len(anns), replace=False) + 1  # unique
    for a, i in zip(anns, ids, strict=True):
        a["id"] = int(i)
    rng.shuffle(anns)
    path = tmp_path / f"random{num_images}.json"
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return path


def reference_targets(path):
    """Per image, what the datasets did before the table: pycocotools' index, one annotation at a time."""
    coco = load_coco(path)
    label = {cid: i + 1 for i, cid in enumerate(sorted(coco.cats))}
    out = {}
    for image_id in sorted(coco.imgs):
        img = coco.imgs[image_id]
        kept = {False: [], True: []}
        for ann in coco.imgToAnns[image_id]:
            x1, y1, x2, y2 = xywh_to_xyxy(ann["bbox"], img["width"], img["height"])
            if x2 - x1 >= 1 and y2 - y1 >= 1:
                kept[bool(ann["iscrowd"])].append(((x1, y1, x2, y2), label[ann["category_id"]]))
        out[image_id] = {
            "boxes": np.array([b for b, _ in kept[False]], np.float32).reshape(-1, 4),
            "labels": np.array([lab for _, lab in kept[False]], np.int64),
            "crowd": np.array([b for b, _ in kept[True]], np.float32).reshape(-1, 4),
            "file_name": img["file_name"],
        }
    return out


def test_table_gives_the_per_annotation_reading(tmp_path):
    path = write_random_coco(tmp_path, 60)
    expected = reference_targets(path)
    with pytest.warns(UserWarning, match="dropped"):
        ds = CocoDetection(tmp_path, path)
    assert ds.ids == sorted(expected)
    assert [c["id"] for c in ds.classes] == [0, 3, 17, 90]
    for index, image_id in enumerate(ds.ids):
        record = ds._record(index)
        want = expected[image_id]
        np.testing.assert_array_equal(record.boxes, want["boxes"])
        np.testing.assert_array_equal(record.labels, want["labels"])
        np.testing.assert_array_equal(record.crowd_boxes, want["crowd"])
        assert ds.file_name_of(image_id) == want["file_name"]
        assert record.path == tmp_path / want["file_name"]
    assert ds.file_name_of(-5) is None
    data = json.loads(path.read_text())
    sizes = {img["id"]: (img["width"], img["height"]) for img in data["images"]}
    boxes = [xywh_to_xyxy(a["bbox"], *sizes[a["image_id"]]) for a in data["annotations"]]
    table = read_coco_table(path, tmp_path)
    assert table.num_dropped == sum(1 for b in boxes if b[2] - b[0] < 1 or b[3] - b[1] < 1) > 0


def _tracked_objects(root) -> int:
    """Container objects reachable from ``root`` (what a worker's reads and the gc would touch)."""
    seen, stack = set(), [root]
    while stack:
        obj = stack.pop()
        if id(obj) in seen or not gc.is_tracked(obj) or isinstance(obj, type):
            continue
        seen.add(id(obj))
        stack.extend(gc.get_referents(obj))
    return len(seen)


def test_no_python_object_per_image_or_box(tmp_path):
    # Workers that read per-image Python records copy the pages they touch (reference counts, gc
    # headers): the dataset must hold the same number of container objects for 20 and 2,000 images.
    with pytest.warns(UserWarning, match="dropped"):
        small = CocoDetection(tmp_path, write_random_coco(tmp_path, 20, seed=1))
    with pytest.warns(UserWarning, match="dropped"):
        large = CocoDetection(tmp_path, write_random_coco(tmp_path, 2000, seed=1))
    assert len(large) == 2000 and large._table.boxes.shape[0] > 3000
    # a few dozen either way (paths cache their parts lazily), thousands if anything were per image
    assert _tracked_objects(large) < 40 and abs(_tracked_objects(large) - _tracked_objects(small)) <= 4
    assert large._table.nbytes < 200 * 2000  # about 40 bytes a box and 30 an image
    assert len(pickle.dumps(large)) < 2 * large._table.nbytes + 100_000  # what spawn workers receive


def test_packed_bytes_round_trip():
    items = [b"", "a/é.jpg".encode(), b"x" * 1000, b"\x00\xff"]
    packed = PackedBytes(items)
    assert len(packed) == 4 and [packed[i] for i in range(4)] == items
    assert pickle.loads(pickle.dumps(packed))[2] == b"x" * 1000


def test_drop_empty_keeps_images_with_an_instance(tmp_path):
    path = write_random_coco(tmp_path, 50, seed=2)
    expected = reference_targets(path)
    with pytest.warns(UserWarning, match="dropped"):
        ds = CocoDetection(tmp_path, path, drop_empty=True)
    assert ds.ids == [i for i in sorted(expected) if len(expected[i]["boxes"])]
    assert len(ds.aspect_ratios()) == len(ds)
    for index, image_id in enumerate(ds.ids):
        np.testing.assert_array_equal(ds._record(index).boxes, expected[image_id]["boxes"])


def _build_in_process(args):
    path, root, cache = args
    table = cached_coco_table(path, root, cache)
    return table.boxes.sum(), type(table.boxes).__name__


def test_cache_is_built_once_and_mapped_by_every_process(tmp_path, monkeypatch):
    path = write_random_coco(tmp_path, 300, seed=4)
    cache = tmp_path / "cache"
    direct = read_coco_table(path, tmp_path)
    # three processes at once, as DDP ranks start: one builds under the lock, all map the same files
    # (forked: spawned ones would spend their time importing torch)
    with multiprocessing.get_context("fork").Pool(3) as pool:
        sums = pool.map(_build_in_process, [(path, tmp_path, cache)] * 3, chunksize=1)
    assert {kind for _, kind in sums} == {"memmap"}
    assert all(s == pytest.approx(float(direct.boxes.sum())) for s, _ in sums)
    (entry,) = [p for p in cache.iterdir() if p.is_dir()]
    # a later process maps the entry without parsing the JSON at all
    monkeypatch.setattr("vision.data.cocotable.read_checked", lambda *a: pytest.fail("parsed again"))
    with pytest.warns(UserWarning, match="dropped"):
        ds = CocoDetection(tmp_path, path, cache=cache)
    assert isinstance(ds._table.boxes, np.memmap)
    np.testing.assert_array_equal(ds._table.boxes, direct.boxes)
    np.testing.assert_array_equal(ds._table.first, direct.first)
    assert ds.file_name_of(ds.ids[3]) == direct.file_name(3) and ds.classes[0]["id"] == 0
    monkeypatch.undo()
    # the file changes: a new entry replaces the old one
    data = json.loads(path.read_text())
    data["annotations"] = data["annotations"][:10]
    path.write_text(json.dumps(data))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        changed = CocoDetection(tmp_path, path, cache=cache)
    assert changed._table.boxes.shape[0] <= 10
    assert [p for p in cache.iterdir() if p.is_dir()] != [entry] and len(list(cache.glob("random*-*-*"))) == 1


def test_auto_cache_only_for_large_files(tmp_path, monkeypatch):
    monkeypatch.delenv("VISIONDET_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    path = write_random_coco(tmp_path, 20, seed=5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        CocoDetection(tmp_path, path)  # a few kB: parsed directly, nothing written
        assert not (tmp_path / "xdg").exists()
        monkeypatch.setattr("vision.data.coco.AUTO_CACHE_BYTES", 1)
        CocoDetection(tmp_path, path)
    assert len(list((tmp_path / "xdg" / "visiondet" / "coco").glob("random20-*/meta.json"))) == 1
    # $VISIONDET_CACHE, when set, is the root of every cache (vision/cache.py)
    monkeypatch.setenv("VISIONDET_CACHE", str(tmp_path / "mine"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        CocoDetection(tmp_path, path)
    assert len(list((tmp_path / "mine" / "coco").glob("random20-*/meta.json"))) == 1
