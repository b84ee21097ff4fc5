"""A segmenter's pixel thresholds (issue 26 item 5): one pass counts what any thresholds would paint, the
per-class thresholds of best mIoU are written into a trained run's checkpoints, and predict and evaluate
paint with them."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from apps.cli import main
from apps.config import ConfigError, build_experiment
from apps.engine.trainer import train
from apps.tasks.inference.segmentation import SegmentationInference
from apps.tasks.segmentation import calibrate_checkpoint
from vision.checkpoint import load_checkpoint, save_checkpoint
from vision.data.synthetic import make_shapes
from vision.segmentation import confusion_matrix
from vision.segmentation.threshold import THRESHOLDS, ThresholdSweep, paint

CLASSES = [{"id": 1, "name": "circle"}, {"id": 2, "name": "square"}, {"id": 3, "name": "triangle"}]


def test_the_sweep_counts_what_paint_gives_at_every_threshold():
    g = torch.Generator().manual_seed(0)
    probs = (4 * torch.randn(2, 4, 9, 7, generator=g)).softmax(1)
    # probabilities on a threshold itself: 0.55 is kept at 0.55 and dropped at 0.6
    probs[0, :, 0, 0] = torch.tensor([0.2, 0.55, 0.25, 0.0])
    probs[0, :, 0, 1] = torch.tensor([0.0, 0.0, 0.05, 0.95])
    targets = torch.randint(0, 4, (2, 9, 7), generator=g)
    targets[1, :2] = 255  # ignored
    sweep = ThresholdSweep(4)
    sweep.update(probs, targets)
    for t in THRESHOLDS:
        assert torch.equal(sweep.matrix(t), confusion_matrix(paint(probs, t), targets, 4)), t
    for each in ([0.6, 0.0, 0.95], [0.3, 0.55, 0.05]):  # one threshold per object class
        assert torch.equal(sweep.matrix(each), confusion_matrix(paint(probs, each), targets, 4)), each
    assert paint(probs, 0.55)[0, 0, 0] == 1 and paint(probs, 0.6)[0, 0, 0] == 0
    assert paint(probs, 0.95)[0, 0, 1] == 3
    assert torch.equal(paint(probs), probs.argmax(1))  # threshold 0: the argmax


def test_the_background_is_never_painted_away():
    probs = torch.tensor([0.4, 0.3, 0.3])[:, None, None].expand(3, 2, 2)
    assert not paint(probs, 0.9).any()  # 0.4 sure of background: still background


def test_the_threshold_of_best_miou_is_the_lowest_of_equals():
    """Two object pixels painted at 0.9 (right), two background pixels painted as the object at 0.55
    (wrong), one background pixel as background. Under 0.55 the argmax: IoU object 2/4, background 1/3,
    mIoU 0.417. From 0.6 to 0.9 the wrong ones turn background: both IoU 1. At 0.95 the right ones too."""
    probs = torch.tensor([[0.1, 0.9], [0.1, 0.9], [0.45, 0.55], [0.45, 0.55], [0.8, 0.2]]).T[None, :, None]
    targets = torch.tensor([1, 1, 0, 0, 0])[None, None]
    sweep = ThresholdSweep(2)
    sweep.update(probs, targets)
    found = sweep.choose()
    assert found.thresholds == [0.6] and found.miou == 1.0 and found.pixel_accuracy == 1.0
    assert found.miou_argmax == pytest.approx((2 / 4 + 1 / 3) / 2) and found.pixel_accuracy_argmax == 0.6
    assert found.images == 1


def test_each_class_gets_its_own_threshold():
    """Class 1 is right at 0.9 and wrong at 0.6 (a background pixel); class 2 is right at 0.5 and wrong
    nowhere. One threshold for both could not keep class 2 and drop the wrong class 1: 0.65 and 0 can."""
    pixels = [[0.05, 0.9, 0.05], [0.3, 0.6, 0.1], [0.3, 0.2, 0.5], [0.8, 0.1, 0.1]]
    probs = torch.tensor(pixels).T[None, :, None]
    targets = torch.tensor([1, 0, 2, 0])[None, None]
    sweep = ThresholdSweep(3)
    sweep.update(probs, targets)
    found = sweep.choose()
    assert found.thresholds == [0.65, 0.0] and found.miou == 1.0
    assert found.miou_argmax == pytest.approx((1 / 2 + 1 / 2 + 1) / 3)
    assert torch.equal(paint(probs, found.thresholds), targets)


def test_a_sweep_without_labelled_pixels_refuses_to_choose():
    sweep = ThresholdSweep(3)
    sweep.update(torch.full((1, 3, 2, 2), 1 / 3), torch.full((1, 2, 2), 255))
    with pytest.raises(ValueError, match="no labelled pixel"):
        sweep.choose()


def _logits(probs: list[float], size: tuple[int, int] = (4, 6)) -> torch.Tensor:
    """Logits [K + 1, h, w] giving every pixel the probabilities ``probs``."""
    return torch.tensor(probs).log()[:, None, None].expand(len(probs), *size).clone()


def test_inference_paints_at_the_checkpoints_threshold_and_says_what_it_left_out():
    unsure = _logits([0.3, 0.6, 0.05, 0.05])
    sure = _logits([0.1, 0.05, 0.05, 0.8])
    both = torch.cat([unsure[:, :, :3], sure[:, :, 3:]], dim=2)

    plain = SegmentationInference(CLASSES, {"size": None})  # no calibrated threshold: the argmax
    assert plain.score_thresh == 0.0
    result = plain.result(unsure, (4, 6), (4, 6))
    assert (result.mask == 1).all() and result.quiet_best() is None

    calibrated = SegmentationInference(CLASSES, {"size": None, "class_thresholds": [0.7, 0.0, 0.85]})
    result = calibrated.result(unsure, (4, 6), (4, 6))
    assert not result.mask.any() and result.quiet_best() == pytest.approx(0.6)
    assert calibrated.quiet_threshold == 0.85  # nothing painted: nothing reached even the highest
    result = calibrated.result(both, (4, 6), (8, 12))  # enlarged to the image's size
    assert set(np.unique(result.mask[:, :5])) == {0} and set(np.unique(result.mask[:, 7:])) == {0}
    just_sure = SegmentationInference(CLASSES, {"size": None, "class_thresholds": [0.7, 0.0, 0.8]})
    result = just_sure.result(both, (4, 6), (8, 12))
    assert set(np.unique(result.mask[:, 7:])) == {3} and result.quiet_best() is None  # painted: no hint
    assert just_sure.thresholds_in_use() == {
        "score_threshold": None, "class_thresholds": {"circle": 0.7, "square": 0.0, "triangle": 0.8}}

    given = SegmentationInference(CLASSES, {"size": None, "class_thresholds": [0.7, 0.0, 0.8]},
                                  score_thresh=0.5)
    assert (given.result(unsure, (4, 6), (4, 6)).mask == 1).all()  # the caller's threshold, for every class
    assert given.thresholds_in_use() == {"score_threshold": 0.5}
    with pytest.raises(ValueError, match="expected 3 values"):
        SegmentationInference(CLASSES, {"size": None, "class_thresholds": [0.5]})


# ---- a trained run -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("pixel")
    shapes = make_shapes("segmentation", root / "data", num_images=6, seed=0, image_size=(40, 56),
                         val_fraction=0.34)
    split = lambda name: {"images": str(shapes[name] / "images"),  # noqa: E731
                          "annotations": str(shapes[name] / "annotations.json")}
    result = train(build_experiment({
        "task": "segmentation", "model": {"arch": "fcn_resnet18", "output_stride": 16},
        "data": {"train": split("train"), "val": split("val"), "workers": 0,
                 "options": {"crop_size": 32, "scale": [0.8, 1.2]}},
        "train": {"epochs": 1, "batch_size": 2, "lr": 0.01, "log_every": 1},
        "output_dir": str(root / "run"), "device": "cpu"}))
    return shapes, result.run_dir


def test_training_writes_the_threshold_evaluate_scores_with(trained, tmp_path, capsys):
    shapes, run = trained
    val = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()
           if json.loads(line)["kind"] == "val"][-1]
    preprocess = load_checkpoint(run / "best.pt")["preprocess"]
    calibration = preprocess["score_calibration"]
    assert len(preprocess["class_thresholds"]) == 3 and set(preprocess["class_thresholds"]) <= set(THRESHOLDS)
    assert calibration["thresholds"] == preprocess["class_thresholds"]
    assert calibration["images"] == 2 and calibration["split"] == str(shapes["val"] / "images")
    # the argmax's mIoU is the run's own validation figure, and the chosen one is no worse
    assert calibration["miou_argmax"] == pytest.approx(val["mIoU"]) and calibration["miou"] >= val["mIoU"]
    last = load_checkpoint(run / "last.pt")["preprocess"]
    assert last["class_thresholds"] == preprocess["class_thresholds"]

    out = tmp_path / "eval.json"
    assert main(["evaluate", "--weights", str(run / "best.pt"), "--images", str(shapes["val"] / "images"),
                 "--annotations", str(shapes["val"] / "annotations.json"), "--device", "cpu",
                 "--workers", "0", "--out", str(out)]) == 0
    metrics = json.loads(out.read_text())["metrics"]
    assert metrics["mIoU"] == pytest.approx(calibration["miou"])  # the masks predict paints
    used = [metrics.get(f"threshold/{name}", 0.0) for name in ("circle", "square", "triangle")]
    assert used == preprocess["class_thresholds"]


def test_calibrate_checkpoint_gives_an_existing_file_the_same_threshold(trained, tmp_path):
    shapes, run = trained
    copy = tmp_path / "copy.pt"
    copy.write_bytes((run / "best.pt").read_bytes())
    found = calibrate_checkpoint(copy, shapes["val"] / "images",
                                 annotations=shapes["val"] / "annotations.json", log=lambda line: None)
    assert found.as_dict() == {k: v for k, v in load_checkpoint(run / "best.pt")["preprocess"]
                               ["score_calibration"].items() if k not in ("rule", "split")}
    with pytest.raises(ConfigError, match="a detector's"):
        from apps.tasks.detection import calibrate_checkpoint as detection_calibrate

        detection_calibrate(copy, shapes["val"] / "images", shapes["val"] / "annotations.json")


def _circle_everywhere(run, tmp_path, class_thresholds=None):
    """The trained checkpoint with a head saying circle everywhere, e^2 / (e^2 + 3) = 0.711 sure."""
    ckpt = load_checkpoint(run / "best.pt")
    ckpt["state_dict"]["head.classifier.weight"].zero_()
    ckpt["state_dict"]["head.classifier.bias"].copy_(torch.tensor([0.0, 2.0, 0.0, 0.0]))
    ckpt["preprocess"] = {"size": None}
    if class_thresholds:
        ckpt["preprocess"]["class_thresholds"] = class_thresholds
    save_checkpoint(ckpt, weights := tmp_path / "circle.pt")
    return weights


def test_predict_paints_at_the_threshold_and_says_when_nothing_reached_it(trained, tmp_path, capsys):
    weights = _circle_everywhere(trained[1], tmp_path)
    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(np.full((40, 56, 3), 127, np.uint8)).save(images / "grey.png")
    for threshold, painted in (("0.7", True), ("0.75", False)):
        out = tmp_path / threshold
        assert main(["predict", "--weights", str(weights), "--source", str(images), "--output", str(out),
                     "--score-threshold", threshold, "--device", "cpu", "--workers", "0"]) == 0
        summary = json.loads((out / "summary.json").read_text())
        assert summary["score_threshold"] == float(threshold)
        assert summary["score_threshold_from"] == "--score-threshold"
        mask = np.asarray(Image.open(out / "masks" / "grey.png"))
        assert (mask == 1).all() if painted else not mask.any()
        said = capsys.readouterr().err
        assert ("1 image(s) had no object pixel scoring 0.75 or more, but some scoring less (highest 0.71, "
                "in grey.png): lower --score-threshold" in said) is not painted


def test_the_demo_says_what_the_calibrated_thresholds_left_out(trained, tmp_path):
    from apps.demo.handlers import DemoHandlers
    from apps.demo.models import ModelCache, find_checkpoints

    found, problems = find_checkpoints([], [_circle_everywhere(trained[1], tmp_path, [0.75, 0.0, 0.0])])
    assert not problems
    handlers = DemoHandlers(ModelCache(found, "cpu"), max_pixels=10_000_000, max_side=640,
                            files_dir=tmp_path / "files")
    Image.fromarray(np.full((40, 56, 3), 127, np.uint8)).save(grey := tmp_path / "grey.png")
    _, rows, info = handlers.segment(str(grey), found[0].label)
    assert rows == [] and "as sure as each class's threshold" in info
    assert "no object pixel scoring 0.75 or more, but some scoring less (highest 0.71)" in info


def test_the_shipped_segmenter_barely_paints_a_lion():
    """weights/deeplabv3plus_real.pt knows none of the lion photograph's content: its argmax paints about 5%
    of it (coin, cat_face), its calibrated thresholds (weights/README.md) under 1%."""
    from apps import WEIGHTS_DIR
    from apps.demo.page import REAL_EXAMPLES_DIR
    from apps.predict.predictor import Predictor
    from vision.data.images import read_image

    lion = read_image(REAL_EXAMPLES_DIR / "photo_lion.jpg")
    painted = lambda threshold: Predictor(WEIGHTS_DIR / "deeplabv3plus_real.pt", "cpu",  # noqa: E731
                                          score_thresh=threshold).predict([lion])[0].mask.astype(bool).mean()
    assert painted(None) < 0.01 < 0.04 < painted(0.0)
