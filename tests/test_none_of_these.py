"""A classifier's calibrated "none of these": the threshold chosen on held-out images of the none class, its
place in the checkpoint, and the answer predict and the demo give under it (the below-threshold line)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from test_train_classification import write_folder

from apps.cli import main
from apps.predict.predictor import Predictor
from apps.predict.results import threshold_hint
from apps.tasks.classification import choose_none_threshold
from apps.tasks.inference.classification import NONE_OF_THESE, ClassificationInference
from vision.checkpoint import load_checkpoint, save_checkpoint

CLASSES = [{"id": 0, "name": "background"}, {"id": 1, "name": "cat"}, {"id": 2, "name": "cup"}]


def test_threshold_lets_through_at_most_the_asked_share_of_none_images():
    # ten none images (label 0): four named "cat" with these top probabilities, six answered background
    none = [[0.1, 0.9, 0.0], [0.2, 0.7, 0.1], [0.3, 0.6, 0.1], [0.4, 0.5, 0.1]] + [[0.8, 0.1, 0.1]] * 6
    known = [[0.05, 0.95, 0.0], [0.1, 0.0, 0.9], [0.3, 0.65, 0.05], [0.2, 0.2, 0.6]]
    probs = torch.tensor(none + known)
    labels = torch.tensor([0] * 10 + [1, 2, 1, 1])
    # 20% of ten: two may keep a label; the third highest (0.6) must not, so the cut is just above 0.6
    out = choose_none_threshold(probs, labels, 0, 0.2)
    assert 0.6 < out["threshold"] <= 0.6 + 1e-6
    assert out["false_accept"] == pytest.approx(0.2)
    # known: 0.95 cat (right), 0.9 cup (right), 0.65 cat (right), 0.6 cup (wrong, and under the cut)
    assert out["known_kept"] == pytest.approx(0.75) and out["known_right"] == pytest.approx(0.75)
    assert (out["none_images"], out["known_images"]) == (10, 4)
    # nothing allowed: above the highest none score; everything allowed: no threshold at all
    assert choose_none_threshold(probs, labels, 0, 0.0)["threshold"] > 0.9
    assert choose_none_threshold(probs, labels, 0, 0.5)["threshold"] == 0.0


def _result(logits: list[float], preprocess: dict):
    inference = ClassificationInference(CLASSES, {"size": 32, **preprocess}, top_k=3)
    return inference.result(torch.tensor(logits), (32, 32), (32, 32))


def test_inference_answers_none_under_the_threshold_or_for_the_none_class():
    cut = {"none_class": "background", "reject_below": 0.6}
    sure = _result([0.0, 3.0, 0.0], cut)  # cat at 0.91
    unsure = _result([0.0, 0.8, 0.6], cut)  # cat at 0.43
    background = _result([3.0, 0.0, 0.0], cut)
    assert not sure.none_of_these and sure.record()["none_of_these"] is False
    assert unsure.none_of_these and unsure.quiet_best() == pytest.approx(float(unsure.scores[0]))
    assert unsure.names[0] == "cat"  # the ranking itself is kept (predictions.jsonl has it)
    assert background.none_of_these and background.quiet_best() is None  # nothing fell under a threshold
    assert ClassificationInference.result_type.counted(unsure.record()) == [NONE_OF_THESE]
    # checkpoints without the entries (every earlier classifier) answer as before
    plain = _result([0.0, 0.8, 0.6], {})
    assert not plain.none_of_these and "none_of_these" not in plain.record()
    assert ClassificationInference.result_type.counted(plain.record()) == ["cat"]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A tiny classifier trained with a background class: its checkpoints get the calibrated threshold."""
    root = tmp_path_factory.mktemp("none")
    write_folder(root / "train", per_class=4, seed=0)
    write_folder(root / "val", per_class=3, seed=1)
    for split, count in (("train", 4), ("val", 3)):
        (root / split / "background").mkdir()
        for i in range(count):
            noise = np.random.default_rng([i, split == "val"]).integers(0, 256, (32, 32, 3), dtype=np.uint8)
            Image.fromarray(noise).save(root / split / "background" / f"{i}.png")
    config = {
        "base": str(Path(__file__).resolve().parents[1] / "configs" / "base" / "classification.yaml"),
        "data": {"train": {"root": str(root / "train")}, "val": {"root": str(root / "val")}, "workers": 0,
                 "options": {"size": 32, "none_class": "background", "false_accept": 0.34}},
        "train": {"epochs": 1, "batch_size": 8, "lr": 0.05, "log_every": 1},
        "device": "cpu",
    }
    (root / "exp.yaml").write_text(yaml.safe_dump(config))
    assert main(["train", str(root / "exp.yaml"), f"output_dir={root / 'run'}", "seed=1"]) == 0
    return root


def test_training_writes_the_calibrated_threshold(run):
    for name in ("best.pt", "last.pt"):
        pre = load_checkpoint(run / "run" / name)["preprocess"]
        assert pre["none_class"] == "background" and 0.0 <= pre["reject_below"] <= 1.0 + 1e-6
        calibration = pre["calibration"]
        assert calibration["none_images"] == 3 and calibration["known_images"] == 9
        assert calibration["false_accept"] <= 0.34 and calibration["split"] == str(run / "val")
    assert "none of these: best.pt answers under top probability" in (run / "run" / "train.log").read_text()


def test_predict_and_demo_say_none_of_these_with_the_line(run, tmp_path, capsys):
    ckpt = load_checkpoint(run / "run" / "best.pt")
    ckpt["preprocess"]["reject_below"] = 1.01  # above any probability: every answer falls under it
    weights = save_checkpoint(ckpt, tmp_path / "strict.pt")
    src = tmp_path / "src"
    src.mkdir()
    image = np.asarray(Image.open(run / "val" / "red" / "0.png").convert("RGB"))
    Image.fromarray(image).save(src / "a.png")
    [result] = Predictor(weights, "cpu", top_k=3).predict([image])
    assert result.none_of_these and result.quiet_best() == pytest.approx(float(result.scores[0]))

    out = tmp_path / "out"
    code = main(["predict", "--weights", str(weights), "--source", str(src), "--output", str(out),
                 "--no-progress"])
    assert code == 0
    record = json.loads((out / "predictions.jsonl").read_text().splitlines()[0])
    assert record["none_of_these"] is True
    summary = json.loads((out / "summary.json").read_text())
    assert summary["top1_per_class"] == {NONE_OF_THESE: 1}
    line = threshold_hint(result.quiet_best(), 1.01, None, images=1, where="a.png", what="class")
    assert line in capsys.readouterr().err and "none of these" in line

    from apps.demo.handlers import DemoHandlers
    from apps.demo.models import ModelCache, find_checkpoints

    found, problems = find_checkpoints([], [weights])
    assert not problems
    handlers = DemoHandlers(ModelCache(found, "cpu"), max_pixels=10_000_000, max_side=640,
                            files_dir=tmp_path / "files")
    label, info = handlers.classify(str(src / "a.png"), found[0].label)
    assert label == NONE_OF_THESE and "**None of these**" in info and result.names[0] in info
