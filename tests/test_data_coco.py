"""COCO-style datasets on small hand-written JSON files and images built in tmp_path."""

import contextlib
import io
import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.cocoeval import COCOeval

from vision.data.coco import (
    AnnotationError,
    CategoryMap,
    CocoDetection,
    CocoSegmentation,
    load_coco,
    safe_join,
    xywh_to_xyxy,
)
from vision.data.transforms import build_transforms

CATS = [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}]


def write_dataset(tmp_path, images, annotations, categories=CATS, sizes=None, **extra):
    """images: [(id, file_name, width, height)]; image files are written at `sizes[id]` or the JSON size."""
    root = tmp_path / "images"
    root.mkdir(exist_ok=True)
    entries = []
    for image_id, name, width, height in images:
        w, h = (sizes or {}).get(image_id, (width, height))
        pixels = np.full((h, w, 3), 40 * image_id % 255, np.uint8)
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(root / name)
        entries.append({"id": image_id, "file_name": name, "width": width, "height": height})
    data = {"images": entries, "annotations": annotations, "categories": categories, **extra}
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(data))
    return root, path


def ann(ann_id, image_id, bbox, category_id=1, **fields):
    return {"id": ann_id, "image_id": image_id, "category_id": category_id, "bbox": bbox, "iscrowd": 0,
            "area": bbox[2] * bbox[3], **fields}


def test_xywh_to_xyxy_converts_and_clips():
    assert xywh_to_xyxy([1, 2, 3, 4], 16, 16) == (1.0, 2.0, 4.0, 6.0)
    assert xywh_to_xyxy([-5, 2, 20, 10], 16, 16) == (0.0, 2.0, 15.0, 12.0)
    assert xywh_to_xyxy([10, 12, 30, 30], 16, 16) == (10.0, 12.0, 16.0, 16.0)


def test_category_map_non_contiguous_ids_and_id_zero():
    cats = [{"id": 7, "name": "c"}, {"id": 0, "name": "a"}, {"id": 3, "name": "b"}]
    cmap = CategoryMap.from_categories(cats)
    assert cmap.ids == (0, 3, 7) and cmap.names == ("a", "b", "c")
    assert [cmap.label_of(i) for i in (0, 3, 7)] == [1, 2, 3]  # id 0 is label 1, never background
    assert [cmap.category_of(label) for label in (1, 2, 3)] == [0, 3, 7]
    assert cmap.name_of(3) == "c"
    assert cmap.classes == [{"id": 0, "name": "a"}, {"id": 3, "name": "b"}, {"id": 7, "name": "c"}]
    assert CategoryMap.from_classes(cmap.classes) == cmap  # what a checkpoint restores
    with pytest.raises(KeyError, match="category id 5"):
        cmap.label_of(5)
    with pytest.raises(KeyError, match="outside 1..3"):
        cmap.category_of(0)
    with pytest.raises(ValueError, match="duplicate category ids: 3"):
        CategoryMap((3, 3), ("a", "b"))


def test_dataset_labels_follow_the_category_map(tmp_path):
    cats = [{"id": 90, "name": "zebra"}, {"id": 0, "name": "ant"}]
    root, path = write_dataset(tmp_path, [(1, "a.png", 16, 16)],
                               [ann(1, 1, [1, 1, 5, 5], 90), ann(2, 1, [8, 8, 4, 4], 0)], cats)
    ds = CocoDetection(root, path)
    image, target = ds[0]
    assert ds.classes == [{"id": 0, "name": "ant"}, {"id": 90, "name": "zebra"}]
    assert target["labels"].tolist() == [2, 1]
    assert target["labels"].dtype == torch.int64
    torch.testing.assert_close(target["boxes"], torch.tensor([[1.0, 1, 6, 6], [8, 8, 12, 12]]))
    assert image.shape == (3, 16, 16) and image.dtype == torch.float32
    assert torch.allclose(image, torch.full_like(image, 40 / 255))
    assert target["image_id"] == 1 and target["orig_size"].tolist() == [16, 16]


