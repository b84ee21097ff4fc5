"""COCO instances -> semantic index maps through CocoSegmentation, as the segmentation task reads them:
a polygon, a compressed RLE instance and an uncompressed-RLE crowd region (COCO's own crowd format)."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from vision.data.coco import CocoSegmentation


def uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO's crowd encoding: run lengths over the column-major pixels, starting with a run of zeros."""
    flat = mask.flatten(order="F")
    counts, current, run = [], 0, 0
    for value in flat:
        if value == current:
            run += 1
        else:
            counts.append(run)
            current, run = value, 1
    counts.append(run)
    return {"counts": counts, "size": list(mask.shape)}


def test_polygon_rle_and_crowd_become_one_index_map(tmp_path):
    height, width = 12, 16
    Image.fromarray(np.zeros((height, width, 3), np.uint8)).save(tmp_path / "a.png")
    square = [[1, 1, 5, 1, 5, 5, 1, 5]]  # pycocotools rasterises it as pixels 1..4 x 1..4
    blob = np.zeros((height, width), np.uint8)
    blob[6:10, 8:14] = 1
    compressed = mask_utils.encode(np.asfortranarray(blob))
    compressed["counts"] = compressed["counts"].decode("ascii")
    crowd = np.zeros((height, width), np.uint8)
    crowd[:, 11:] = 1  # overlaps the blob's right part: the instance wins there
    anns = [
        {"id": 1, "category_id": 7, "bbox": [1, 1, 4, 4], "segmentation": square, "iscrowd": 0},
        {"id": 2, "category_id": 3, "bbox": [8, 6, 6, 4], "segmentation": compressed, "iscrowd": 0},
        {"id": 3, "category_id": 3, "bbox": [11, 0, 5, 12], "segmentation": uncompressed_rle(crowd),
         "iscrowd": 1},
    ]
    data = {"images": [{"id": 1, "file_name": "a.png", "width": width, "height": height}],
            "annotations": [{**a, "image_id": 1} for a in anns],
            "categories": [{"id": 3, "name": "road"}, {"id": 7, "name": "car"}]}
    (tmp_path / "ann.json").write_text(json.dumps(data))

    dataset = CocoSegmentation(tmp_path, tmp_path / "ann.json")
    assert [c["name"] for c in dataset.classes] == ["road", "car"]  # labels 1, 2 in category-id order
    _, target = dataset[0]
    expected = np.zeros((height, width), np.int64)
    expected[:, 11:] = 255  # crowd: ignore
    expected[1:5, 1:5] = 2  # polygon, car
    expected[6:10, 8:14] = 1  # RLE, road, over the crowd region
    np.testing.assert_array_equal(target.numpy(), expected)
