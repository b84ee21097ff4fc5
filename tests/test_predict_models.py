"""Predictor on hand-made models whose answers are known exactly, for all three tasks.

The models here follow the model contract of docs/ARCHITECTURE.md; other predict tests import them.
"""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from apps.predict.predictor import ClassificationResult, DetectionResult, Predictor, SegmentationResult
from apps.tasks import LoadedModel, get_task
from detection.structures import Detections, Thresholds

COLORS = [{"id": 11, "name": "red"}, {"id": 12, "name": "green"}, {"id": 13, "name": "blue"}]


class ColorClassifier(nn.Module):
    """logits [N, 3] = 10 x mean of each RGB channel: a red image is "red"."""

    def forward(self, images, targets=None):
        return 10.0 * images.mean(dim=(2, 3)), {}


class ColorSegmenter(nn.Module):
    """logits [N, 4, H, W]: background 0.6 everywhere, class k+1 = channel k; pure colours win."""

    def forward(self, images, targets=None):
        background = torch.full_like(images[:, :1], 0.6)
        return torch.cat([background, images], dim=1), {}


class RedBoxDetector(nn.Module):
    """One box around the red pixels (score 0.9, label 1), a fixed green box (0.3, label 2) and a faint
    one (0.04, label 3) that only survives when the call's score_thresh is below the configured 0.05."""

    thresholds = Thresholds(score_thresh=0.05, nms_thresh=0.5)  # the configured ones, as detectors have

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, images, targets=None, thresholds=None):
        thresholds = thresholds or self.thresholds
        self.calls.append(thresholds)
        out = []
        for image in images:
            red = (image[0] > 0.8) & (image[1] < 0.2) & (image[2] < 0.2)
            ys, xs = torch.nonzero(red, as_tuple=True)
            boxes, scores, labels = [[0.0, 0.0, 4.0, 4.0], [1.0, 1.0, 3.0, 3.0]], [0.3, 0.04], [2, 3]
            if len(xs):
                box = [xs.min().item(), ys.min().item(), xs.max().item() + 1.0, ys.max().item() + 1.0]
                boxes.insert(0, box)
                scores.insert(0, 0.9)
                labels.insert(0, 1)
            det = Detections(torch.tensor(boxes), torch.tensor(scores), torch.tensor(labels))
            out.append(det.filter(det.scores > thresholds.score_thresh))
        return out, {}


def loaded(task: str, model: nn.Module, preprocess: dict | None = None) -> LoadedModel:
    return LoadedModel(get_task(task), model.eval(), list(COLORS), preprocess or {}, {}, Path("m.pt"))


def red_square(h=40, w=60, box=(10, 5, 30, 25)) -> np.ndarray:
    """Grey image with a red rectangle at x0, y0, x1, y1 (exclusive)."""
    image = np.full((h, w, 3), 128, dtype=np.uint8)
    x0, y0, x1, y1 = box
    image[y0:y1, x0:x1] = (255, 0, 0)
    return image


def test_detection_boxes_in_original_pixels_with_ids_and_names():
    predictor = Predictor(loaded("detection", RedBoxDetector()), "cpu", score_thresh=0.5)
    [result] = predictor.predict([red_square()])
    assert isinstance(result, DetectionResult)
    np.testing.assert_allclose(result.boxes, [[10, 5, 30, 25]])
    assert result.category_ids == [11] and result.names == ["red"] and result.image_size == (40, 60)
    record = result.record()
    assert record == {"detections": [{"bbox": [10.0, 5.0, 20.0, 20.0], "score": 0.9, "category_id": 11,
                                      "name": "red"}]}
    # thresholds go to the model with the call; its configured ones are never changed
    assert predictor.model.calls[-1] == Thresholds(score_thresh=0.05, nms_thresh=0.5)
    assert RedBoxDetector.thresholds == Thresholds(score_thresh=0.05, nms_thresh=0.5)


