"""predict and demo with --backend onnxruntime: the checkpoint's exported file, made and cached on first use,
gives the PyTorch backend's outputs and files."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from apps import WEIGHTS_DIR
from apps.cli import main
from apps.demo.models import ModelCache, find_checkpoints
from apps.export import ExportedModel
from apps.predict.predictor import Predictor
from apps.tasks import load_model
from vision.data.images import read_image

pytest.importorskip("onnxruntime", reason="the export extra: pip install 'visiondet[export]'")

EXAMPLES = WEIGHTS_DIR / "examples"


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("VISIONDET_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "export"


def test_predict_cli_same_files_with_onnxruntime(tmp_path, cache):
    outputs = {}
    for backend in ("pytorch", "onnxruntime"):
        out = tmp_path / backend
        assert main(["predict", "--weights", str(WEIGHTS_DIR / "faster_rcnn_shapes.pt"), "--source",
                     str(EXAMPLES / "scene_1.png"), str(EXAMPLES / "scene_3.png"), "--output", str(out),
                     "--backend", backend, "--workers", "0", "--no-progress", "--save-images"]) == 0
        outputs[backend] = out
    # exported once, into the cache
    assert [p.suffix for p in cache.iterdir()] == [".onnx"]
    torch_lines = (outputs["pytorch"] / "predictions.jsonl").read_text().splitlines()
    onnx_lines = (outputs["onnxruntime"] / "predictions.jsonl").read_text().splitlines()
    assert len(torch_lines) == 2 and sum(len(json.loads(x)["detections"]) for x in torch_lines) > 0
    for a, b in zip(torch_lines, onnx_lines, strict=True):
        a, b = json.loads(a), json.loads(b)
        assert [d["category_id"] for d in a["detections"]] == [d["category_id"] for d in b["detections"]]
        for da, db in zip(a["detections"], b["detections"], strict=True):
            assert np.allclose(da["bbox"], db["bbox"], atol=0.02) and abs(da["score"] - db["score"]) < 1e-4
    drawn = sorted(p.name for p in (outputs["onnxruntime"] / "images").rglob("*.*"))
    assert drawn == sorted(p.name for p in (outputs["pytorch"] / "images").rglob("*.*")) and drawn


@pytest.mark.parametrize("name", ["classifier_shapes", "deeplabv3plus_shapes"])
def test_predictor_onnxruntime_classification_and_segmentation(name):
    image = read_image(EXAMPLES / "scene_2.png")
    [expected] = Predictor(WEIGHTS_DIR / f"{name}.pt", "cpu").predict([image])
    predictor = Predictor(WEIGHTS_DIR / f"{name}.pt", "cpu", backend="onnxruntime")
    assert isinstance(predictor.model, ExportedModel)
    [got] = predictor.predict([image])
    if name.startswith("classifier"):
        assert got.labels.tolist() == expected.labels.tolist()
        assert np.allclose(got.scores, expected.scores, atol=1e-4)
    else:
        assert (got.mask != expected.mask).mean() < 1e-3 and len(np.unique(expected.mask)) > 1


def test_onnxruntime_refuses_a_score_threshold_below_the_exported_one():
    with pytest.raises(ValueError, match="needs --backend pytorch"):
        Predictor(WEIGHTS_DIR / "faster_rcnn_shapes.pt", "cpu", score_thresh=0.01, backend="onnxruntime")


def test_onnxruntime_takes_the_checkpoints_threshold_without_refusing_it():
    """Without a threshold given, the checkpoint's calibrated one (tests/test_score_calibration.py): above
    the file's fixed cut, as it is; under it, raised to the cut (all the file can give), never refused."""
    loaded = load_model(WEIGHTS_DIR / "faster_rcnn_shapes.pt")
    cut = loaded.model.thresholds.score_thresh
    image = read_image(EXAMPLES / "scene_1.png")
    calibrated = dataclasses.replace(loaded, preprocess={**loaded.preprocess, "score_threshold": 0.9})
    [expected] = Predictor(calibrated, "cpu").predict([image])
    onnx = Predictor(calibrated, "cpu", backend="onnxruntime")
    assert isinstance(onnx.model, ExportedModel) and onnx.score_thresh == 0.9
    [got] = onnx.predict([image])
    assert got.names == expected.names and len(got.names) > 0 and (got.scores >= 0.9).all()
    under = dataclasses.replace(loaded, preprocess={**loaded.preprocess, "score_threshold": cut / 2})
    assert Predictor(under, "cpu", backend="onnxruntime").score_thresh == cut


def test_demo_cache_runs_exported_models_and_keeps_rcnn_on_pytorch(capsys):
    checkpoints, _ = find_checkpoints([WEIGHTS_DIR])
    labels = {c.path.name: c.label for c in checkpoints}
    cache = ModelCache(checkpoints, "cpu", backend="onnxruntime")
    loaded = cache.get(labels["fast_rcnn_shapes.pt"])
    assert isinstance(loaded.model, ExportedModel) and loaded.model.external
    image = read_image(EXAMPLES / "scene_4.png")
    [got] = Predictor(loaded, "cpu").predict([image])
    [expected] = Predictor(WEIGHTS_DIR / "fast_rcnn_shapes.pt", "cpu").predict([image])
    assert got.names == expected.names and len(got.names) > 0
    assert np.allclose(got.boxes, expected.boxes, atol=0.02)
    rcnn = cache.get(labels["rcnn_shapes.pt"])
    assert not isinstance(rcnn.model, ExportedModel)
    assert "runs on PyTorch" in capsys.readouterr().err


def test_demo_command_hands_the_backend_to_its_model_cache(monkeypatch):
    from apps.demo.page import Demo

    seen = {}

    def start(self, *args, **kwargs):
        seen["backend"] = self.cache.backend
        raise OSError("not serving in a test")

    monkeypatch.setattr(Demo, "start", start)
    monkeypatch.setattr(Demo, "close", lambda self: None)
    assert main(["demo", "--no-default-weights", "--weights", str(WEIGHTS_DIR / "faster_rcnn_shapes.pt"),
                 "--backend", "onnxruntime", "--device", "cpu"]) == 1
    assert seen == {"backend": "onnxruntime"}
