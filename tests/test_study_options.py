"""Every option an ablation study (benchmarks/ablation_studies.py) toggles reaches the model or the pipeline:
GroupNorm in the RPN and box heads, dropout in the FPN box head (training only), batch norm trained or
frozen, the mosaic composite (boxes inside the image, on their objects), the one-cycle schedule, and early
stopping under a time budget. (``anchor_sizes: auto``: tests/test_anchor_fit.py; ``train.amp``:
tests/test_engine_amp.py.)"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from support.engine import budget_config
from torch import nn

from apps.config import ConfigError, TrainConfig, build_experiment
from apps.engine.schedule import ONECYCLE_START, lr_factor
from apps.engine.trainer import train
from detection.models import DetectorConfig, RoIConfig, build_detector
from detection.roi_heads import TwoMLPHead
from vision.checkpoint import load_checkpoint
from vision.data.coco import CocoDetection
from vision.data.transforms import build_transforms
from vision.layers import FrozenBatchNorm2d

SMALL_RPN = {"anchor_sizes": [[16], [32], [64], [128], [256]], "pre_nms_top_n_train": 50,
             "post_nms_top_n_train": 20}
SMALL_ROI = {"representation_size": 64, "batch_size_per_image": 16}


@pytest.fixture
def small_detector(tiny_detector):
    """The factory ``small_detector(rpn=..., roi=..., **fields)``: a tiny Faster R-CNN, every stage trainable,
    with the options under test (``rpn`` and ``roi`` fields join the small sections)."""

    def build(rpn: dict | None = None, roi: dict | None = None, **fields) -> nn.Module:
        return tiny_detector(freeze_at=0, rpn={**SMALL_RPN, **(rpn or {})}, roi={**SMALL_ROI, **(roi or {})},
                             **fields)

    return build


def one_training_forward(model: nn.Module) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    images = [torch.rand(3, 64, 80), torch.rand(3, 72, 64)]
    targets = [{"boxes": torch.tensor([[8.0, 8.0, 40.0, 40.0]]), "labels": torch.tensor([1])},
               {"boxes": torch.tensor([[20.0, 10.0, 50.0, 60.0]]), "labels": torch.tensor([2])}]
    model.train()
    _, losses = model(images, targets)
    return losses


# ---- GroupNorm in the heads ------------------------------------------------------------------------------


def test_group_norm_in_the_rpn_and_box_heads_runs_in_the_forward(small_detector):
    model = small_detector(rpn={"norm": "gn"}, roi={"norm": "gn"})
    rpn_norms = [m for m in model.proposal_generator.head.modules() if isinstance(m, nn.GroupNorm)]
    box_norms = [m for m in model.roi_heads.box_head.modules() if isinstance(m, nn.GroupNorm)]
    assert len(rpn_norms) == 1 and len(box_norms) == 2
    assert rpn_norms[0].num_channels == 16 and box_norms[0].num_channels == 64
    assert box_norms[0].num_groups == 32 and rpn_norms[0].num_groups == 16  # gcd(32, 16): 16 groups
    called = []
    for norm in rpn_norms + box_norms:
        norm.register_forward_hook(lambda module, args, out: called.append(out.shape))
    losses = one_training_forward(model)
    assert all(torch.isfinite(v) for v in losses.values())
    assert len(called) == 5 + 2  # the RPN head's norm on each of the 5 levels, the box head's two
    # without the option nothing of it is built, and the state dict is the plain heads'
    plain = small_detector()
    assert not any(isinstance(m, nn.GroupNorm) for m in plain.modules())
    extra = set(model.state_dict()) - set(plain.state_dict())
    assert extra and all(".norm" in k for k in extra) and set(plain.state_dict()) <= set(model.state_dict())


def test_group_norm_normalises_each_region_of_the_box_head():
    head = TwoMLPHead(12, 256, norm="gn")
    x = torch.randn(5, 3, 2, 2) * 7 + 3
    before_relu = []
    # (cloned: the ReLU after it works in place)
    head.norm6.register_forward_hook(lambda module, args, out: before_relu.append(out.clone()))
    head(x)
    groups = before_relu[0].reshape(5, 32, 8)  # 32 groups of 8 features per region
    torch.testing.assert_close(groups.mean(-1), torch.zeros(5, 32), atol=1e-4, rtol=0)
    assert (groups.var(-1, unbiased=False) > 0.9).all()  # 1 less GroupNorm's epsilon


def test_group_norm_in_v2s_conv_head_replaces_its_batch_norms():
    cfg = DetectorConfig(arch="faster_rcnn_r50_fpn_v2", num_classes=2, backbone_weights=None,
                         roi=RoIConfig(norm="gn"))
    head = build_detector(cfg).roi_heads.box_head
    kinds = {type(m) for m in head.convs}
    assert nn.GroupNorm in kinds and nn.BatchNorm2d not in kinds


# ---- dropout in the box head -----------------------------------------------------------------------------


def test_box_head_dropout_is_active_in_training_only():
    torch.manual_seed(0)
    head = TwoMLPHead(12, 256, dropout=0.5)
    plain = TwoMLPHead(12, 256)
    plain.load_state_dict(head.state_dict())  # no dropout state: the same checkpoint loads into both
    x = torch.randn(40, 3, 2, 2)
    head.train()
    first, second = head(x), head(x)
    assert not torch.equal(first, second)
    plain.train()
    full = plain(x)
    # dropout zeroes features the plain head keeps, and scales the kept ones by 1 / (1 - p)
    assert (first == 0).float().mean() > (full == 0).float().mean() + 0.2
    head.eval()
    plain.eval()
    torch.testing.assert_close(head(x), plain(x))
    torch.testing.assert_close(head(x), head(x))


def test_box_head_dropout_comes_from_the_config_and_only_where_a_head_has_room(small_detector):
    model = small_detector(roi={"mlp_dropout": 0.3})
    dropout = model.roi_heads.box_head.dropout
    assert isinstance(dropout, nn.Dropout) and dropout.p == 0.3
    assert isinstance(small_detector().roi_heads.box_head.dropout, nn.Identity)
    with pytest.raises(ValueError, match="options of the FPN box heads"):
        build_detector(DetectorConfig(arch="faster_rcnn_vgg16", num_classes=2, backbone_weights=None,
                                      roi=RoIConfig(mlp_dropout=0.3)))


# ---- batch norm trained or frozen ------------------------------------------------------------------------


def test_batch_norm_trains_its_statistics_unless_frozen(small_detector):
    trained = small_detector(frozen_bn=False)
    bns = [m for m in trained.backbone.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and not any(isinstance(m, FrozenBatchNorm2d) for m in trained.backbone.modules())
    before = bns[0].running_mean.clone()
    one_training_forward(trained)
    assert not torch.equal(before, bns[0].running_mean)
    frozen = small_detector(frozen_bn=True)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in frozen.backbone.modules())
    fbns = [m for m in frozen.backbone.modules() if isinstance(m, FrozenBatchNorm2d)]
    assert fbns and not any(p.requires_grad for m in fbns for p in m.parameters())
    state = {k: v.clone() for k, v in frozen.backbone.state_dict().items()}
    one_training_forward(frozen)
    assert all(torch.equal(state[k], v) for k, v in frozen.backbone.state_dict().items())


# ---- the mosaic composite --------------------------------------------------------------------------------

COLOURS = {1: (230, 20, 20), 2: (20, 20, 230)}  # label -> the colour its objects are painted
CROWD = (20, 230, 20)
BACKGROUNDS = (40, 90, 160, 210)  # one grey per image: a composite shows several


def shapes_set(tmp_path):
    """Four PNGs of distinct greys with solid red (category 5) and blue (category 9) rectangles, one
    green crowd region; the categories' ids are not their labels."""
    rng = np.random.default_rng(0)
    images, annotations = [], []
    (tmp_path / "images").mkdir()
    for i, grey in enumerate(BACKGROUNDS):
        h, w = 90 + 10 * i, 120 - 10 * i
        canvas = np.full((h, w, 3), grey, np.uint8)
        placed = []
        for j in range(3):
            label = 1 + (i + j) % 2
            x, y = 5 + 38 * j, int(rng.integers(5, h - 35))
            bw, bh = 30, int(rng.integers(15, 30))
            canvas[y:y + bh, x:x + bw] = COLOURS[label]
            placed.append((label, [x, y, bw, bh], 0))
        if i == 1:
            canvas[h - 20:h - 5, w - 40:w - 5] = CROWD
            placed.append((1, [w - 40, h - 20, 35, 15], 1))
        Image.fromarray(canvas).save(tmp_path / "images" / f"{i}.png")
        images.append({"id": i + 1, "file_name": f"{i}.png", "width": w, "height": h})
        for label, box, crowd in placed:
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1,
                                "category_id": 5 if label == 1 else 9, "bbox": box, "area": box[2] * box[3],
                                "iscrowd": crowd})
    coco = {"images": images, "annotations": annotations,
            "categories": [{"id": 9, "name": "blue"}, {"id": 5, "name": "red"}]}
    (tmp_path / "annotations.json").write_text(json.dumps(coco))
    return tmp_path / "images", tmp_path / "annotations.json"


