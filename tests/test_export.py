"""visiondet export: ONNX and TorchScript files of every task, compared with PyTorch at sizes other than
the one traced, metadata, and the failures (no file left behind, one clear line)."""

from __future__ import annotations

import builtins
import warnings

import pytest
import torch
from torch import Tensor, nn

from apps import WEIGHTS_DIR
from apps.cli import main
from detection.export import DetectorGraph, detector_spec
from vision.export import (
    ExportError,
    GraphSpec,
    compare_dense,
    compare_detections,
    export_graph,
    load_runner,
    read_metadata,
    require_onnxruntime,
    sample_images,
)

pytest.importorskip("onnxruntime", reason="the export extra: pip install 'visiondet[export]'")


@pytest.fixture
def exportable(tiny_detector):
    """The factory ``exportable(arch)``: a tiny detector whose random head spreads its class scores (all near
    1/4 otherwise, a tie at every detection), in eval mode."""

    def build(arch: str = "faster_rcnn_r18_fpn") -> nn.Module:
        model = tiny_detector(arch, num_classes=3, min_size=96, max_size=128, fpn_channels=32,
                              roi={"representation_size": 64, "score_thresh": 0.2}).eval()
        nn.init.normal_(model.roi_heads.box_predictor.cls_score.weight, std=0.3)
        nn.init.normal_(model.roi_heads.box_predictor.bbox_pred.weight, std=0.02)
        return model

    return build


def eager(model: nn.Module, image: Tensor, proposals: Tensor | None = None):
    with torch.no_grad():
        det = model([image], proposals=[proposals] if proposals is not None else None)[0][0]
    return det.boxes, det.labels, det.scores


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_faster_rcnn_export_any_image_size(tmp_path, fmt, exportable):
    model = exportable()
    spec = detector_spec(model, {"classes": ["a", "b", "c"]})
    with torch.no_grad():  # every check image has detections to compare (empty against empty proves nothing)
        assert all(len(spec.module(*sample)[0]) for sample in spec.samples)
    report = export_graph(spec, tmp_path / f"det.{fmt}", fmt)
    assert len(report.checks) == 3 and report.path.is_file()
    runner = load_runner(report.path)
    assert runner.metadata == {"classes": ["a", "b", "c"]}
    # sizes never seen at export, portrait and landscape, one beyond max_size
    for image in sample_images([(50, 77), (140, 61), (300, 90)], seed=5):
        got, expected = runner(image), eager(model, image)
        assert len(expected[0]) > 0
        assert compare_detections()(got, expected) is None
        boxes = got[0]
        assert float(boxes[:, 2].max()) <= image.shape[2] and float(boxes[:, 3].max()) <= image.shape[1]


def test_an_export_whose_check_images_give_no_detection_fails(tmp_path, exportable):
    # a file that finds nothing would match a model that finds nothing: such a check is refused
    model = exportable()
    model.roi_heads.box_predictor.cls_score.bias.data[0] = 50.0  # background wins everywhere
    spec = detector_spec(model, {})
    with pytest.raises(ExportError, match="compared nothing: PyTorch finds no detection on any of the 3"):
        export_graph(spec, tmp_path / "none.onnx", "onnx")
    assert list(tmp_path.iterdir()) == []


def test_fast_rcnn_export_takes_proposals(tmp_path, exportable):
    model = exportable("fast_rcnn_r18_fpn")
    spec = detector_spec(model, {})
    with torch.no_grad():
        assert all(len(spec.module(*sample)[0]) for sample in spec.samples)
    report = export_graph(spec, tmp_path / "fast.onnx", "onnx")
    runner = load_runner(report.path)
    assert runner.input_names == ["image", "proposals"]
    image = sample_images([(70, 110)], seed=3)[0]
    proposals = torch.tensor([[5.0, 5.0, 60.0, 50.0], [20.0, 10.0, 100.0, 69.0], [0.0, 0.0, 30.0, 30.0]])
    got, expected = runner(image, proposals), eager(model, image, proposals)
    assert len(expected[0]) > 0 and compare_detections()(got, expected) is None
    # the refined boxes start from the given proposals: moving them moves the detections
    moved = runner(image, proposals + torch.tensor([3.0, 2.0, 3.0, 2.0]))
    assert not torch.allclose(moved[0], got[0])


def test_the_export_graph_is_the_eager_forward_at_every_size(exportable):
    # DetectorGraph adds nothing but packing: traced at one size, the detector's own forward must give its
    # eager detections bit for bit at others (a size read as a Python number would be frozen into the
    # trace). Traced at 96x128, the finest level has 24 * 32 * 3 anchors, over pre_nms_top_n_test (1000);
    # 30x300 is resized to 12x128 and has 8 * 32 * 3 = 768, so the RPN's top-k must follow the input too.
    model = exportable()
    graph = DetectorGraph(model)
    assert list(graph.children()) == [model]
    (first,) = sample_images([(96, 128)], seed=3)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's warnings about Python values; the results are the test
        traced = torch.jit.trace(graph, (first,), check_trace=False)
        for image in sample_images([(64, 99), (129, 40), (30, 300)], seed=7):
            expected = eager(model, image)
            assert len(expected[0]) > 0
            for a, b in zip(expected, traced(image), strict=True):
                assert torch.equal(a, b)