def test_missing_optional_fields_are_filled_and_pycocotools_evaluates(tmp_path):
    root, path = write_dataset(tmp_path, [(1, "a.png", 20, 20), (2, "b.png", 20, 20)], [
        {"image_id": 1, "category_id": 1, "bbox": [2, 2, 10, 8]},  # no id, iscrowd, area
        {"id": 9, "image_id": 2, "category_id": 2, "bbox": [0, 0, 5, 5],
         "segmentation": [[0, 0, 4, 0, 4, 4, 0, 4]]},
    ])
    coco = load_coco(path)
    assert coco.dataset["info"] == {} and coco.dataset["licenses"] == []
    first, second = coco.dataset["annotations"]
    assert first["id"] == 10 and first["iscrowd"] == 0 and first["area"] == 80.0  # id after the largest
    assert second["area"] == 16.0  # the mask area, as COCO defines it, not the box's 25
    results = [{"image_id": 1, "category_id": 1, "bbox": [2, 2, 10, 8], "score": 0.9},
               {"image_id": 2, "category_id": 2, "bbox": [0, 0, 5, 5], "score": 0.8}]
    with contextlib.redirect_stdout(io.StringIO()):
        ev = COCOeval(coco, coco.loadRes(results), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    assert ev.stats[0] == pytest.approx(1.0)


def test_bbox_missing_is_taken_from_the_mask_and_width_height_from_the_file(tmp_path):
    root, path = write_dataset(tmp_path, [(1, "a.png", 12, 10)], [
        {"id": 1, "image_id": 1, "category_id": 1, "segmentation": [[2, 3, 6, 3, 6, 7, 2, 7]]},
    ])
    data = json.loads(path.read_text())
    del data["images"][0]["width"], data["images"][0]["height"]
    path.write_text(json.dumps(data))
    coco = load_coco(path, images_root=root)
    assert (coco.imgs[1]["width"], coco.imgs[1]["height"]) == (12, 10)
    assert coco.anns[1]["bbox"] == [2.0, 3.0, 4.0, 4.0]


@pytest.mark.parametrize("change,message", [
    (lambda d: d["annotations"].append(ann(7, 1, [0, 0, 2, 2], 5)),
     "annotations with a category_id not in 'categories': ids 7"),
    (lambda d: d["annotations"].append(ann(8, 42, [0, 0, 2, 2])),
     "annotations of an image_id not in 'images': ids 8"),
    (lambda d: d["images"].append(dict(d["images"][0])), "duplicate image ids: 1"),
    (lambda d: d["annotations"].append(ann(1, 1, [0, 0, 2, 2])), "duplicate annotation ids: 1"),
    (lambda d: d["annotations"].append(ann(3, 1, [0, 0, "x", 2])), "without a valid [x, y, w, h] bbox: 3"),
    (lambda d: d.pop("categories"), "no 'categories' list"),
])
def test_broken_files_raise_annotation_error_listing_ids(tmp_path, change, message):
    _, path = write_dataset(tmp_path, [(1, "a.png", 8, 8)], [ann(1, 1, [0, 0, 4, 4])])
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))
    with pytest.raises(AnnotationError) as info:
        load_coco(path)
    assert str(info.value) == f"{path}: {info.value.reason}"
    assert message in info.value.reason