def region_colour_share(image: np.ndarray, box: np.ndarray, colour) -> float:
    # the whole pixels inside the box (its edges were resampled, and blend into the neighbours)
    x0, y0, x1, y1 = math.ceil(box[0]), math.ceil(box[1]), math.floor(box[2]), math.floor(box[3])
    region = image[y0:y1, x0:x1].astype(int)
    if region.size == 0:
        return 1.0  # under a pixel: nothing to look at
    return float((np.abs(region - np.array(colour)).sum(-1) < 60).mean())


def test_mosaic_boxes_stay_inside_the_image_and_on_their_objects(tmp_path):
    images, annotations = shapes_set(tmp_path)
    spec = [{"name": "Mosaic", "p": 1.0, "target_size": [150, 150], "cell_shape": [100, 100], "fill": 128},
            {"name": "HorizontalFlip", "p": 0.5}]
    data = CocoDetection(images, annotations, transforms=build_transforms(spec, "detection", True,
                                                                          min_visibility=0.3))
    composites = boxes_seen = crowd_seen = 0
    for seed in range(12):
        torch.manual_seed(seed)
        image, target = data[seed % len(data)]
        pixels = (image.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
        h, w = pixels.shape[:2]
        assert (h, w) == (150, 150)
        greys = {g for g in BACKGROUNDS if (np.abs(pixels.astype(int) - g).sum(-1) < 6).mean() > 0.02}
        composites += len(greys) >= 2
        for box, label in zip(target["boxes"].numpy(), target["labels"].tolist(), strict=True):
            assert 0 <= box[0] < box[2] <= w and 0 <= box[1] < box[3] <= h
            assert label in (1, 2)  # contiguous labels of categories 5 and 9, from whichever image
            assert region_colour_share(pixels, box, COLOURS[label]) > 0.8, (seed, box, label)
            boxes_seen += 1
        for box in target["crowd_boxes"].numpy():
            assert 0 <= box[0] < box[2] <= w and 0 <= box[1] < box[3] <= h
            assert region_colour_share(pixels, box, CROWD) > 0.8
            crowd_seen += 1
    assert composites >= 10 and boxes_seen >= 30 and crowd_seen >= 1


def test_mosaic_is_refused_where_nothing_can_supply_its_other_images(tmp_path):
    spec = [{"name": "Mosaic", "p": 1.0}]
    with pytest.raises(ValueError, match="cannot carry proposals"):
        build_transforms(spec, "detection", True, extra_boxes=("proposals",))
    with pytest.raises(ValueError, match="cannot carry segmentation"):
        build_transforms(spec, "segmentation", True)


# ---- the one-cycle schedule ------------------------------------------------------------------------------


def test_one_cycle_rises_to_the_peak_then_anneals():
    cfg = TrainConfig(epochs=1, scheduler="onecycle", pct_start=0.25, min_lr_ratio=0.0)
    factors = [lr_factor(s, cfg, 100) for s in range(101)]
    assert factors[0] == pytest.approx(ONECYCLE_START) and factors[25] == pytest.approx(1.0)
    assert factors[100] == pytest.approx(0.0, abs=1e-12)
    # cosine halves: half way up and half way down
    rise = (1 - math.cos(math.pi * 12 / 25)) / 2
    assert factors[12] == pytest.approx(ONECYCLE_START + (1 - ONECYCLE_START) * rise)
    assert factors[25 + 75 // 2] == pytest.approx((1 + math.cos(math.pi * 37 / 75)) / 2)
    assert all(a < b for a, b in zip(factors[:25], factors[1:26], strict=True))
    assert all(a > b for a, b in zip(factors[25:100], factors[26:], strict=True))


def test_one_cycle_is_a_config_choice_with_a_checked_pct_start():
    cfg = {"task": "classification", "model": {}, "data": {"train": {"root": "x"}},
           "train": {"scheduler": "onecycle", "pct_start": 0.4}}
    assert build_experiment(cfg).train.scheduler == "onecycle"
    with pytest.raises(ConfigError, match="train.pct_start"):
        build_experiment({**cfg, "train": {"scheduler": "onecycle", "pct_start": 1.0}})


# ---- early stopping under a time budget ------------------------------------------------------------------


def test_patience_stops_a_budgeted_run_early_and_saves_the_rest_of_the_budget(tmp_path, clock):
    # the toy task's fake clock: 1 s a batch, 3 s an evaluation, 4 steps an epoch. With an lr that cannot
    # change the predictions the first evaluation stays the best: 2 more without progress stop the run
    cfg = budget_config(tmp_path, "patient")
    cfg["train"].update(lr=1e-12, patience=2)
    result = train(build_experiment(cfg))
    state = load_checkpoint(tmp_path / "patient" / "last.pt")["train_state"]
    assert result.status == "early_stopped" and state["step"] == 12 and state["bad_evals"] == 2
    assert state["time_budget"]["elapsed"] == pytest.approx(12 + 3 * 3)  # of 60 s; 56 s without patience
    assert "early stopping" in (tmp_path / "patient" / "train.log").read_text()
