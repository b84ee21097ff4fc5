"""int8 weights in a slim checkpoint (weights/slim.py --int8): half the float16 size, and every reader of a
checkpoint's weights (load_model, fine-tuning, trunk loading) multiplies them back."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

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