def test_unreadable_json_names_line_and_column(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('{"images": [\n  {"id": 1,}\n]}')
    with pytest.raises(AnnotationError, match=r"bad\.json: not valid JSON: .* at line 2 column 12"):
        load_coco(path)
    with pytest.raises(AnnotationError, match="no such annotations file"):
        load_coco(tmp_path / "missing.json")


@pytest.mark.parametrize(
    "name", ["../../etc/passwd", "/etc/passwd", "a/../../b.png", "..\\..\\x.png", "C:\\x.png", ""]
)
def test_safe_join_refuses_names_outside_the_root(tmp_path, name):
    with pytest.raises(ValueError, match="unsafe file name"):
        safe_join(tmp_path, name)


def test_safe_join_accepts_sub_folders_and_windows_separators(tmp_path):
    assert safe_join(tmp_path, "sub/a.png") == tmp_path / "sub" / "a.png"
    assert safe_join(tmp_path, "sub\\a.png") == tmp_path / "sub" / "a.png"


def test_dataset_refuses_traversal_file_names(tmp_path):
    root, path = write_dataset(tmp_path, [(1, "a.png", 8, 8)], [])
    data = json.loads(path.read_text())
    data["images"].append({"id": 2, "file_name": "../../etc/passwd", "width": 8, "height": 8})
    path.write_text(json.dumps(data))
    with pytest.raises(AnnotationError, match=r"image id 2: unsafe file name '\.\./\.\./etc/passwd'"):
        CocoDetection(root, path)


def test_crowd_is_never_a_positive_and_empty_images_are_negatives(tmp_path):
    images = [(1, "a.png", 16, 16), (2, "crowd.png", 16, 16), (3, "empty.png", 16, 16)]
    root, path = write_dataset(tmp_path, images, [
        ann(1, 1, [1, 1, 4, 4]),
        ann(2, 1, [8, 8, 6, 6], iscrowd=1),
        ann(3, 2, [0, 0, 10, 10], iscrowd=1),
    ])
    ds = CocoDetection(root, path)
    assert len(ds) == 3 and ds.ids == [1, 2, 3]
    _, t1 = ds[0]
    assert t1["labels"].tolist() == [1]
    assert t1["crowd_boxes"].tolist() == [[8, 8, 14, 14]]
    _, t2 = ds[1]  # crowd only: a negative with an ignore region
    assert t2["boxes"].shape == (0, 4) and t2["labels"].shape == (0,) and t2["crowd_boxes"].shape == (1, 4)
    _, t3 = ds[2]
    assert t3["boxes"].shape == (0, 4) and t3["crowd_boxes"].shape == (0, 4)
    assert t3["boxes"].dtype == torch.float32
    dropped = CocoDetection(root, path, drop_empty=True)
    assert dropped.ids == [1] and len(dropped) == 1 and len(dropped.aspect_ratios()) == 1


def test_degenerate_boxes_are_dropped_with_a_warning_naming_file_and_id(tmp_path):
    root, path = write_dataset(tmp_path, [(1, "a.png", 16, 16)], [
        ann(1, 1, [-5, 2, 20, 10]),  # clipped to [0, 2, 15, 12]
        ann(2, 1, [10, 10, 0.5, 20]),  # 0.5 px wide
        ann(3, 1, [30, 30, 5, 5]),  # entirely outside the image
        ann(4, 1, [3, 3, -2, 4]),  # negative width
    ])
    named = r"a\.png \(annotation 2\), a\.png \(annotation 3\), a\.png \(annotation 4\)"
    with pytest.warns(UserWarning, match=rf"ann\.json: dropped 3 boxes .*: {named}"):
        ds = CocoDetection(root, path)
    _, target = ds[0]
    assert target["boxes"].tolist() == [[0, 2, 15, 12]]


def test_exif_rotated_image_follows_the_json_size(tmp_path):
    pixels = np.zeros((6, 8, 3), np.uint8)  # stored 8 wide, 6 high; a mark at the top-left corner
    pixels[0, 0] = 255
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed rotated 90 degrees clockwise: 6 wide, 8 high
    (tmp_path / "images").mkdir()
    Image.fromarray(pixels).save(tmp_path / "images" / "r.png", exif=exif)
    for width, height, marked in ((6, 8, (0, 5)), (8, 6, (0, 0))):
        data = {"images": [{"id": 1, "file_name": "r.png", "width": width, "height": height}],
                "annotations": [ann(1, 1, [0, 0, 2, 2])], "categories": CATS}
        (tmp_path / "a.json").write_text(json.dumps(data))
        image, target = CocoDetection(tmp_path / "images", tmp_path / "a.json")[0]
        assert image.shape == (3, height, width)
        assert image[0, marked[0], marked[1]] == 1.0  # the corner mark moved only when rotated
        assert target["orig_size"].tolist() == [height, width]


def test_size_mismatch_warns_and_clips_boxes_but_masks_refuse(tmp_path):
    polygon = [[10, 10, 18, 10, 18, 18, 10, 18]]
    annotations = [ann(1, 1, [10, 10, 8, 8], segmentation=polygon)]
    root, path = write_dataset(tmp_path, [(1, "a.png", 20, 20)], annotations, sizes={1: (16, 16)})
    with pytest.warns(UserWarning, match=r"a\.png: image is 16x16 but ann\.json says 20x20"):
        _, target = CocoDetection(root, path)[0]
    assert target["boxes"].tolist() == [[10, 10, 16, 16]]
    with pytest.raises(AnnotationError, match="masks cannot be aligned"):
        CocoDetection(root, path, with_masks=True)[0]


def test_num_classes_override(tmp_path):
    root, path = write_dataset(tmp_path, [(1, "a.png", 8, 8)], [ann(1, 1, [0, 0, 4, 4], 2)])
    assert CocoDetection(root, path).num_classes == 2
    assert CocoDetection(root, path, num_classes=5).num_classes == 5
    with pytest.raises(AnnotationError, match=r"num_classes=1 .* labels 2..2 \(categories 2 \(dog\)\)"):
        CocoDetection(root, path, num_classes=1)


def test_polygon_and_rle_masks(tmp_path):
    rle_mask = np.zeros((10, 12), np.uint8)
    rle_mask[1:4, 2:9] = 1
    rle = mask_utils.encode(np.asfortranarray(rle_mask))
    rle["counts"] = rle["counts"].decode("ascii")
    root, path = write_dataset(tmp_path, [(1, "a.png", 12, 10)], [
        ann(1, 1, [2, 5, 4, 4], segmentation=[[2, 5, 6, 5, 6, 9, 2, 9]]),
        ann(2, 1, [2, 1, 7, 3], 2, segmentation=rle),
    ])
    _, target = CocoDetection(root, path, with_masks=True)[0]
    masks = target["masks"]
    assert masks.shape == (2, 10, 12) and masks.dtype == torch.uint8
    expected = np.zeros((10, 12), np.uint8)
    expected[5:9, 2:6] = 1  # pycocotools rasterises the polygon [2, 6] x [5, 9] as pixels 2..5, 5..8
    np.testing.assert_array_equal(masks[0].numpy(), expected)
    np.testing.assert_array_equal(masks[1].numpy(), rle_mask)


def test_masks_required_when_asked(tmp_path):
    root, path = write_dataset(tmp_path, [(1, "a.png", 8, 8)], [ann(4, 1, [0, 0, 4, 4])])
    with pytest.raises(AnnotationError, match="without a usable polygon or RLE segmentation .* ids 4"):
        CocoDetection(root, path, with_masks=True)


def test_transforms_move_boxes_crowd_and_masks_together(tmp_path):
    root, path = write_dataset(tmp_path, [(1, "a.png", 16, 8)], [
        ann(1, 1, [1, 2, 3, 4], segmentation=[[1, 2, 4, 2, 4, 6, 1, 6]]),
        ann(2, 1, [10, 0, 2, 2], 2, iscrowd=1, segmentation=[[10, 0, 12, 0, 12, 2, 10, 2]]),
    ])
    flip = build_transforms([{"name": "HorizontalFlip", "p": 1.0}], "detection", train=True)
    image, target = CocoDetection(root, path, transforms=flip, with_masks=True)[0]
    torch.testing.assert_close(target["boxes"], torch.tensor([[12.0, 2, 15, 6]]))  # x -> 16 - x
    torch.testing.assert_close(target["crowd_boxes"], torch.tensor([[4.0, 0, 6, 2]]))
    assert target["labels"].tolist() == [1]
    assert target["masks"][0, 2:6, 12:15].all() and target["masks"].sum() == 12
    assert image.shape == (3, 8, 16)


def test_crop_that_removes_a_box_removes_its_mask(tmp_path):
    root, path = write_dataset(tmp_path, [(1, "a.png", 20, 10)], [
        ann(1, 1, [1, 1, 4, 4], segmentation=[[1, 1, 5, 1, 5, 5, 1, 5]]),
        ann(2, 1, [14, 2, 4, 4], 2, segmentation=[[14, 2, 18, 2, 18, 6, 14, 6]]),
    ])
    crop = build_transforms([{"name": "Crop", "x_min": 10, "x_max": 20, "y_max": 10}], "detection", True)
    _, target = CocoDetection(root, path, transforms=crop, with_masks=True)[0]
    assert target["labels"].tolist() == [2]
    torch.testing.assert_close(target["boxes"], torch.tensor([[4.0, 2, 8, 6]]))
    assert target["masks"].shape == (1, 10, 10) and target["masks"][0, 2:6, 4:8].all()


def test_segmentation_index_map_paints_instances_over_crowd(tmp_path):
    root, path = write_dataset(tmp_path, [(1, "a.png", 10, 10), (2, "b.png", 10, 10)], [
        ann(1, 1, [0, 0, 6, 6], iscrowd=1, segmentation=[[0, 0, 6, 0, 6, 6, 0, 6]]),
        ann(2, 1, [4, 4, 4, 4], 2, segmentation=[[4, 4, 8, 4, 8, 8, 4, 8]]),
        ann(3, 1, [6, 6, 4, 4], 1, segmentation=[[6, 6, 10, 6, 10, 10, 6, 10]]),
    ], categories=[{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}])
    ds = CocoSegmentation(root, path)
    image, target = ds[0]
    assert image.shape == (3, 10, 10) and target.shape == (10, 10) and target.dtype == torch.int64
    expected = np.zeros((10, 10), np.int64)
    expected[0:6, 0:6] = 255  # crowd: ignore
    expected[4:8, 4:8] = 2  # an instance paints over the crowd region
    expected[6:10, 6:10] = 1  # a later annotation paints over an earlier one
    np.testing.assert_array_equal(target.numpy(), expected)
    _, empty = ds[1]
    assert empty.unique().tolist() == [0]


def test_segmentation_transforms_pad_with_ignore(tmp_path):
    root, path = write_dataset(tmp_path, [(1, "a.png", 16, 8)], [
        ann(1, 1, [0, 0, 4, 4], segmentation=[[0, 0, 4, 0, 4, 4, 0, 4]])])
    pipeline = build_transforms(None, "segmentation", train=False, size=16)
    image, target = CocoSegmentation(root, path, transforms=pipeline)[0]
    assert image.shape == (3, 16, 16) and target.shape == (16, 16)
    # 16x8 already has its longest side at 16: 4 rows of padding above and below, labelled ignore
    assert (target[:4] == 255).all() and (target[12:] == 255).all()
    assert (target[4:8, 0:4] == 1).all() and (target == 1).sum() == 16
    assert (image[:, :4] == 128 / 255).all()


def test_no_warnings_on_a_clean_dataset(tmp_path):
    root, path = write_dataset(tmp_path, [(1, "a.png", 16, 16)], [ann(1, 1, [1, 1, 4, 4])])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        CocoDetection(root, path)[0]
