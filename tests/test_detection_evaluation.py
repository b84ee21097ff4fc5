"""COCO evaluation: ground truth fed back scores 1.0, no predictions score 0, ids and boxes convert; the
faster-coco-eval backend gives pycocotools' numbers on sets built here."""

import json
import sys

import numpy as np
import pytest
import torch

from detection.evaluation import (
    METRIC_NAMES,
    EvaluationError,
    detections_to_coco,
    evaluate_coco,
    faster_available,
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
    assert "AP50 1.000" in table and "circle  1.000  1.000" in table  # fractions, as training logs them
    assert "100.0" not in table


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


def _random_set(tmp_path, seed, num_images=40):
    """Ground truth with non-contiguous categories, small/medium/large and crowd boxes, empty images; and
    detections: jittered ground truth (some duplicated), false positives, score ties, some images with
    more than 100 detections (the maxDets cut)."""
    rng = np.random.default_rng(seed)
    cats = [{"id": 2, "name": "a"}, {"id": 5, "name": "b"}, {"id": 9, "name": "c"}, {"id": 40, "name": "d"}]
    images, anns, results = [], [], []
    for image_id in range(1, num_images + 1):
        width, height = int(rng.integers(200, 640)), int(rng.integers(200, 480))
        images.append({"id": image_id * 3, "file_name": f"{image_id}.jpg", "width": width, "height": height})
        for _ in range(int(rng.integers(0, 8))):
            side = float(np.exp(rng.uniform(np.log(6), np.log(min(width, height)))))  # all three size ranges
            w, h = side * rng.uniform(0.6, 1.4), side * rng.uniform(0.6, 1.4)
            box = [float(rng.uniform(0, width - w / 2)), float(rng.uniform(0, height - h / 2)), w, h]
            cat = int(rng.choice([c["id"] for c in cats[:3]]))  # "d" never appears: no ground truth
            crowd = int(rng.random() < 0.1)
            anns.append({"id": len(anns) + 1, "image_id": image_id * 3, "category_id": cat, "bbox": box,
                         "area": w * h * 0.8, "iscrowd": crowd})
            for _ in range(int(rng.integers(0, 3))):  # 0, 1 or 2 detections of it (a duplicate is a FP)
                jitter = rng.normal(0, 0.1, 4) * [w, h, w, h]
                score = round(float(rng.uniform(0.3, 1.0)), 2)  # rounded: ties between detections
                results.append({"image_id": image_id * 3, "category_id": cat, "score": score,
                                "bbox": [float(v) for v in np.array(box) + jitter]})
        for _ in range(int(rng.choice([3, 120]))):  # false positives; 120 pass the 100-detection cut
            w, h = float(rng.uniform(4, width / 2)), float(rng.uniform(4, height / 2))
            x, y = float(rng.uniform(0, width - w)), float(rng.uniform(0, height - h))
            results.append({"image_id": image_id * 3, "category_id": int(rng.choice([c["id"] for c in cats])),
                            "bbox": [x, y, w, h], "score": round(float(rng.uniform(0.0, 0.6)), 2)})
    path = tmp_path / f"gt{seed}.json"
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return path, results


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_faster_backend_agrees_with_pycocotools(tmp_path, seed):
    path, results = _random_set(tmp_path, seed)
    reference = evaluate_coco(path, results, backend="pycocotools")
    faster = evaluate_coco(path, results, backend="faster")
    assert sorted(faster) == sorted(reference)
    assert len(reference) == len(METRIC_NAMES) + 2 * 3  # three classes with ground truth
    for name, value in reference.items():
        assert faster[name] == pytest.approx(value, abs=1e-4), name
    assert 0.05 < reference["AP"] < 0.95  # neither trivial nor empty: the comparison means something
    assert evaluate_coco(path, results) == faster  # auto picks the faster one where it is installed


def test_auto_falls_back_to_pycocotools_without_faster_coco_eval(tmp_path, monkeypatch):
    path, results = _random_set(tmp_path, 3, num_images=8)
    monkeypatch.setitem(sys.modules, "faster_coco_eval", None)  # import fails as if not installed
    assert not faster_available()
    assert evaluate_coco(path, results) == evaluate_coco(path, results, backend="pycocotools")
    with pytest.raises(EvaluationError, match="backend 'fast'"):
        evaluate_coco(path, results, backend="fast")


@pytest.mark.parametrize("backend", ["faster", "pycocotools"])
def test_annotation_id_zero_is_found_like_any_other(tmp_path, backend):
    # both evaluators write the matched id and read 0 as "no match": renumbered before they run
    images = [{"id": 1, "file_name": "a.png", "width": 50, "height": 50}]
    anns = [{"id": i, "image_id": 1, "category_id": 1, "bbox": [10 * i, 5, 8, 8], "area": 64, "iscrowd": 0}
            for i in range(2)]
    path = tmp_path / "gt.json"
    cats = [{"id": 1, "name": "x"}]
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    results = [{"image_id": 1, "category_id": 1, "bbox": a["bbox"], "score": 0.9} for a in anns]
    assert evaluate_coco(path, results, backend=backend)["AP"] == pytest.approx(1.0)