def test_detection_threshold_below_model_cut_and_class_filter():
    low = Predictor(loaded("detection", RedBoxDetector()), "cpu", score_thresh=0.01, nms_thresh=0.3)
    [result] = low.predict([red_square()])
    assert result.names == ["red", "green", "blue"]  # 0.04 box found: the model's 0.05 cut was lowered
    assert low.model.calls[-1] == Thresholds(score_thresh=0.01, nms_thresh=0.3)
    only = Predictor(loaded("detection", RedBoxDetector()), "cpu", score_thresh=0.01,
                     classes=["green", 13])
    [result] = only.predict([red_square()])
    assert result.category_ids == [12, 13]
    with pytest.raises(ValueError, match="not one of the checkpoint's classes"):
        Predictor(loaded("detection", RedBoxDetector()), "cpu", classes=["purple"])


def test_detection_nms_override_without_model_support():
    class NoThresholds(nn.Module):  # like an exported file: its cuts are fixed, NMS is applied after it
        def forward(self, images, targets=None):
            boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [1.0, 0.0, 11.0, 10.0], [0.0, 0.0, 10.0, 10.0]])
            det = Detections(boxes, torch.tensor([0.9, 0.8, 0.7]), torch.tensor([1, 1, 2]))
            return [det for _ in images], {}

    model = NoThresholds()
    # IoU of the first two boxes: 90 / 110 = 0.818
    [loose] = Predictor(loaded("detection", model), "cpu", nms_thresh=0.9).predict([red_square()])
    [tight] = Predictor(loaded("detection", model), "cpu", nms_thresh=0.8).predict([red_square()])
    np.testing.assert_allclose(loose.scores, [0.9, 0.8, 0.7])
    np.testing.assert_allclose(tight.scores, [0.9, 0.7])  # same-class overlap removed, other class kept


def test_classification_top_k_and_filter():
    image = np.zeros((8, 8, 3), dtype=np.uint8)
    image[..., 0], image[..., 1] = 255, 51  # mean red 1.0, green 0.2, blue 0
    predictor = Predictor(loaded("classification", ColorClassifier(), {"size": 8}), "cpu", top_k=2)
    [result] = predictor.predict([image])
    assert isinstance(result, ClassificationResult)
    expected = torch.tensor([10.0, 2.0, 0.0]).softmax(0)
    assert result.names == ["red", "green"] and result.category_ids == [11, 12]
    np.testing.assert_allclose(result.scores, expected[:2].numpy(), rtol=1e-5)
    assert result.image_size == (8, 8)
    [only] = Predictor(loaded("classification", ColorClassifier(), {"size": 8}), "cpu",
                       classes=["blue", "green"]).predict([image])
    assert only.names == ["green", "blue"]
    np.testing.assert_allclose(only.scores, expected[[1, 2]].numpy(), rtol=1e-5)


def test_segmentation_mask_at_original_size_through_resize_and_padding():
    # 30 x 60 image, model size 20: resized to 10 x 20 and padded to 20 x 20; the mask comes back 30 x 60.
    image = np.full((30, 60, 3), 128, dtype=np.uint8)
    image[:, :30] = (255, 0, 0)
    image[:, 42:] = (0, 0, 255)
    predictor = Predictor(loaded("segmentation", ColorSegmenter(), {"size": 20}), "cpu")
    [result] = predictor.predict([image])
    assert isinstance(result, SegmentationResult)
    assert result.mask.shape == (30, 60) and result.mask.dtype == np.uint8
    assert (result.mask[:, :27] == 1).all() and (result.mask[:, 33:39] == 0).all()
    assert (result.mask[:, 45:] == 3).all()
    counts = {c["name"]: c["pixels"] for c in result.record()["classes"]}
    assert set(counts) == {"red", "blue"} and 27 * 30 <= counts["red"] <= 33 * 30
    [no_red] = Predictor(loaded("segmentation", ColorSegmenter(), {"size": 20}), "cpu",
                         classes=["blue"]).predict([image])
    assert (no_red.mask[:, :27] == 0).all() and (no_red.mask[:, 45:] == 3).all()


def test_segmentation_native_size_batches_of_mixed_shapes():
    predictor = Predictor(loaded("segmentation", ColorSegmenter()), "cpu")
    a, b = red_square(20, 30), red_square(16, 16, box=(0, 0, 16, 16))
    ra, rb = predictor.predict([a, b])
    assert ra.mask.shape == (20, 30) and (rb.mask == 1).all()
    assert ra.mask[10, 15] == 1 and ra.mask[0, 0] == 0