class FrozenWidth(nn.Module):
    """Reads the width as a Python int: a trace freezes it, so other widths come out wrong."""

    def forward(self, x: Tensor) -> Tensor:
        return x * int(x.shape[-1])


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_export_beyond_tolerance_fails_and_leaves_no_file(tmp_path, fmt):
    samples = [(torch.ones(1, 4, 8),), (torch.ones(1, 4, 5),)]
    spec = GraphSpec(FrozenWidth(), ["x"], ["y"], {"x": {2: "w"}, "y": {2: "w"}}, samples, compare_dense())
    out = tmp_path / "bad.bin"
    with pytest.raises(ExportError, match=r"differs from PyTorch on check input 1 \(1x4x5\).*no file"):
        export_graph(spec, out, fmt)
    assert list(tmp_path.iterdir()) == []


def test_missing_onnxruntime_names_the_pip_command(monkeypatch):
    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "onnxruntime":
            raise ImportError("No module named 'onnxruntime'", name="onnxruntime")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(ExportError, match=r"onnxruntime is missing\): pip install 'visiondet\[export\]'"):
        require_onnxruntime()


def test_cli_exports_shipped_classifier_and_segmenter_with_metadata(tmp_path, capsys):
    cls_out, seg_out = tmp_path / "cls.onnx", tmp_path / "seg.pt"
    assert main(["export", "--weights", str(WEIGHTS_DIR / "classifier_shapes.pt"), "--format", "onnx",
                 "--out", str(cls_out)]) == 0
    assert main(["export", "--weights", str(WEIGHTS_DIR / "deeplabv3plus_shapes.pt"), "--format",
                 "torchscript", "--out", str(seg_out)]) == 0
    printed = capsys.readouterr().out
    assert printed.count("checked against PyTorch") == 6  # three image sizes each
    meta = read_metadata(cls_out)
    classifier = load_runner(cls_out)
    for h, w in ((64, 64), (48, 64), (96, 80)):  # the three sizes the export checked
        assert f"input 1x3x{h}x{w}" in printed or f"input 3x3x{h}x{w}" in printed
    assert classifier(sample_images([(70, 90)])[0][None])[0].shape == (1, 3)  # and any other
    assert meta["task"] == "classification" and [c["name"] for c in meta["classes"]] == [
        "circle", "square", "triangle"]
    assert "centre crop of 64 x 64" in meta["preprocess"]["input"]
    seg = load_runner(seg_out)
    assert seg.metadata["task"] == "segmentation"
    logits, mask = seg(sample_images([(45, 61)])[0][None])
    assert logits.shape == (1, 4, 45, 61) and mask.shape == (1, 45, 61)
    assert torch.equal(mask, logits.argmax(1))


def test_cli_shipped_faster_rcnn_and_rcnn_refusal(tmp_path, capsys):
    out = tmp_path / "faster.onnx"
    assert main(["export", "--weights", str(WEIGHTS_DIR / "faster_rcnn_shapes.pt"), "--format", "onnx",
                 "--out", str(out)]) == 0
    meta = read_metadata(out)
    assert meta["task"] == "detection" and meta["label_offset"] == 1 and "proposals" not in meta
    assert main(["export", "--weights", str(WEIGHTS_DIR / "rcnn_shapes.pt"), "--format", "onnx",
                 "--out", str(tmp_path / "rcnn.onnx")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "R-CNN is not exported" in err
    assert not (tmp_path / "rcnn.onnx").exists()


def test_detection_comparison_tolerates_only_edge_flips():
    boxes = torch.tensor([[0.0, 0, 10, 10], [5, 5, 20, 20], [30, 30, 40, 40]])
    labels, scores = torch.tensor([1, 2, 1]), torch.tensor([0.9, 0.4, 0.0502])
    compare, reference = compare_detections(), (boxes, labels, scores)
    # the same detections in another order, within float noise
    order = [1, 0, 2]
    assert compare((boxes[order] + 1e-3, labels[order], scores[order]), reference) is None
    # the lowest one (at the threshold) on one side only: rounding's call
    assert compare((boxes[:2], labels[:2], scores[:2]), (boxes, labels, scores)) is None
    # a confident detection missing, a label changed, a box moved: real differences
    assert "missing" in compare((boxes[[0, 2]], labels[[0, 2]], scores[[0, 2]]), (boxes, labels, scores))
    assert "no PyTorch counterpart" in compare((boxes, torch.tensor([1, 3, 1]), scores), reference)
    assert "no PyTorch counterpart" in compare((boxes + 0.5, labels, scores), (boxes, labels, scores))
