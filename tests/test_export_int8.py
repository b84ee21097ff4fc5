"""`visiondet export --int8` and `predict --int8`: a Faster R-CNN file statically quantised to int8
(vision/quantize.py), calibrated on real images, that keeps the float model's confident detections."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("onnxruntime")

import onnx  # noqa: E402

from apps import WEIGHTS_DIR  # noqa: E402
from apps.cli import main as visiondet  # noqa: E402
from apps.export import cache_path, export_checkpoint  # noqa: E402
from vision.export import ExportError, read_metadata  # noqa: E402
from vision.quantize import detection_agreement  # noqa: E402

DETECTOR = WEIGHTS_DIR / "faster_rcnn_shapes.pt"
EXAMPLES = WEIGHTS_DIR / "examples"  # real-looking scenes of the shapes the detector was trained on


@pytest.fixture(scope="module")
def int8_file(tmp_path_factory: pytest.TempPathFactory):
    """The detector's int8 file, written where `--int8 weights/examples` finds it (one quantisation)."""
    cache = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VISIONDET_CACHE", str(cache))
        out = cache_path(DETECTOR, "onnx", EXAMPLES)
        report = export_checkpoint(DETECTOR, "onnx", out, int8=EXAMPLES)
    return cache, out, report


def test_every_conv_and_linear_weight_is_int8(int8_file) -> None:
    _, path, report = int8_file
    model = onnx.load(str(path))
    init = {i.name: i for i in model.graph.initializer}
    dequant = {n.output[0]: n for n in model.graph.node if n.op_type == "DequantizeLinear"}
    layers = [n for n in model.graph.node if n.op_type in ("Conv", "Gemm", "MatMul")]
    assert len(layers) > 20  # backbone, FPN, RPN head and box head, not only the head
    for node in layers:
        weight = dequant.get(node.input[1])
        assert weight is not None and init[weight.input[0]].data_type == onnx.TensorProto.INT8, node.name
    meta = read_metadata(path)
    assert meta["task"] == "detection" and meta["quantization"]["calibration_samples"] == 7
    assert [c["name"] for c in meta["classes"]] == ["circle", "square", "triangle"]
    # the report says how many of PyTorch's confident detections the int8 file keeps on the calibration images
    line = report.checks[-1]
    counts = line.split(" it finds ")[1].split(" detections")[0]
    found, total = (int(w) for w in counts.split(" of PyTorch's "))
    assert total >= 10 and found >= 0.9 * total


def test_predict_int8_finds_what_pytorch_finds(int8_file, tmp_path: Path, monkeypatch) -> None:
    cache, path, _ = int8_file
    monkeypatch.setenv("VISIONDET_CACHE", str(cache))
    before = path.stat().st_mtime_ns
    outputs = {}
    for name, flags in (("pytorch", []), ("int8", ["--int8", str(EXAMPLES)])):
        code = visiondet(["predict", "--weights", str(DETECTOR), "--source", str(EXAMPLES), "--output",
                          str(tmp_path / name), "--device", "cpu", "--no-progress", "--workers", "0", *flags])
        assert code == 0
        lines = (tmp_path / name / "predictions.jsonl").read_text().splitlines()
        outputs[name] = {r["file"]: r["detections"] for r in map(json.loads, lines)}
    assert path.stat().st_mtime_ns == before  # the cached int8 file was used, not made again
    assert json.loads((tmp_path / "int8" / "summary.json").read_text())["done"] == 7
    import torch

    def tensors(dets):
        xywh = [d["bbox"] for d in dets]
        boxes = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in xywh]).reshape(-1, 4)
        return boxes, torch.tensor([d["category_id"] for d in dets]), torch.tensor([d["score"] for d in dets])

    found = total = 0
    for file, dets in outputs["pytorch"].items():
        f, t = detection_agreement(tensors(outputs["int8"][file]), tensors(dets))
        found, total = found + f, total + t
    assert total >= 10 and found >= 0.9 * total


def test_agreement_counts_by_hand() -> None:
    import torch

    expected = (torch.tensor([[0.0, 0, 10, 10], [20, 20, 30, 30], [0, 0, 10, 10]]), torch.tensor([1, 2, 1]),
                torch.tensor([0.9, 0.8, 0.4]))  # the third scores under 0.5: not counted
    got = (torch.tensor([[1.0, 0, 10, 10], [20, 20, 30, 30]]), torch.tensor([1, 3]), torch.tensor([0.3, 0.9]))
    # the first is found (IoU 0.9, score 0.3 >= 0.25); the second has another label
    assert detection_agreement(got, expected) == (1, 2)


def test_int8_refusals(tmp_path: Path, capsys) -> None:
    out = tmp_path / "x.onnx"
    cases = [
        (["--format", "torchscript", "--int8", str(EXAMPLES)], "--int8 writes ONNX files"),
        (["--format", "onnx", "--int8", str(tmp_path / "nothing")], "no such folder of calibration images"),
        (["--format", "onnx", "--int8", str(tmp_path)], "no images to calibrate on"),
    ]
    for flags, message in cases:
        assert visiondet(["export", "--weights", str(DETECTOR), "--out", str(out), *flags]) == 2
        assert message in capsys.readouterr().err
        assert not out.exists() and not list(tmp_path.glob(".*"))
    with pytest.raises(ExportError, match="for Faster R-CNN checkpoints"):
        export_checkpoint(WEIGHTS_DIR / "classifier_shapes.pt", "onnx", out, int8=EXAMPLES)
