"""Fast R-CNN: the paper's config, hierarchical sampling, the multi-task loss, truncated SVD, a tiny run."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import box_iou

from apps.config import from_dict, load_yaml_with_bases
from detection.boxes import BoxCoder
from detection.fast_rcnn import compress_fc_layers, truncated_svd_linear
from detection.models import DetectorConfig, build_detector
from detection.proposals import (
    ProposalFile,
    ProposalRecord,
    image_sha1,
    to_uint8_image,
    write_proposal_file,
)
from detection.roi_heads import TwoMLPHead

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "detection"


def _paper_config(**model) -> DetectorConfig:
    """fast_rcnn_vgg16.yaml's model section on a small ResNet-18 FPN body (same RoI sampling and loss)."""
    data = load_yaml_with_bases(CONFIGS / "fast_rcnn_vgg16.yaml")["model"]
    data.update(arch="fast_rcnn_r18_fpn", backbone_weights=None, min_size=64, max_size=128, proposals=None,
                fpn_channels=32, roi={**data["roi"], "pooler": None, "representation_size": 64})
    data.update(model)
    return from_dict(DetectorConfig, data)


def test_paper_config_has_the_papers_settings():
    raw = load_yaml_with_bases(CONFIGS / "fast_rcnn_vgg16.yaml")
    cfg = from_dict(DetectorConfig, raw["model"])
    assert cfg.arch == "fast_rcnn_vgg16" and cfg.proposals.method == "selective_search"
    assert (cfg.roi.pooler, cfg.roi.output_size) == ("pool", 7)
    assert (cfg.roi.batch_size_per_image, cfg.roi.positive_fraction) == (64, 0.25)
    assert (cfg.roi.fg_iou_thresh, cfg.roi.bg_iou_lo, cfg.roi.bg_iou_hi) == (0.5, 0.1, 0.5)
    assert raw["train"]["batch_size"] == 2 and cfg.min_size == 600


def _proposals_with_known_iou() -> tuple[torch.Tensor, torch.Tensor]:
    """Ground truth [0, 0, 100, 100] and 180 proposals: 40 foreground (IoU >= 0.5), 100 background in
    [0.1, 0.5) and 40 below 0.1, which Fast R-CNN never samples."""
    fg = torch.tensor([[float(d), 0.0, 100.0 + d, 100.0] for d in range(0, 40)])  # IoU (100-d)/(100+d)
    bg = torch.tensor([[float(d), 0.0, 100.0 + d, 100.0] for d in np.linspace(40, 80, 100)])  # 0.43..0.11
    far = torch.tensor([[200.0 + d, 200.0, 260.0 + d, 260.0] for d in range(40)])  # IoU 0
    return torch.tensor([[0.0, 0.0, 100.0, 100.0]]), torch.cat([fg, bg, far]).float()


def test_hierarchical_sampling_2_images_64_rois_quarter_foreground():
    torch.manual_seed(0)
    model = build_detector(_paper_config(num_classes=3))
    gt, proposals = _proposals_with_known_iou()
    targets = [{"boxes": gt, "labels": torch.tensor([2])}] * 2  # N = 2 images per batch
    regions, labels, box_targets = model.roi_heads.sample_regions([proposals, proposals], targets)
    assert [len(r) for r in regions] == [64, 64] and labels.shape == (128,)

    for image_regions, image_labels in zip(regions, labels.split(64), strict=True):
        iou = box_iou(image_regions, gt)[:, 0]
        assert int((image_labels == 2).sum()) == 16 and int((image_labels == 0).sum()) == 48
        assert (iou[image_labels == 2] >= 0.5).all()
        assert ((iou[image_labels == 0] >= 0.1) & (iou[image_labels == 0] < 0.5)).all()  # never the far ones
    fg_targets = box_targets[labels > 0]
    expected = BoxCoder((10.0, 10.0, 5.0, 5.0)).encode(gt.expand(16, 4), regions[0][:16])
    assert torch.allclose(fg_targets[:16], expected)


def test_multi_task_loss_hand_computed():
    model = build_detector(_paper_config(num_classes=3))
    predictor = model.roi_heads.box_predictor
    for p in predictor.parameters():
        nn.init.zeros_(p)  # every class logit 0, every delta 0
    model.train()
    gt = torch.tensor([[0.0, 0.0, 40.0, 40.0]])
    proposal = torch.tensor([[4.0, 0.0, 44.0, 40.0]])  # IoU 36/44 = 0.82: foreground, dx = 0.1
    image = torch.rand(3, 64, 64)
    model.roi_heads.add_gt_as_proposals = False
    _, losses = model([image], [{"boxes": gt, "labels": torch.tensor([1])}], proposals=[proposal])
    assert set(losses) == {"loss_classifier", "loss_box_reg"}  # no RPN in Fast R-CNN
    assert losses["loss_classifier"].item() == pytest.approx(math.log(4), rel=1e-5)  # uniform over K + 1
    # target dx = 10 * (-4 / 40) = -1 (in resized pixels the shift and width scale alike); others 0.
    # smooth L1 with beta 1: 0.5 * 1 ** 2 / beta - 0 = ... |x| >= beta gives |x| - 0.5 beta = 0.5, over R = 1
    assert losses["loss_box_reg"].item() == pytest.approx(0.5, rel=1e-4)
    loss = F.smooth_l1_loss(torch.tensor([0.0]), torch.tensor([-1.0]), beta=1.0)
    assert loss.item() == 0.5


