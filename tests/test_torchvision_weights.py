"""torchvision's Faster R-CNN (random weights, no download) converted into ours gives the same detections."""

import pytest
import torch
import torchvision

from apps.cli import main as cli_main
from apps.tasks import load_model
from detection.models import build_detector
from detection.torchvision_weights import (
    COCO_CATEGORIES,
    COCO_CLASSES,
    convert_torchvision_state_dict,
    load_torchvision_detector,
    torchvision_config,
)
from vision.checkpoint import CheckpointError, load_checkpoint

COCO_IDS = torch.tensor([0] + [i for i, _ in COCO_CATEGORIES])
# small and cheap, identical on both sides; a threshold just under 1/91 keeps some random-init detections
SIZE, SCORE_THRESH = 256, 0.0112


def _torchvision_model(builder, post_nms):
    torch.manual_seed(0)
    return builder(
        weights=None, weights_backbone=None, min_size=SIZE, max_size=SIZE, box_score_thresh=SCORE_THRESH,
        box_detections_per_img=100000, rpn_post_nms_top_n_test=post_nms,
    ).eval()  # fmt: skip


def _ours(arch, state, post_nms):
    cfg = torchvision_config(arch, min_size=SIZE, max_size=SIZE)
    cfg.roi.score_thresh = SCORE_THRESH
    cfg.roi.detections_per_img = 100000
    cfg.rpn.post_nms_top_n_test = post_nms
    model = build_detector(cfg, load_pretrained=False).eval()
    model.load_state_dict(convert_torchvision_state_dict(state, arch))
    return model


def _sorted_rows(labels, scores, boxes):
    rows = torch.cat((labels[:, None].double(), scores[:, None].double(), boxes.double()), dim=1)
    return rows[sorted(range(len(rows)), key=lambda i: tuple(rows[i].tolist()))]


def _assert_same_detections(theirs, ours):
    # torchvision also reports the 10 unused COCO ids ("N/A"); ours never predicts them, and per-class NMS
    # and a cap that never binds make every other detection independent of them.
    real = torch.isin(theirs["labels"], COCO_IDS[1:])
    assert real.sum() > 10, "too few detections for a meaningful comparison"
    a = _sorted_rows(theirs["labels"][real], theirs["scores"][real], theirs["boxes"][real])
    b = _sorted_rows(COCO_IDS[ours.labels], ours.scores, ours.boxes)
    assert a.shape == b.shape  # same count
    assert torch.equal(a[:, 0], b[:, 0])  # same labels
    assert (a[:, 1] - b[:, 1]).abs().max() <= 1e-4
    assert (a[:, 2:] - b[:, 2:]).abs().max() <= 1e-3


@pytest.mark.parametrize(
    "arch, builder, num_images, post_nms",
    [
        # two images of different sizes: resizing, padding and mapping back all take part
        ("faster_rcnn_r50_fpn", torchvision.models.detection.fasterrcnn_resnet50_fpn, 2, 300),
        # v2's conv box head costs ~40x more per region: one image, fewer proposals
        ("faster_rcnn_r50_fpn_v2", torchvision.models.detection.fasterrcnn_resnet50_fpn_v2, 1, 100),
    ],
)
def test_same_detections_as_torchvision(arch, builder, num_images, post_nms):
    theirs_model = _torchvision_model(builder, post_nms)
    ours_model = _ours(arch, theirs_model.state_dict(), post_nms)
    torch.manual_seed(1)
    images = [torch.rand(3, 200, 256), torch.rand(3, 256, 160)][:num_images]
    with torch.inference_mode():
        theirs = theirs_model(images)
        ours, losses = ours_model(images)
    assert losses == {}
    for t, o in zip(theirs, ours, strict=True):
        _assert_same_detections(t, o)


def test_convert_command_writes_a_coco_checkpoint(tmp_path):
    torch.manual_seed(0)
    tv = torchvision.models.detection.fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None)
    src = tmp_path / "fasterrcnn_resnet50_fpn.pth"
    torch.save(tv.state_dict(), src)
    dst = tmp_path / "out" / "frcnn.pt"
    assert (
        cli_main(
            [
                "convert",
                "--from",
                "torchvision",
                str(src),
                "--model",
                "faster_rcnn_r50_fpn",
                "--out",
                str(dst),
            ]
        )
        == 0
    )
    ckpt = load_checkpoint(dst)
    assert ckpt["task"] == "detection" and ckpt["classes"] == COCO_CLASSES and len(ckpt["classes"]) == 80
    assert ckpt["classes"][11] == {"id": 13, "name": "stop sign"}  # label 12 is COCO id 13 (12 is unused)
    assert ckpt["model"]["arch"] == "faster_rcnn_r50_fpn" and ckpt["model"]["void_classes"] == 10
    # the person row of torchvision's classifier is our label 1, the stop-sign row (id 13) our label 12
    w = ckpt["state_dict"]["roi_heads.box_predictor.cls_score.weight"]
    assert torch.equal(w[1], tv.roi_heads.box_predictor.cls_score.weight[1])
    assert torch.equal(w[12], tv.roi_heads.box_predictor.cls_score.weight[13])
    # the checkpoint rebuilds through the same path as trained ones (predict, evaluate, demo)
    loaded = load_model(dst)
    assert loaded.task.name == "detection" and loaded.classes[0] == {"id": 1, "name": "person"}
    loaded.model.transform.min_size, loaded.model.transform.max_size = (64,), 80  # keep the test fast
    with torch.inference_mode():
        outputs, _ = loaded.model([torch.rand(3, 64, 80)])
    assert outputs[0].boxes.shape[1] == 4


def test_convert_refuses_other_files(tmp_path):
    bad = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(1)}, bad)
    with pytest.raises(CheckpointError, match="resnet.pth.*unexpected keys"):
        load_torchvision_detector(bad)
    with pytest.raises(CheckpointError, match="missing.pth: no such"):
        load_torchvision_detector(tmp_path / "missing.pth")
    with pytest.raises(ValueError, match="supported"):
        torchvision_config("faster_rcnn_vgg16")
