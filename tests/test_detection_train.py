"""The detection task in the engine: a tiny train + `visiondet evaluate`, shipped configs, builders."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from apps.cli import main
from apps.config import ConfigError, build_experiment, load_yaml_with_bases
from apps.engine.trainer import train
from apps.tasks import load_model
from detection.models import (
    DETECTOR_ARCHS,
    DetectorConfig,
    RoIConfig,
    RPNConfig,
    build_detector,
    prepare_for_inference,
)
from detection.structures import Detections
from vision.checkpoint import load_checkpoint
from vision.data.synthetic import make_shapes
from vision.layers import FrozenBatchNorm2d

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "detection"
# the smallest model that still has every part: ResNet-18 FPN with 32 channels, few proposals
TINY_MODEL = {
    "arch": "faster_rcnn_r18_fpn",
    "frozen_bn": False,
    "freeze_at": 0,
    "min_size": 64,
    "max_size": 96,
    "fpn_channels": 32,
    "rpn": {
        "anchor_sizes": [[16], [32], [64], [128], [256]],
        "post_nms_top_n_train": 64,
        "post_nms_top_n_test": 32,
    },  # fmt: skip
    "roi": {"representation_size": 32, "batch_size_per_image": 32, "detections_per_img": 20},
}


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes_det")
    return make_shapes("detection", root, num_images=8, seed=0, image_size=(64, 96), val_fraction=0.25)


def experiment(shapes, out):
    split = lambda name: {
        "images": str(shapes[name] / "images"),
        "annotations": str(shapes[name] / "annotations.json"),
    }  # noqa: E731,E501
    return {
        "task": "detection",
        "model": TINY_MODEL,
        "data": {"train": split("train"), "val": split("val"), "workers": 0},
        "train": {"epochs": 2, "batch_size": 3, "lr": 0.01, "log_every": 1, "grad_clip": 10.0},
        "output_dir": str(out),
        "device": "cpu",
    }


def test_train_then_evaluate(shapes, tmp_path, capsys):
    torch.set_num_threads(2)
    result = train(build_experiment(experiment(shapes, tmp_path / "run")))
    assert result.status == "completed"
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r["kind"] == "train"]
    for key in ("loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg"):
        assert all(r[key] == r[key] and r[key] >= 0 for r in train_rows)  # finite (not NaN), every step
    vals = [r for r in rows if r["kind"] == "val"]
    val = max(vals, key=lambda r: r["AP"])  # best.pt's epoch (the first of equal APs)
    assert 0.0 <= val["AP"] <= val["AP50"] <= 1.0 and "AP50/circle" in val or "AP50/square" in val

    loaded = load_model(tmp_path / "run" / "best.pt")
    assert loaded.task.name == "detection" and [c["name"] for c in loaded.classes] == [
        "circle",
        "square",
        "triangle",
    ]
    assert loaded.model.roi_heads.box_predictor.cls_score.out_features == 4
    outputs, losses = loaded.model([torch.rand(3, 70, 90)])
    assert isinstance(outputs[0], Detections) and losses == {}
    # after training, each checkpoint gets the score threshold of best F1 on the validation split (the rule
    # and its use by predict and the demo: tests/test_score_calibration.py)
    for name in ("last.pt", "best.pt"):
        preprocess = load_checkpoint(tmp_path / "run" / name)["preprocess"]
        figures = preprocess["score_calibration"]
        assert preprocess["score_threshold"] == figures["threshold"] >= 0.05
        assert (figures["images"], figures["split"]) == (2, str(shapes["val"] / "images"))
        assert figures["boxes"] > 0
        assert figures["f1"] == pytest.approx(2 / (1 / figures["precision"] + 1 / figures["recall"]))
    assert result.metrics["score/threshold"] == loaded.preprocess["score_threshold"]  # best.pt's
    assert "score threshold: best.pt keeps detections scoring" in (tmp_path / "run" / "train.log").read_text()

    out = tmp_path / "eval.json"
    val_split = ["--images", str(shapes["val"] / "images"), "--annotations"]
    val_split.append(str(shapes["val"] / "annotations.json"))
    code = main(["evaluate", "--weights", str(tmp_path / "run" / "best.pt"), *val_split, "--device", "cpu",
                 "--workers", "0", "--batch-size", "2", "--out", str(out)])  # fmt: skip
    assert code == 0
    captured = capsys.readouterr()
    printed = captured.out
    assert "AP50" in printed and "circle" in printed
    # progress while it runs (stderr is no terminal here: plain lines), ending at the last batch
    batches = -(-len(list((shapes["val"] / "images").iterdir())) // 2)
    assert f"evaluate: {batches}/{batches} batches" in captured.err
    # the same weights on the same split give the training run's validation figures
    assert json.loads(out.read_text())["metrics"]["AP50"] == pytest.approx(val["AP50"])


def test_shipped_configs_are_valid(shapes):
    for name in (
        "faster_rcnn_vgg16",
        "faster_rcnn_r50_c4",
        "faster_rcnn_r50_fpn",
        "faster_rcnn_r18_fpn_shapes",
    ):
        path = CONFIGS / f"{name}.yaml"
        data = load_yaml_with_bases(path)
        data["data"] = experiment(shapes, "unused")["data"]  # their data paths point at real datasets
        exp = build_experiment(data)
        assert exp.model.arch in DETECTOR_ARCHS, path.name


def test_small_config_builds_the_documented_model(shapes):
    exp = build_experiment({**load_yaml_with_bases(CONFIGS / "faster_rcnn_r18_fpn_shapes.yaml"),
                            "data": experiment(shapes, "unused")["data"]})  # fmt: skip
    model = build_detector(exp.model)
    assert list(model.backbone.feature_info) == ["p2", "p3", "p4", "p5", "p6"]
    assert model.proposal_generator.anchor_generator.sizes[0] == (16.0,)
    assert model.roi_heads.pooler.method == "multiscale"


def test_bad_model_settings_are_config_errors(shapes, tmp_path):
    exp = experiment(shapes, tmp_path)
    exp["model"] = {**TINY_MODEL, "arch": "faster_rcnn_r19_fpn"}
    with pytest.raises(ConfigError, match="unknown detector arch 'faster_rcnn_r19_fpn'"):
        train(build_experiment(exp))
    exp["model"] = {**TINY_MODEL, "rpn": {"anchor_sizes": [[32, 64]]}}
    with pytest.raises(
        ConfigError, match="anchor_sizes has 1 levels but faster_rcnn_r18_fpn gives the RPN 5"
    ):
        train(build_experiment(exp))
    # a section the architecture ignores is an error, not silently dropped (here an inherited rpn:)
    exp["model"] = {**TINY_MODEL, "arch": "fast_rcnn_r18_fpn", "proposals": {"method": "selective_search"},
                    "rpn": {"pre_nms_top_n_test": 50}}
    with pytest.raises(ConfigError, match="fast_rcnn_r18_fpn ignores model.rpn .it has no RPN."):
        train(build_experiment(exp))


@pytest.mark.parametrize("arch", ["faster_rcnn_r18_c4", "fast_rcnn_r18_fpn"])
def test_other_layouts_train_and_predict(arch, tiny_detector):
    # C4 (res5 as box head, RoIAlign 14) and Fast R-CNN (external proposals) from the same parts
    external = arch.startswith("fast_rcnn")
    rpn = None if external else {"post_nms_top_n_train": 16, "post_nms_top_n_test": 16}  # only with an RPN
    model = tiny_detector(arch, frozen_bn=False, max_size=64, fpn_channels=256, rpn=rpn,
                          roi={"batch_size_per_image": 16})
    images = [torch.rand(3, 64, 64), torch.rand(3, 48, 64)]
    targets = [{"boxes": torch.tensor([[8.0, 8.0, 40.0, 40.0]]), "labels": torch.tensor([2])},
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}]  # fmt: skip
    proposals = [
        torch.tensor([[0.0, 0.0, 30.0, 30.0], [10, 10, 50, 44]]),
        torch.tensor([[4.0, 4.0, 20.0, 30.0]]),
    ]
    given = proposals if external else None
    _, losses = model.train()(images, targets, given)
    expected = {"loss_classifier", "loss_box_reg"} | (
        {"loss_objectness", "loss_rpn_box_reg"} if not given else set()
    )
    assert set(losses) == expected and all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    with torch.no_grad():
        outputs, _ = model.eval()(images, proposals=given)
    assert len(outputs) == 2 and all(o.boxes.shape[1] == 4 for o in outputs)
    if given:  # Fast R-CNN: at most one detection per class per proposal, inside the image
        assert len(outputs[1]) <= 2 and (outputs[1].boxes[:, 3] <= 48).all()
        with pytest.raises(ValueError, match="external proposals"):
            model(images)


def test_prepare_for_inference_keeps_the_outputs():
    torch.manual_seed(0)
    model = build_detector(
        DetectorConfig(
            **{**TINY_MODEL, "num_classes": 3, "frozen_bn": True, "rpn": RPNConfig(), "roi": RoIConfig()}
        )
    )
    with torch.no_grad():  # give the frozen batch norms real statistics, so folding them changes the convs
        for name, buffer in model.backbone.body.named_buffers():
            if name.endswith(("running_mean", "bias")):
                buffer.normal_(0, 0.1)
            elif name.endswith(("running_var", "weight")):
                buffer.uniform_(0.5, 1.5)
    model.eval()
    fast = prepare_for_inference(model)
    assert not any(isinstance(m, FrozenBatchNorm2d) for m in fast.modules())
    assert fast.backbone.body.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    images = [torch.rand(3, 80, 96), torch.rand(3, 64, 72)]
    with torch.inference_mode():
        expected, _ = model(images)
        got, _ = fast(images)
    assert sum(len(d) for d in expected) > 0
    for e, g in zip(expected, got, strict=True):
        assert torch.equal(e.labels, g.labels)
        assert (e.boxes - g.boxes).abs().max() <= 1e-3 and (e.scores - g.scores).abs().max() <= 1e-4
