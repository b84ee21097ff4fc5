"""int8 weights in a slim checkpoint (weights/slim.py --int8): half the float16 size, and every reader of a
checkpoint's weights (load_model, fine-tuning, trunk loading) multiplies them back."""

from __future__ import annotations

import dataclasses
import importlib.util
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from apps.engine.checkpointing import load_finetune_weights
from apps.predict.predictor import Predictor
from apps.tasks import load_model
from vision.checkpoint import INT8_SCALES, checkpoint_weights, load_checkpoint, quantize_int8, save_checkpoint
from vision.classification import Classifier, ClassifierConfig
from vision.weights import load_state_dict_file

ROOT = Path(__file__).resolve().parents[1]


def test_quantize_per_output_channel_round_trip():
    weight = torch.tensor([[0.5, -1.0, 0.25, 0.0], [0.01, 0.02, -0.03, 0.04]]).repeat_interleave(1, 0)
    weight = weight[:, :, None, None].expand(2, 4, 32, 32).contiguous()  # 8192 values: quantized
    bias = torch.randn(2)
    state, scales = quantize_int8({"w": weight, "b": bias, "n": torch.tensor(3)})
    assert state["w"].dtype == torch.int8 and state["b"] is bias and set(scales) == {"w"}
    # one scale per output channel: the largest magnitude of each row maps to 127
    assert torch.allclose(scales["w"], torch.tensor([1.0 / 127, 0.04 / 127]))
    assert state["w"][0, :, 0, 0].tolist() == [64, -127, 32, 0]
    back = checkpoint_weights({"state_dict": state, INT8_SCALES: scales})
    assert (back["w"] - weight).abs().max() <= scales["w"].max() / 2 + 1e-7
    assert back["b"] is bias


def test_an_int8_slim_classifier_loads_everywhere_and_answers_alike(tmp_path):
    torch.manual_seed(0)
    cfg = ClassifierConfig(num_classes=3)
    model = Classifier(cfg).eval()
    classes = [{"id": i, "name": n} for i, n in enumerate(["a", "b", "c"])]
    src = save_checkpoint({"format": "visiondet", "version": 1, "task": "classification",
                           "model": dataclasses.asdict(cfg), "classes": classes, "preprocess": {"size": 32},
                           "state_dict": model.state_dict(), "train_state": {"step": 1}}, tmp_path / "run.pt")
    dst = tmp_path / "slim.pt"
    subprocess.run([sys.executable, str(ROOT / "weights" / "slim.py"), str(src), str(dst), "--int8",
                    "--max-mb", "15"], check=True, cwd=ROOT)
    slim = load_checkpoint(dst)
    assert slim["state_dict"]["backbone.layer4.0.conv1.weight"].dtype == torch.int8
    assert "train_state" not in slim and 10e6 < dst.stat().st_size < 12e6  # float16 would be about 22 MB
    loaded = load_model(dst, "cpu").model
    for name, value in model.state_dict().items():
        if value.is_floating_point():
            assert torch.allclose(loaded.state_dict()[name], value, atol=value.abs().max() / 200 + 1e-3), name
    images = [np.random.default_rng(i).integers(0, 256, (40, 40, 3), dtype=np.uint8) for i in range(4)]
    a, b = Predictor(src, "cpu").predict(images), Predictor(dst, "cpu").predict(images)
    for ra, rb in zip(a, b, strict=True):
        assert np.allclose(ra.scores, rb.scores, atol=0.02)
    # fine-tuning from the file, and a trunk loaded from it, see float weights
    fresh = Classifier(cfg)
    assert not load_finetune_weights(fresh, dst).missing
    assert torch.allclose(fresh.state_dict()["head.weight"], loaded.state_dict()["head.weight"])
    assert all(v.dtype != torch.int8 for v in load_state_dict_file(dst).values())


def _slim_module():
    spec = importlib.util.spec_from_file_location("slim", ROOT / "weights" / "slim.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_an_int8_detectors_check_asks_its_sure_detections_to_agree_not_every_box():
    agree = _slim_module().sure_detections_agree

    def result(*dets):  # (x1, y1, x2, y2, label, score), as Predictor's detection results carry them
        rows = np.array(dets, dtype=np.float64).reshape(-1, 6)
        return SimpleNamespace(boxes=rows[:, :4], labels=rows[:, 4].astype(int), scores=rows[:, 5])

    cup, coin = (10, 10, 60, 60, 1, 0.9), (100, 20, 130, 50, 2, 0.8)
    both = result(cup, coin)
    assert agree(both, result(coin, (11, 10, 60, 61, 1, 0.85)), 0.6)  # order and a pixel apart
    assert agree(both, result(cup, coin, (200, 200, 220, 220, 3, 0.55)), 0.6)  # one unsure extra box
    assert not agree(both, result(cup), 0.6)  # a sure coin lost
    assert not agree(both, result(cup, (100, 20, 130, 50, 3, 0.8)), 0.6)  # the coin's class changed
    assert not agree(both, result(cup, (108, 20, 138, 50, 2, 0.8)), 0.6)  # moved: IoU 0.58
    assert not agree(result(cup), both, 0.6)  # a sure box in the other copy counts too
