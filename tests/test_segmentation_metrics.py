"""Confusion-matrix metrics: by hand, ignore pixels, absent classes, scikit-learn, two processes."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from sklearn.metrics import confusion_matrix as sk_confusion_matrix
from sklearn.metrics import jaccard_score

from vision.segmentation.metrics import SegmentationMetric, confusion_matrix, metrics_from_confusion

# Two 2x3 images; the 255 pixel (predicted 0) must not count anywhere.
TARGETS = torch.tensor([[[0, 0, 1], [1, 2, 255]]])
PREDS = torch.tensor([[[0, 1, 1], [1, 2, 0]]])


def test_confusion_matrix_by_hand_with_ignore():
    # (target, pred) pairs of the valid pixels: (0,0) (0,1) (1,1) (1,1) (2,2)
    expected = torch.tensor([[1, 1, 0], [0, 2, 0], [0, 0, 1]])
    assert torch.equal(confusion_matrix(PREDS, TARGETS, num_classes=3), expected)


def test_metrics_by_hand():
    m = metrics_from_confusion(torch.tensor([[1, 1, 0], [0, 2, 0], [0, 0, 1]]))
    # IoU: class 0 = 1 / (2 + 1 - 1), class 1 = 2 / (2 + 3 - 2), class 2 = 1 / 1
    assert m["per_class_iou"] == pytest.approx([1 / 2, 2 / 3, 1.0])
    assert m["miou"] == pytest.approx((1 / 2 + 2 / 3 + 1) / 3)
    assert m["pixel_accuracy"] == pytest.approx(4 / 5)
    assert m["mean_accuracy"] == pytest.approx((1 / 2 + 1 + 1) / 3)
    # fw-IoU: ground-truth frequencies 2/5, 2/5, 1/5
    assert m["fw_iou"] == pytest.approx(2 / 5 * 1 / 2 + 2 / 5 * 2 / 3 + 1 / 5 * 1)


def test_absent_class_is_nan_and_left_out_but_false_positive_class_counts_as_zero():
    # Class 3 never appears (NaN, left out of the mean); class 2 is only predicted (IoU 0, in the mean).
    targets = torch.tensor([[0, 0, 1, 1]])
    preds = torch.tensor([[0, 2, 1, 1]])
    m = metrics_from_confusion(confusion_matrix(preds, targets, num_classes=4))
    assert m["per_class_iou"][:3] == pytest.approx([1 / 2, 1.0, 0.0])
    assert math.isnan(m["per_class_iou"][3])
    assert m["miou"] == pytest.approx((1 / 2 + 1 + 0) / 3)
    assert m["fw_iou"] == pytest.approx(2 / 4 * 1 / 2 + 2 / 4 * 1)
    assert math.isnan(m["per_class_accuracy"][2])  # no ground truth: accuracy undefined


def test_matches_scikit_learn_on_random_maps():
    gen = torch.Generator().manual_seed(0)
    targets = torch.randint(0, 5, (3, 17, 13), generator=gen)
    targets[torch.rand(targets.shape, generator=gen) < 0.1] = 255
    preds = torch.where(torch.rand(targets.shape, generator=gen) < 0.6, targets.clamp(max=4),
                        torch.randint(0, 5, targets.shape, generator=gen))
    metric = SegmentationMetric(num_classes=5)
    metric.update(preds, targets)
    valid = targets != 255
    t, p = targets[valid].numpy(), preds[valid].numpy()
    assert metric.matrix.numpy().tolist() == sk_confusion_matrix(t, p, labels=range(5)).tolist()
    m = metric.compute()
    assert m["per_class_iou"] == pytest.approx(jaccard_score(t, p, labels=range(5), average=None).tolist())
    assert m["pixel_accuracy"] == pytest.approx((t == p).mean())


def test_accumulates_batches_and_accepts_logits():
    metric = SegmentationMetric(num_classes=3)
    logits = torch.nn.functional.one_hot(PREDS, 3).permute(0, 3, 1, 2).float()  # argmax gives PREDS
    metric.update(logits, TARGETS)
    metric.update(PREDS, TARGETS)
    assert torch.equal(metric.matrix, 2 * confusion_matrix(PREDS, TARGETS, 3))
    assert metric.compute()["miou"] == pytest.approx((1 / 2 + 2 / 3 + 1) / 3)
    metric.reset()
    assert metric.matrix.sum() == 0


def test_bad_labels_are_clear_errors():
    with pytest.raises(ValueError, match=r"target values must be in 0\.\.2 or 255"):
        confusion_matrix(torch.zeros(1, 2, dtype=torch.long), torch.tensor([[0, 3]]), num_classes=3)
    with pytest.raises(ValueError, match="differ in shape"):
        confusion_matrix(torch.zeros(1, 3, dtype=torch.long), torch.zeros(1, 2, dtype=torch.long), 3)


def _rank_main(rank: int, init_file: str, results) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        metric = SegmentationMetric(num_classes=3)
        # Rank 0 sees the first row of the example, rank 1 the second; together they make the whole image.
        metric.update(PREDS[:, rank], TARGETS[:, rank])
        first = metric.compute()
        second = metric.compute()  # computing twice must not sum twice
        results[rank] = (first["miou"], second["miou"], metric.matrix.sum().item())
    finally:
        dist.destroy_process_group()


def test_reduces_across_two_processes(tmp_path):
    results = mp.Manager().dict()
    mp.spawn(_rank_main, args=(str(tmp_path / "init"), results), nprocs=2, join=True)
    expected = (1 / 2 + 2 / 3 + 1) / 3
    for rank in (0, 1):
        first, second, own_pixels = results[rank]
        assert first == pytest.approx(expected) and second == pytest.approx(expected)
    assert results[0][2] == 3 and results[1][2] == 2  # each rank keeps only its own counts