def test_predict_rejects_non_images_and_draws():
    predictor = Predictor(loaded("detection", RedBoxDetector()), "cpu")
    with pytest.raises(ValueError, match=r"image 0: expected an \(H, W, 3\) uint8"):
        predictor.predict([np.zeros((4, 4), dtype=np.float32)])
    assert predictor.predict([]) == []
    image = red_square()
    [result] = predictor.predict([image])
    drawn = result.draw(image)
    assert drawn.shape == image.shape and not np.array_equal(drawn, image)


def test_predict_source_streams_files_and_reports_bad_ones(tmp_path):
    folder = tmp_path / "in"
    (folder / "sub").mkdir(parents=True)
    Image.fromarray(red_square()).save(folder / "a.png")
    Image.fromarray(red_square(box=(0, 0, 8, 8))).save(folder / "sub" / "b.png")
    (folder / "sub" / "c.jpg").write_bytes(b"")
    predictor = Predictor(loaded("detection", RedBoxDetector()), "cpu")
    for workers in (0, 2):
        items = list(predictor.predict_source(folder, batch_size=2, workers=workers, keep_images=True))
        assert [it.file.name for it in items] == ["a.png", "sub/b.png", "sub/c.jpg"]
        np.testing.assert_allclose(items[0].result.boxes, [[10, 5, 30, 25]])
        np.testing.assert_allclose(items[1].result.boxes, [[0, 0, 8, 8]])
        assert items[1].image.shape == (40, 60, 3)
        assert items[2].result is None and "empty" in items[2].error


def test_segmentation_of_huge_images_enlarges_the_index_map(monkeypatch):
    import apps.tasks.inference.segmentation

    image = np.full((30, 60, 3), 128, dtype=np.uint8)
    image[:, :30] = (255, 0, 0)
    predictor = Predictor(loaded("segmentation", ColorSegmenter(), {"size": 20}), "cpu")
    [smooth] = predictor.predict([image])
    monkeypatch.setattr(apps.tasks.inference.segmentation, "MAX_UPSAMPLED_LOGITS", 0)  # as if 100 megapixels
    [blocky] = predictor.predict([image])
    assert blocky.mask.shape == (30, 60)
    # nearest enlargement of the 10 x 20 map: columns come in blocks of 3, the red half stays red
    assert (blocky.mask[:, :30] == 1).all() and (blocky.mask[:, 30:] == 0).all()
    assert (smooth.mask != blocky.mask).sum() <= 2 * 30


def test_predictors_sharing_one_detector_keep_their_own_thresholds_when_run_at_once():
    # What lets the demo drop its per-model lock: thresholds are arguments of each call, so two requests
    # with different cuts on one loaded detector, in two threads, get exactly what each gets alone.
    from concurrent.futures import ThreadPoolExecutor

    from apps import WEIGHTS_DIR
    from apps.tasks import load_model

    loaded = load_model(WEIGHTS_DIR / "faster_rcnn_shapes.pt")
    scenes = sorted(WEIGHTS_DIR.glob("examples/scene_*.png"))
    images = [np.array(Image.open(p).convert("RGB")) for p in scenes]
    cuts = [dict(score_thresh=0.05, nms_thresh=0.9), dict(score_thresh=0.6, nms_thresh=0.2)]
    predictors = [Predictor(loaded, "cpu", **cut) for cut in cuts]

    def answers(i: int) -> list:
        return [(r.boxes.tolist(), r.scores.tolist()) for r in predictors[i].predict(images)]

    alone = [answers(0), answers(1)]
    assert [len(r[0]) for r in alone[0]] != [len(r[0]) for r in alone[1]]  # the cuts do differ

    def run(i: int) -> list:
        return [answers(i) for _ in range(3)]

    with ThreadPoolExecutor(2) as pool:
        together = list(pool.map(run, [0, 1]))
    for i in (0, 1):
        assert all(rounds == alone[i] for rounds in together[i])
    assert loaded.model.thresholds == Thresholds(0.05, 0.5, 50)  # the configured cuts, never rewritten
