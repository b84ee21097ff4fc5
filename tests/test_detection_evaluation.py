"""COCO evaluation: ground truth fed back scores 1.0, no predictions score 0, ids and boxes convert."""

import json

import pytest
import torch

from detection.evaluation import (
    METRIC_NAMES,
    EvaluationError,
    detections_to_coco,
    evaluate_coco,
    format_table,
    load_results,
)
from detection.structures import Detections

# non-contiguous category ids on purpose: label 1 is id 3, label 2 is id 7
CLASSES = [{"id": 3, "name": "circle"}, {"id": 7, "name": "square"}]
BOXES = {  # image id -> [(category id, xywh)]
    10: [(3, [10, 20, 30, 40]), (7, [50, 50, 20, 10])],
    11: [(7, [0, 0, 64, 32])],
    12: [],  # an image without objects
}


@pytest.fixture
def gt_file(tmp_path):
    images = [{"id": i, "file_name": f"{i}.png", "width": 100, "height": 80} for i in BOXES]
    anns, next_id = [], 1
    for image_id, objects in BOXES.items():
        for cat, (x, y, w, h) in objects:
            anns.append({"id": next_id, "image_id": image_id, "category_id": cat, "bbox": [x, y, w, h],
                         "area": w * h, "iscrowd": 0})  # fmt: skip
            next_id += 1
    path = tmp_path / "gt.json"  # no "info" or "licenses": other tools often leave them out
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": CLASSES}))
    return path


def _gt_as_detections(image_id):
    label_of = {c["id"]: i + 1 for i, c in enumerate(CLASSES)}
    objects = BOXES[image_id]
    boxes = torch.tensor([[x, y, x + w, y + h] for _, (x, y, w, h) in objects], dtype=torch.float32)
    return Detections(
        boxes.reshape(-1, 4),
        torch.full((len(objects),), 0.9),
        torch.tensor([label_of[c] for c, _ in objects]),
    )


def test_detections_to_coco_by_hand():
    det = Detections(torch.tensor([[10.0, 20.0, 40.0, 60.0]]), torch.tensor([0.5]), torch.tensor([2]))
    (result,) = detections_to_coco(11, det, CLASSES)
    assert result == {"image_id": 11, "category_id": 7, "bbox": [10.0, 20.0, 30.0, 40.0], "score": 0.5}
    with pytest.raises(EvaluationError, match="outside 1..2"):
        detections_to_coco(11, Detections(det.boxes, det.scores, torch.tensor([3])), CLASSES)


def test_ground_truth_as_predictions_scores_one(gt_file):
    results = [
        r for image_id in BOXES for r in detections_to_coco(image_id, _gt_as_detections(image_id), CLASSES)
    ]
    metrics = evaluate_coco(gt_file, results, classes=CLASSES)
    assert metrics["AP"] == pytest.approx(1.0) and metrics["AP50"] == pytest.approx(1.0)
    assert metrics["AP/circle"] == pytest.approx(1.0) and metrics["AP50/square"] == pytest.approx(1.0)
    table = format_table(metrics, CLASSES)
    assert "circle" in table and "100.0" in table


def test_empty_predictions_give_zeros(gt_file):
    metrics = evaluate_coco(gt_file, [], classes=CLASSES)
    assert all(metrics[name] == 0.0 for name in METRIC_NAMES)
    assert metrics["AP/circle"] == 0.0 and metrics["AP/square"] == 0.0


def test_false_positive_on_an_image_without_objects_counts(gt_file):
    results = [
        r for image_id in BOXES for r in detections_to_coco(image_id, _gt_as_detections(image_id), CLASSES)
    ]
    # a confident circle on image 12 (no objects): ranked first, so circle precision at every recall is 1/2
    results.append({"image_id": 12, "category_id": 3, "bbox": [0, 0, 50, 50], "score": 0.99})
    metrics = evaluate_coco(gt_file, results, classes=CLASSES)
    assert metrics["AP50/circle"] == pytest.approx(0.5, abs=0.01)
    assert metrics["AP50/square"] == pytest.approx(1.0)


def test_wrong_ids_are_explained(gt_file, tmp_path):
    with pytest.raises(EvaluationError, match=r"category ids \[2\].*labels written instead"):
        evaluate_coco(gt_file, [{"image_id": 10, "category_id": 2, "bbox": [0, 0, 1, 1], "score": 1.0}])
    with pytest.raises(EvaluationError, match=r"images not in the ground truth: \[99\]"):
        evaluate_coco(gt_file, [{"image_id": 99, "category_id": 3, "bbox": [0, 0, 1, 1], "score": 1.0}])
    bad = tmp_path / "preds.json"
    bad.write_text("{not json")
    with pytest.raises(EvaluationError, match="preds.json: cannot read"):
        load_results(bad)
