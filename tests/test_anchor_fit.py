"""Anchor coverage and fitting (detection/anchor_fit.py) against hand-computed boxes, and against the
anchors the RPN really makes (AnchorGenerator on the padded image's feature grid)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from torchvision.ops import box_iou

from detection.anchor_fit import (
    AnchorLayout,
    anchor_report,
    best_possible_recall,
    boxes_at_model_scale,
    centred_iou,
    coco_boxes,
    fit_anchors,
    fit_ratios,
    grid_iou,
    resolve_auto_anchors,
    size_summary,
)
from detection.anchors import AnchorGenerator
from detection.models import DetectorConfig, RPNConfig, build_detector, rpn_levels


def test_centred_iou_by_hand():
    boxes = np.array([[10.0, 10.0], [10.0, 20.0]])  # (w, h)
    anchors = np.array([[20.0, 20.0], [20.0, 10.0]])
    iou = centred_iou(boxes, anchors)
    # 10x10 in 20x20: 100 / 400; 10x20 against 20x10: 10 * 10 / (200 + 200 - 100)
    assert iou[0, 0] == pytest.approx(0.25) and iou[1, 1] == pytest.approx(1 / 3)
    assert iou[0, 1] == pytest.approx(100 / 200) and iou[1, 0] == pytest.approx(200 / 400)


def test_grid_iou_by_hand():
    # one 16 px square anchor on a stride-16 grid of a 64x64 padded image: centres at 0, 16, 32, 48
    corners, levels, strides = np.array([[-8.0, -8.0, 8.0, 8.0]]), np.array([0]), [16]
    boxes = np.array([[8.0, 8.0, 24.0, 24.0],    # centred on grid point 16: IoU 1
                      [4.0, 4.0, 20.0, 20.0],    # centre 12 -> anchor (8, 8, 24, 24): 12 * 12 / (512 - 144)
                      [40.0, 40.0, 72.0, 72.0]])  # centre 56: nearest is the last position, 48 (not 64)
    iou = grid_iou(boxes, np.full((3, 2), 64.0), corners, levels, strides)[:, 0]
    # last: anchor (40, 40, 56, 56) inside the 32 px box: 256 / 1024
    assert iou == pytest.approx([1.0, 144 / 368, 0.25])


def test_grid_iou_is_the_best_iou_over_the_anchors_the_rpn_makes():
    rng = np.random.default_rng(0)
    layout = AnchorLayout([[16.0], [32.0], [64.0]], [0.5, 1.0, 2.0], [4, 8, 16])
    padded = (96, 160)  # divisible by 32
    xy = rng.uniform(0, [150, 90], size=(200, 2))
    wh = rng.uniform(6, 80, size=(200, 2))
    boxes = np.concatenate([xy, np.minimum(xy + wh, [160, 96])], axis=1)
    corners, levels = layout.shapes()
    ours = grid_iou(boxes, np.tile(padded, (200, 1)).astype(float), corners, levels, layout.strides)
    generator = AnchorGenerator(layout.sizes, [layout.ratios])
    grids = [(math.ceil(padded[0] / s), math.ceil(padded[1] / s)) for s in layout.strides]
    anchors = torch.cat(generator(padded, grids))
    truth = box_iou(torch.tensor(boxes, dtype=torch.float32), anchors).max(dim=1).values.double().numpy()
    assert ours.max(axis=1) == pytest.approx(truth, abs=1e-5)


def test_best_possible_recall_by_hand():
    layout = AnchorLayout([[16.0]], [1.0], [16])
    boxes = np.array([[8.0, 8.0, 24.0, 24.0], [4.0, 4.0, 20.0, 20.0], [0.0, 0.0, 20.0, 20.0],
                      [8.0, 8.0, 40.0, 40.0]])
    hw = np.full((4, 2), 64.0)
    # grid (centres 0, 16, 32, 48): 1; 144 / 368 = 0.39; centre 10 -> anchor (8, 8, 24, 24): 12 * 12 /
    # (400 + 256 - 144) = 0.28; centre 24 -> anchor at 32 (round half to even), inside the box: 256 / 1024
    grid = best_possible_recall(boxes, hw, layout, thresholds=(0.25, 0.3, 0.5))
    assert grid == {0.25: 1.0, 0.3: 0.5, 0.5: 0.25}
    # centred: 1, 1, 256 / 400 = 0.64, 256 / 1024 = 0.25
    centred = best_possible_recall(boxes, hw, layout, placement="centred", thresholds=(0.25, 0.5, 0.7))
    assert centred == {0.25: 1.0, 0.5: 0.75, 0.7: 0.5}


def test_boxes_are_scaled_as_the_detector_resizes_them():
    boxes = np.array([[10.0, 10.0, 30.0, 50.0], [0.0, 0.0, 400.0, 100.0]])
    hw = np.array([[100.0, 200.0], [100.0, 400.0]])
    scaled, padded = boxes_at_model_scale(boxes, hw, min_size=[50, 100], max_size=200)
    # min_size 50: scales 0.5 and min(0.5, 200 / 400) = 0.5; min_size 100: 1.0 -> capped at 200 / 200 = 1.0
    # and min(1.0, 0.5) = 0.5
    assert scaled[:2].tolist() == [[5, 5, 15, 25], [0, 0, 200, 50]]
    assert scaled[2:].tolist() == [[10, 10, 30, 50], [0, 0, 200, 50]]
    assert padded.tolist() == [[64, 128], [64, 224], [128, 224], [64, 224]]


def test_coco_boxes_leave_out_crowds_and_clip():
    data = {"images": [{"id": 7, "height": 50, "width": 60}],
            "annotations": [{"image_id": 7, "bbox": [50, 40, 20, 20]}, {"image_id": 7, "bbox": [1, 2, 3, 4],
                                                                        "iscrowd": 1},
                            {"image_id": 7, "bbox": [5, 5, 0.5, 9]}, {"image_id": 8, "bbox": [0, 0, 5, 5]}]}
    boxes, hw = coco_boxes(data)
    assert boxes.tolist() == [[50, 40, 60, 50]] and hw.tolist() == [[50, 60]]


def test_fitted_ratios_follow_the_data():
    tall = np.array([[0.0, 0.0, 10.0, 20.0]] * 30)
    wide = np.array([[0.0, 0.0, 20.0, 10.0]] * 30)
    assert fit_ratios(np.concatenate([tall, wide]), k=3) == [0.5, 2.0]  # two clusters: the third merges
    assert fit_ratios(np.array([[0.0, 0.0, 10.0, 10.0]] * 5), k=3) == [1.0]


def squares_on_the_grid(size: float, stride: int, n: int = 4) -> np.ndarray:
    centres = stride * np.arange(2, 2 + n, dtype=float)
    return np.stack([centres - size / 2, centres - size / 2, centres + size / 2, centres + size / 2], axis=1)


def test_fitted_sizes_match_boxes_that_sit_on_the_grid():
    boxes = np.concatenate([squares_on_the_grid(20, 4), squares_on_the_grid(80, 8)])
    hw = np.full((len(boxes), 2), 256.0)
    layout = fit_anchors(boxes, hw, strides=[4, 8], sizes_per_level=[1, 1], ratios=[1.0])
    assert layout.sizes == [[20.0], [80.0]]
    assert best_possible_recall(boxes, hw, layout, thresholds=(0.99,)) == {0.99: 1.0}
    default = AnchorLayout([[32.0], [64.0]], [1.0], [4, 8])  # 20 px in 32: 0.39; 80 in 64: 0.64
    assert best_possible_recall(boxes, hw, default, thresholds=(0.7,)) == {0.7: 0.0}


def test_fitted_sizes_never_shrink_to_a_coarser_level_nor_below_the_stride():
    rng = np.random.default_rng(1)
    side = np.exp(rng.uniform(np.log(12), np.log(60), 300))
    xy = rng.uniform(0, 200, (300, 2))
    boxes = np.concatenate([xy, xy + side[:, None]], axis=1)
    hw = np.full((300, 2), 288.0)
    strides = [4, 8, 16, 32, 64]
    layout = fit_anchors(boxes, hw, strides=strides, sizes_per_level=[1] * 5, num_ratios=3)
    flat = [s[0] for s in layout.sizes]
    assert flat == sorted(flat) and all(s >= st for s, st in zip(flat, strides, strict=True))
    before = best_possible_recall(boxes, hw, AnchorLayout([[32], [64], [128], [256], [512]],
                                                          [0.5, 1.0, 2.0], strides))
    after = best_possible_recall(boxes, hw, layout)
    assert after[0.7] > before[0.7] and after[0.5] >= before[0.5]


def test_one_box_size_still_fills_every_level():
    boxes = squares_on_the_grid(40, 8, n=6)
    layout = fit_anchors(boxes, np.full((6, 2), 128.0), strides=[4, 8, 16, 32, 64], sizes_per_level=[1] * 5)
    assert layout.ratios == [1.0] and layout.sizes[0] == [40.0] and len(layout.sizes) == 5


def test_size_summary_quantiles():
    boxes = np.array([[0.0, 0.0, 10.0, 20.0], [0.0, 0.0, 30.0, 30.0]])
    summary = size_summary(boxes)
    assert summary["width"][0] == 10 and summary["width"][-1] == 30 and summary["height/width"][-1] == 2


@pytest.mark.parametrize("arch", ["faster_rcnn_r18_fpn", "faster_rcnn_r18_c4"])  # (vgg16: 4 s to build)
def test_rpn_levels_name_the_strides_of_the_built_model(arch):
    cfg = DetectorConfig(arch=arch, num_classes=2, backbone_weights=None)
    sizes, strides = rpn_levels(cfg)
    backbone = build_detector(cfg, load_pretrained=False).backbone
    assert strides == [info.stride for info in backbone.feature_info.values()]
    assert len(sizes) == len(strides)


def test_auto_anchors_cannot_build_a_model_outside_training():
    with pytest.raises(ValueError, match="fitted to the training data"):
        build_detector(DetectorConfig(arch="faster_rcnn_r18_fpn", rpn=RPNConfig(anchor_sizes="auto")),
                       load_pretrained=False)


def test_auto_anchors_are_fitted_when_training_starts_and_kept_in_the_checkpoint(tmp_path):
    from apps.config import build_experiment
    from apps.engine.trainer import train
    from apps.tasks import load_model
    from vision.data.coco import CocoDetection
    from vision.data.synthetic import make_shapes

    shapes = make_shapes("detection", tmp_path / "data", num_images=4, seed=0, image_size=(64, 96),
                         val_fraction=0.25)
    split = lambda name: {"images": str(shapes[name] / "images"),  # noqa: E731
                          "annotations": str(shapes[name] / "annotations.json")}
    model = {"arch": "faster_rcnn_r18_fpn", "frozen_bn": False, "min_size": 64, "max_size": 96,
             "fpn_channels": 16, "rpn": {"anchor_sizes": "auto", "aspect_ratios": "auto",
                                         "post_nms_top_n_train": 32, "post_nms_top_n_test": 16},
             "roi": {"representation_size": 16, "batch_size_per_image": 16, "detections_per_img": 10}}
    exp = build_experiment({"task": "detection", "model": model, "output_dir": str(tmp_path / "run"),
                            "data": {"train": split("train"), "val": None, "workers": 0},
                            "train": {"epochs": 1, "batch_size": 2, "lr": 0.001}, "device": "cpu"})
    train(exp)
    model = load_model(tmp_path / "run" / "last.pt").model  # rebuilt from the checkpoint alone
    generator = model.proposal_generator.anchor_generator
    train = CocoDetection(shapes["train"] / "images", shapes["train"] / "annotations.json")
    boxes, hw = train.instance_boxes()
    fitted_cfg, _ = resolve_auto_anchors(exp.model, boxes, hw)
    assert [list(s) for s in generator.sizes] == fitted_cfg.rpn.anchor_sizes
    assert list(generator.aspect_ratios[0]) == fitted_cfg.rpn.aspect_ratios
    log = (tmp_path / "run" / "train.log").read_text()
    assert f"model.rpn.anchor_sizes={fitted_cfg.rpn.anchor_sizes}" in log
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["model"]["rpn"]
    assert (saved["anchor_sizes"], saved["aspect_ratios"]) == (fitted_cfg.rpn.anchor_sizes,
                                                               fitted_cfg.rpn.aspect_ratios)


def test_data_check_reports_the_anchors_of_a_config(tmp_path, capsys):
    from apps.cli import main
    from vision.data.synthetic import make_shapes

    shapes = make_shapes("detection", tmp_path / "data", num_images=4, seed=1, image_size=(64, 96),
                         val_fraction=0.25)
    config = tmp_path / "det.yaml"
    config.write_text("task: detection\nmodel: {arch: faster_rcnn_r18_fpn, min_size: 128, max_size: 192,\n"
                      "  rpn: {anchor_sizes: [[16], [32], [64], [128], [256]]}}\n"
                      "data: {train: {images: nowhere, annotations: nowhere.json}}\n")
    args = ["data", "check", "--annotations", str(shapes["train"] / "annotations.json"),
            "--images", str(shapes["train"] / "images")]
    assert main([*args, "--config", str(config), "--json"]) == 0
    section = json.loads(capsys.readouterr().out)["anchors"]
    with open(shapes["train"] / "annotations.json") as f:
        boxes, hw = coco_boxes(json.load(f))
    expected = anchor_report(DetectorConfig(arch="faster_rcnn_r18_fpn", min_size=128, max_size=192,
                                            rpn=RPNConfig(anchor_sizes=[[16], [32], [64], [128], [256]])),
                             boxes, hw)
    assert section["boxes"] == len(boxes) and section["configured"]["anchor_sizes"] == [[16], [32], [64],
                                                                                           [128], [256]]
    assert section["configured"]["recall_grid"] == {str(k): v for k, v in expected.configured_grid.items()}
    assert section["fitted"]["anchor_sizes"] == expected.fitted.sizes
    assert section["sizes_model_input"] == expected.sizes_in_model  # (64-96 px images -> 128 px short side)
    assert section["sizes_model_input"]["sqrt(area)"][3] > 1.3 * section["sizes_annotated"]["sqrt(area)"][3]

    assert main(args) == 0  # no --config: the default Faster R-CNN (800 px), said as such
    text = capsys.readouterr().out
    assert "detector: no --config: the default Faster R-CNN (faster_rcnn_r50_fpn at min_size 800)" in text
    assert "min_size 800, max_size 1333" in text
    assert "suggested for the default Faster R-CNN only: model.rpn.anchor_sizes=[[" in text
    # ... and ends with the command that measures the user's own model
    assert text.rstrip().endswith(f"for your model's anchors and sizes: visiondet data check --annotations "
                                  f"{args[3]} --images {args[5]} --config YOUR_CONFIG.yaml")
    assert main([*args, "--config", str(config)]) == 0
    assert "YOUR_CONFIG" not in capsys.readouterr().out

    config.write_text("task: classification\nmodel: {backbone: resnet18}\ndata: {train: {root: x}}\n")
    assert main([*args, "--config", str(config)]) == 2
    assert "has no anchors" in capsys.readouterr().err
    rcnn = Path(__file__).parent.parent / "configs" / "detection" / "rcnn_r18_shapes.yaml"
    config.write_text(f"base: {rcnn}\n")
    assert main([*args, "--config", str(config)]) == 2
    assert "rcnn_r18 has no anchors" in capsys.readouterr().err
