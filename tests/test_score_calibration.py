"""The detection score threshold calibrated on held-out images (issue 26 item 5): the F1-max rule on
ground truth and detections made by hand, written into a trained run's checkpoints, and used by predict,
the Predictor and the demo unless a threshold is given."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from support import detectors

from apps import WEIGHTS_DIR
from apps.cli import main
from apps.demo.models import find_checkpoints
from apps.predict.predictor import Predictor
from apps.predict.results import threshold_hint
from apps.schema import ConfigError
from apps.tasks.detection import calibrate_checkpoint
from apps.tasks.inference.detection import DetectionInference
from detection.score_threshold import LOWEST, RULE, choose_score_threshold
from vision.checkpoint import load_checkpoint, save_checkpoint
from vision.data.images import read_image
from vision.data.synthetic import make_shapes


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


# ---- an existing checkpoint calibrated, and what predict and the demo then use ---------------------------

def test_calibrate_checkpoint_writes_what_the_rule_gives_on_predicts_detections(tmp_path):
    """The shipped shapes detector on a new synthetic split: the threshold written is the rule's answer on
    the detections `Predictor` finds at the lowest candidate threshold, and nothing else in the file
    changes."""
    shapes = make_shapes("detection", tmp_path / "shapes", num_images=6, seed=1, val_fraction=0.5)["val"]
    weights = tmp_path / "det.pt"
    shutil.copyfile(WEIGHTS_DIR / "faster_rcnn_shapes.pt", weights)
    before = load_checkpoint(weights)
    lines: list[str] = []
    found = calibrate_checkpoint(weights, shapes / "images", shapes / "annotations.json", log=lines.append)

    gt = json.loads((shapes / "annotations.json").read_text())
    predictor = Predictor(weights, "cpu", score_thresh=LOWEST)
    results = []
    for image in gt["images"]:
        [result] = predictor.predict([read_image(shapes / "images" / image["file_name"])])
        results += [{**d, "image_id": image["id"]} for d in result.record()["detections"]]
    expected = choose_score_threshold(shapes / "annotations.json", results)
    assert found.threshold == pytest.approx(expected.threshold, abs=1e-5)
    assert (found.precision, found.recall, found.images, found.boxes) == pytest.approx(
        (expected.precision, expected.recall, 3, expected.boxes))
    assert found.threshold > 0.5 and 0 < found.recall <= found.precision  # (a trained model)

    after = load_checkpoint(weights)
    assert after["preprocess"]["score_threshold"] == found.threshold
    assert after["preprocess"]["score_calibration"] == {"rule": RULE, **found.as_dict(),
                                                         "split": str(shapes / "images")}
    rest = {k: v for k, v in after["preprocess"].items() if not k.startswith("score_")}
    assert rest == before["preprocess"]
    assert all(torch.equal(after["state_dict"][k], v) for k, v in before["state_dict"].items())
    assert [k for k in after if k != "preprocess"] == [k for k in before if k != "preprocess"]
    assert lines == [f"score threshold: det.pt keeps detections scoring {found.threshold:.3f} or more "
                     f"(validation, 3 images, {found.boxes} boxes, at IoU 0.5: precision "
                     f"{found.precision:.3f}, recall {found.recall:.3f}, F1 {found.f1:.3f}, the best F1)"]


def test_calibrate_checkpoint_refuses_a_classifier(tmp_path):
    with pytest.raises(ConfigError, match="classification checkpoint"):
        calibrate_checkpoint(WEIGHTS_DIR / "classifier_shapes.pt", tmp_path, tmp_path / "a.json")


def _noise(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (48, 64, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory) -> tuple[Path, Path, float, np.ndarray]:
    """(a tiny detector with no threshold of its own, its copy with one, that threshold, the image): the
    threshold lies between the scores of the random-weight detector's boxes on the image, under 0.5."""
    folder = tmp_path_factory.mktemp("calibrated")
    plain = detectors.tiny_detector_checkpoint(folder / "plain.pt")
    image = _noise(0)
    scores = np.sort(Predictor(plain, "cpu", score_thresh=0.0).predict([image])[0].scores)
    assert len(scores) >= 4 and scores[-1] < 0.5  # (random weights: the case these tests need)
    threshold = float(scores[len(scores) // 2])
    ckpt = load_checkpoint(plain)
    ckpt["preprocess"] = {"score_threshold": threshold, "score_calibration": {"rule": RULE}}
    save_checkpoint(ckpt, folder / "calibrated.pt")
    return plain, folder / "calibrated.pt", threshold, image


def test_predictor_uses_the_checkpoints_threshold_unless_given_one(calibrated):
    plain, weights, threshold, image = calibrated
    everything = Predictor(weights, "cpu", score_thresh=0.0).predict([image])[0].scores
    default = Predictor(weights, "cpu")
    assert default.score_thresh == default.inference.score_thresh == threshold
    [result] = default.predict([image])
    assert sorted(result.scores) == sorted(s for s in everything if s >= threshold)
    assert 0 < len(result.scores) < len(everything)
    given = Predictor(weights, "cpu", score_thresh=0.0)
    assert given.score_thresh == 0.0 and len(given.predict([image])[0].scores) == len(everything)
    # without a threshold of its own: 0.5, as before (these random-weight scores are all under it)
    assert Predictor(plain, "cpu").score_thresh == 0.5
    assert DetectionInference([], {"score_threshold": 0.8}).score_thresh == 0.8
    assert DetectionInference([], {"score_threshold": 0.8}, score_thresh=0.3).score_thresh == 0.3


def test_predict_without_score_threshold_uses_the_checkpoints(calibrated, tmp_path, capsys):
    _, weights, threshold, image = calibrated
    src = tmp_path / "src"
    src.mkdir()
    Image.fromarray(image).save(src / "a.png")
    Image.fromarray(_noise(1)).save(src / "b.png")
    out = tmp_path / "out"
    assert main(["predict", "--weights", str(weights), "--source", str(src), "--output", str(out),
                 "--no-progress", "--workers", "0"]) == 0
    run = json.loads((out / "run.json").read_text())
    summary = json.loads((out / "summary.json").read_text())
    assert run["score_threshold"] == summary["score_threshold"] == threshold
    assert summary["score_threshold_from"] == "the checkpoint (calibrated on its validation split)"
    records = {r["file"]: r for r in map(json.loads, (out / "predictions.jsonl").read_text().splitlines())}
    expected = Predictor(weights, "cpu").predict([image])[0]
    assert len(records["a.png"]["detections"]) == len(expected.scores) > 0
    assert all(d["score"] >= round(threshold, 5) for r in records.values() for d in r["detections"])

    # given on the command line, it wins, and run.json says which
    assert main(["predict", "--weights", str(weights), "--source", str(src), "--output",
                 str(tmp_path / "low"), "--no-progress", "--workers", "0", "--score-threshold", "0.01"]) == 0
    summary = json.loads((tmp_path / "low" / "summary.json").read_text())
    assert summary["score_threshold"] == 0.01 and summary["score_threshold_from"] == "--score-threshold"


def test_the_below_threshold_hint_names_the_checkpoints_threshold(calibrated, tmp_path, capsys):
    plain, _, _, image = calibrated
    best = float(Predictor(plain, "cpu", score_thresh=0.0).predict([image])[0].scores.max())
    ckpt = load_checkpoint(plain)
    ckpt["preprocess"] = {"score_threshold": 0.45}  # above every box (all under 0.5), under the default
    save_checkpoint(ckpt, tmp_path / "high.pt")
    Image.fromarray(image).save(tmp_path / "a.png")
    assert main(["predict", "--weights", str(tmp_path / "high.pt"), "--source", str(tmp_path / "a.png"),
                 "--output", str(tmp_path / "out"), "--no-progress", "--workers", "0"]) == 0
    assert threshold_hint(best, 0.45, "--score-threshold", images=1, where="a.png") in capsys.readouterr().err


def test_the_demo_slider_takes_the_picked_models_threshold(calibrated, tmp_path):
    from apps.demo.handlers import DemoHandlers
    from apps.demo.models import ModelCache

    plain, weights, threshold, _ = calibrated
    found, problems = find_checkpoints([], [weights, plain])
    assert not problems
    by_file = {c.path.name: c for c in found}
    # the slider moves in steps of 0.01: the threshold to two decimals
    assert by_file["calibrated.pt"].score_thresh == round(threshold, 2) != threshold
    assert by_file["plain.pt"].score_thresh == 0.5
    handlers = DemoHandlers(ModelCache(found, "cpu"), max_pixels=10_000_000, max_side=640,
                            files_dir=tmp_path / "files")
    _, _, score, _ = handlers.model_changed(by_file["calibrated.pt"].label)
    assert score["value"] == round(threshold, 2)
    _, _, score, _ = handlers.model_changed(by_file["plain.pt"].label)
    assert score["value"] == 0.5


def test_the_demo_page_opens_with_the_first_models_threshold(calibrated):
    from apps.demo.page import Demo

    _, weights, threshold, _ = calibrated
    demo = Demo.from_weights([], [weights])
    try:
        blocks = demo.build()
        sliders = [b for b in blocks.blocks.values() if getattr(b, "label", None) == "Score threshold"]
        assert [s.value for s in sliders] == [round(threshold, 2)]
    finally:
        demo.close()


@pytest.mark.parametrize("same", [True, False])
def test_a_run_whose_best_is_its_last_detects_once(tmp_path, monkeypatch, same):
    """finish_training calibrates last.pt and best.pt; when they hold the same weights (best.pt written at
    the last evaluation) the validation images are detected once and both files get the same threshold."""
    from types import SimpleNamespace

    from apps.experiment import SplitConfig
    from apps.tasks.detection import DetectionTask

    shapes = make_shapes("detection", tmp_path / "shapes", num_images=6, seed=1, val_fraction=0.5)["val"]
    run = tmp_path / "run"
    run.mkdir()
    shutil.copyfile(WEIGHTS_DIR / "faster_rcnn_shapes.pt", run / "last.pt")
    best = load_checkpoint(run / "last.pt")
    if not same:  # another detector: one weight moved
        key = next(k for k, v in best["state_dict"].items() if v.is_floating_point())
        best["state_dict"][key] = best["state_dict"][key] + 1e-3
    save_checkpoint(best, run / "best.pt")
    task = DetectionTask()
    passes = []
    detect = task.detect
    monkeypatch.setattr(task, "detect", lambda *a, **k: passes.append(1) or detect(*a, **k))
    val = SplitConfig(images=str(shapes / "images"), annotations=str(shapes / "annotations.json"))
    exp = SimpleNamespace(model=SimpleNamespace(arch=best["model"]["arch"]),
                          train=SimpleNamespace(batch_size=1), data=SimpleNamespace(workers=0, val=val))
    task.finish_training(exp, run, torch.device("cpu"), log=lambda line: None)
    assert len(passes) == (1 if same else 2)
    written = [load_checkpoint(run / name)["preprocess"]["score_calibration"]
               for name in ("last.pt", "best.pt")]
    assert (written[0] == written[1]) if same else all(w["rule"] == RULE for w in written)
