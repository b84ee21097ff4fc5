"""The detection score threshold calibrated on held-out images (issue 26 item 5): the F1-max rule on
ground truth and detections made by hand."""

from __future__ import annotations

import json

import pytest

from detection.score_threshold import choose_score_threshold


def _ground_truth(boxes: list[tuple[int, int, list[float], int]]) -> dict:
    """A COCO dict of two 100x100 images; ``boxes``: (image id, category id, xywh, iscrowd)."""
    annotations = [{"id": i, "image_id": image, "category_id": cat, "bbox": box, "area": box[2] * box[3],
                    "iscrowd": crowd} for i, (image, cat, box, crowd) in enumerate(boxes, 1)]
    return {"images": [{"id": i, "file_name": f"{i}.png", "width": 100, "height": 100} for i in (1, 2)],
            "annotations": annotations,
            "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}]}


def _write(tmp_path, data: dict):
    path = tmp_path / "annotations.json"
    path.write_text(json.dumps(data))
    return path


def _det(image: int, cat: int, box: list[float], score: float) -> dict:
    return {"image_id": image, "category_id": cat, "bbox": box, "score": score}


A, B, CROWD = [0, 0, 10, 10], [20, 20, 10, 10], [50, 50, 20, 20]
D, E, ELSEWHERE = [0, 0, 10, 10], [60, 0, 10, 10], [40, 40, 10, 10]


def test_the_threshold_of_best_f1_counts_as_coco_does(tmp_path):
    """Four boxes to find (the crowd region is none). By threshold, right/wrong detections kept and
    F1 = 2TP / (TP + FP + 4): 0.9: 1/0 -> 0.40; 0.8: 1/1 (a dog called a cat) -> 0.33; 0.7 only covers the
    crowd region (neither); 0.6: 2/2 -> 0.50; 0.3: 3/2 -> 0.667; 0.04: 4/2 -> 0.80, but under the floor
    of 0.05. So 0.3, with precision 3/5 and recall 3/4."""
    gt = _write(tmp_path, _ground_truth([(1, 1, A, 0), (1, 1, B, 0), (1, 1, CROWD, 1), (2, 2, D, 0),
                                         (2, 2, E, 0)]))
    results = [_det(1, 1, A, 0.9), _det(2, 1, D, 0.8), _det(1, 1, CROWD, 0.7), _det(1, 1, B, 0.6),
               _det(2, 2, ELSEWHERE, 0.6), _det(2, 2, D, 0.3), _det(2, 2, E, 0.04)]
    found = choose_score_threshold(gt, results)
    assert found.threshold == pytest.approx(0.3)
    assert (found.precision, found.recall, found.f1) == pytest.approx((3 / 5, 3 / 4, 2 / 3))
    assert (found.images, found.boxes) == (2, 4)


def test_equal_scores_are_kept_or_dropped_together(tmp_path):
    """0.9: one right of two boxes, F1 2/3. At 0.5 one right and three wrong come together: F1 4/7 < 2/3.
    Counting the right one of the tie alone would claim F1 1.0 at 0.5, a threshold that cannot keep it
    without the three wrong ones."""
    gt = _write(tmp_path, _ground_truth([(1, 1, A, 0), (1, 1, B, 0)]))
    results = [_det(1, 1, A, 0.9), _det(1, 1, B, 0.5), *(_det(2, 1, [10 * k, 60, 10, 10], 0.5)
                                                         for k in range(3))]
    found = choose_score_threshold(gt, results)
    assert found.threshold == pytest.approx(0.9)
    assert (found.precision, found.recall, found.f1) == pytest.approx((1.0, 0.5, 2 / 3))


def test_nothing_to_choose_from_gives_none(tmp_path):
    gt = _write(tmp_path, _ground_truth([(1, 1, A, 0)]))
    assert choose_score_threshold(gt, []) is None
    assert choose_score_threshold(gt, [_det(2, 1, A, 0.9)]) is None  # nothing right at any threshold
    assert choose_score_threshold(gt, [_det(1, 1, A, 0.04)]) is None  # right only under the floor