def test_truncated_svd_hand_computed():
    layer = nn.Linear(3, 3)
    with torch.no_grad():
        layer.weight.copy_(torch.diag(torch.tensor([3.0, 2.0, 1.0])))
        layer.bias.copy_(torch.tensor([0.5, 0.0, -0.5]))
    x = torch.ones(1, 3)
    # rank 2 drops the smallest singular value: W' = diag(3, 2, 0)
    assert torch.allclose(truncated_svd_linear(layer, 2)(x), torch.tensor([[3.5, 2.0, -0.5]]), atol=1e-6)
    assert torch.allclose(truncated_svd_linear(layer, 3)(x), layer(x), atol=1e-6)
    with pytest.raises(ValueError, match="rank"):
        truncated_svd_linear(layer, 4)


def test_compress_fc_layers_keeps_low_rank_heads_exact_and_saves_work():
    torch.manual_seed(0)
    head = TwoMLPHead(64 * 4, 128)
    with torch.no_grad():  # make fc6 exactly rank 16 and fc7 rank 8
        head.fc6.weight.copy_(torch.randn(128, 16) @ torch.randn(16, 256) / 16)
        head.fc7.weight.copy_(torch.randn(128, 8) @ torch.randn(8, 128) / 8)
    x = torch.randn(5, 64, 2, 2)
    before = head(x)
    params_before = sum(p.numel() for p in head.parameters())
    compress_fc_layers(head, fc6_rank=16, fc7_rank=8)
    assert isinstance(head.fc6, nn.Sequential) and head.fc6[0].weight.shape == (16, 256)
    assert torch.allclose(head(x), before, atol=1e-4)
    assert sum(p.numel() for p in head.parameters()) < params_before / 4
    untouched = TwoMLPHead(8, 4)
    compress_fc_layers(untouched, fc6_rank=4, fc7_rank=4)  # would cost more than it saves: left alone
    assert isinstance(untouched.fc6, nn.Linear)


def test_tiny_fast_rcnn_trains_and_predicts_from_a_proposal_file(tmp_path):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    images, targets, records = [], [], []
    for i in range(4):
        image = torch.rand(3, 64, 80, generator=g) * 0.2
        x = 8 + 10 * i
        image[:, 16:48, x:x + 32] = 0.9  # one bright square per image
        box = torch.tensor([[float(x), 16.0, x + 32.0, 48.0]])
        images.append(image)
        targets.append({"boxes": box, "labels": torch.tensor([1])})
        jitter = box + torch.randn(30, 4, generator=g) * 6
        background = torch.tensor([[0.0, 0.0, 20.0, 20.0], [50.0, 40.0, 80.0, 64.0], [0.0, 30.0, 30.0, 64.0]])
        boxes = torch.cat([jitter, background]).clamp(0, 64).numpy()
        records.append(ProposalRecord(i, boxes, sha1=image_sha1(to_uint8_image(image))))
    path = write_proposal_file(tmp_path / "props.npz", records)
    cfg = _paper_config(num_classes=1, proposals={"method": "file", "file": str(path)})
    model = build_detector(cfg)
    with pytest.raises(ValueError, match="needs them with the data"):  # never looked up from augmented pixels
        model.train()(images[:2], targets[:2])
    for i, target in enumerate(targets):  # in training, proposals come with the data (by image id)
        target["proposals"] = ProposalFile(path).propose(None, i)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    model.train()
    first = None
    for step in range(6):
        batch = [(step * 2) % 4, (step * 2 + 1) % 4]  # two images per batch, as the paper samples
        _, losses = model([images[i] for i in batch], [targets[i] for i in batch])
        total = sum(losses.values())
        first = first if first is not None else total.item()
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
    assert math.isfinite(total.item()) and total.item() < first
    model.eval()
    with torch.no_grad():
        detections, losses = model([images[0]])  # proposals found in the file by the image's pixels
    assert losses == {} and len(detections) == 1
    det = detections[0]
    assert det.boxes.shape[1] == 4 and len(det) > 0
    assert det.boxes[:, 2].max() <= 80 and det.boxes[:, 3].max() <= 64  # the input image's own pixels
