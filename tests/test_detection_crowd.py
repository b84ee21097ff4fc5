"""Crowd regions are ignored, not background: hand-made anchors / proposals against a hand-made crowd box.

Shared scene (pixels): crowd region [0, 0, 40, 40]; one real object [20, 20, 40, 40] lying inside it.
Boxes tried, with their IoU against the object and their IoF (intersection over the box's own area)
against the crowd region:
    b0 [0, 0, 10, 10]    IoU 0       IoF 1.0    background -> ignored
    b1 [22, 20, 40, 40]  IoU 0.9     IoF 1.0    foreground: it matches a real box, stays positive
    b2 [30, 0, 50, 20]   IoU 0       IoF 0.5    background -> ignored (IoF >= 0.5)
    b3 [35, 35, 55, 55]  IoU 25/775  IoF 0.0625 background, stays background
    b4 [60, 60, 80, 80]  IoU 0       IoF 0      background
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torchvision.ops import box_iou

from apps.tasks.detection import DetectionTask
from detection.anchors import AnchorGenerator
from detection.boxes import BACKGROUND, FOREGROUND, IGNORE, box_iof, ignore_crowd
from detection.rcnn_stages import BoxRegressionConfig, _Negatives, extract_features
from detection.roi_heads import BoxPredictor, RoIHeads
from detection.rpn import RegionProposalNetwork, RPNHead
from detection.transform import DetectionTransform
from vision.checkpoint import load_checkpoint
from vision.data.transforms import augment_detection, build_transforms

CROWD = torch.tensor([[0.0, 0.0, 40.0, 40.0]])
GT = torch.tensor([[20.0, 20.0, 40.0, 40.0]])
BOXES = torch.tensor([
    [0.0, 0.0, 10.0, 10.0],
    [22.0, 20.0, 40.0, 40.0],
    [30.0, 0.0, 50.0, 20.0],
    [35.0, 35.0, 55.0, 55.0],
    [60.0, 60.0, 80.0, 80.0],
])


def test_iof_hand_computed():
    iof = box_iof(BOXES, torch.cat([CROWD, torch.tensor([[0.0, 0.0, 5.0, 100.0]])]))
    expected = torch.tensor([[1.0, 0.5], [1.0, 0.0], [0.5, 0.0], [0.0625, 0.0], [0.0, 0.0]])
    assert torch.allclose(iof, expected)
    # a zero-area box has no intersection to divide: 0, not NaN
    assert box_iof(torch.tensor([[5.0, 5.0, 5.0, 9.0]]), CROWD).item() == 0.0


def test_ignore_crowd_turns_only_background_inside_crowds_to_ignore():
    labels = torch.tensor([BACKGROUND, FOREGROUND, BACKGROUND, BACKGROUND, IGNORE])
    out = ignore_crowd(labels, BOXES, CROWD, 0.5)
    assert out.tolist() == [IGNORE, FOREGROUND, IGNORE, BACKGROUND, IGNORE]
    assert labels[0] == BACKGROUND  # the input is left alone
    assert ignore_crowd(labels, BOXES, CROWD, 0.51).tolist()[2] == BACKGROUND  # IoF 0.5 is below 0.51
    assert ignore_crowd(labels, BOXES, torch.zeros(0, 4), 0.5) is labels


def _rpn(**kwargs) -> RegionProposalNetwork:
    return RegionProposalNetwork(AnchorGenerator([[32]], [[1.0]]), RPNHead(4, 1), in_features=["p"], **kwargs)


def test_rpn_anchor_labels_ignore_crowd_negatives_and_keep_matches():
    rpn = _rpn()
    target = {"boxes": GT, "labels": torch.tensor([1]), "crowd_boxes": CROWD}
    _, labels = rpn.label_anchors(BOXES, target)
    assert labels.tolist() == [IGNORE, FOREGROUND, IGNORE, BACKGROUND, BACKGROUND]
    _, plain = rpn.label_anchors(BOXES, {"boxes": GT, "labels": torch.tensor([1])})
    assert plain.tolist() == [BACKGROUND, FOREGROUND, BACKGROUND, BACKGROUND, BACKGROUND]
    _, off = _rpn(ignore_iof_thresh=1.01).label_anchors(BOXES, target)  # above 1: crowds are background
    assert off.tolist() == plain.tolist()


def test_rpn_loss_samples_no_anchor_inside_a_crowd():
    rpn = _rpn()
    seen = []
    original = rpn.sampler.__call__

    class Recording(type(rpn.sampler)):
        def __call__(self, labels):
            pos, neg = original(labels)
            seen.append((pos.tolist(), sorted(neg.tolist())))
            return pos, neg

    rpn.sampler.__class__ = Recording
    objectness = torch.zeros(1, len(BOXES), requires_grad=True)
    deltas = torch.zeros(1, len(BOXES), 4)
    target = {"boxes": GT, "labels": torch.tensor([1]), "crowd_boxes": CROWD}
    losses = rpn.losses(objectness, deltas, BOXES, [target])
    assert seen == [([1], [3, 4])]
    losses["loss_objectness"].backward()
    assert objectness.grad[0, [0, 2]].tolist() == [0.0, 0.0]  # ignored anchors get no gradient
    assert (objectness.grad[0, [1, 3, 4]] != 0).all()


def test_roi_sampling_ignores_background_proposals_inside_crowds():
    heads = RoIHeads(nn.Identity(), nn.Identity(), BoxPredictor(4, 2), batch_size_per_image=512)
    target = {"boxes": GT, "labels": torch.tensor([2]), "crowd_boxes": CROWD}
    regions, labels, _ = heads.sample_regions([BOXES], [target])
    # foreground first (b1 and the ground truth added as a proposal), then background b3, b4
    got = sorted(zip(labels.tolist(), [tuple(r) for r in regions[0].tolist()], strict=True))
    assert got == sorted([(2, (22.0, 20.0, 40.0, 40.0)), (2, (20.0, 20.0, 40.0, 40.0)),
                          (0, (35.0, 35.0, 55.0, 55.0)), (0, (60.0, 60.0, 80.0, 80.0))])
    _, plain, _ = heads.sample_regions([BOXES], [{"boxes": GT, "labels": torch.tensor([2])}])
    assert sorted(plain.tolist()) == [0, 0, 0, 0, 2, 2]  # b0 and b2 are background without the crowd


def test_rcnn_finetuning_ignores_background_regions_inside_crowds(tiny_detector):
    rcnn = {"feature_map": "c4", "input_size": 32, "context_padding": 4, "batch_size": 64}
    model = tiny_detector("rcnn_r18", frozen_bn=False, freeze_at=0, rcnn=rcnn,
                          roi={"output_size": 2, "representation_size": 8})
    seen = []
    model.roi_heads.cnn.head.register_forward_hook(lambda m, i, o: seen.append(len(o)))
    target = {"boxes": GT, "labels": torch.tensor([2]), "proposals": BOXES}
    model([torch.rand(3, 80, 80)], [dict(target, crowd_boxes=CROWD)])
    model([torch.rand(3, 80, 80)], [target])
    assert seen == [4, 6]  # b1 + gt + b3 + b4; without the crowd b0 and b2 too


def test_svm_negatives_leave_out_crowd_regions(tmp_path, tiny_detector):
    # the features stage computes each proposal's crowd flag; the expected negatives come from the boxes here
    torch.manual_seed(0)
    model = tiny_detector("rcnn_r18", frozen_bn=False, freeze_at=0,
                          rcnn={"feature_map": "c4", "input_size": 32, "context_padding": 4},
                          roi={"output_size": 2, "representation_size": 8})
    target = {"boxes": GT, "labels": torch.tensor([2]), "crowd_boxes": CROWD, "proposals": BOXES}
    image = torch.rand(3, 80, 80)
    (path,) = extract_features(model, [(image, target)], tmp_path, BoxRegressionConfig(), lambda _: None)
    record = load_checkpoint(path)
    corner = torch.maximum(BOXES[:, None, :2], CROWD[None, :, :2])
    far = torch.minimum(BOXES[:, None, 2:], CROWD[None, :, 2:])
    inside = (far - corner).clamp(min=0).prod(dim=2).max(dim=1).values  # area in a crowd region
    own = (BOXES[:, 2:] - BOXES[:, :2]).prod(dim=1)
    iou = box_iou(BOXES, GT[:1]).max(dim=1).values
    expected = [i for i in range(len(BOXES)) if iou[i] < 0.3 and inside[i] / own[i] < 0.5]
    assert expected == [3, 4]  # b0 and b2 lie in the crowd region; b1 overlaps the object
    negatives = _Negatives([path], label=2, max_iou=0.3, scale=1.0)
    rows = [len(GT) + i for i in expected]  # the file's rows: ground truth first, then the proposals
    assert torch.equal(negatives[0], record["fc7"][rows].float())
    # class 1 has no object here: every row is background to it, and the proposals in the crowd region (b1
    # too: the crowd may hide unoutlined objects of any class) are left out
    outside = [len(GT) + i for i in range(len(BOXES)) if inside[i] / own[i] < 0.5]
    class_1 = _Negatives([path], label=1, max_iou=0.3, scale=1.0)[0]
    assert torch.equal(class_1, record["fc7"][[0, *outside]].float())


def test_detection_transform_scales_crowd_boxes_and_proposals():
    t = DetectionTransform(min_size=50, max_size=1000)
    target = {"boxes": torch.tensor([[10.0, 10.0, 20.0, 20.0]]), "labels": torch.tensor([1]),
              "crowd_boxes": torch.tensor([[0.0, 0.0, 100.0, 40.0]]),
              "proposals": torch.tensor([[4.0, 2.0, 8.0, 6.0]])}
    _, (out,), _ = t([torch.rand(3, 100, 200)], [target])
    assert out["boxes"].tolist() == [[5.0, 5.0, 10.0, 10.0]]
    assert out["crowd_boxes"].tolist() == [[0.0, 0.0, 50.0, 20.0]]
    assert out["proposals"].tolist() == [[2.0, 1.0, 4.0, 3.0]]
    with pytest.raises(ValueError, match="crowd_boxes must be float"):
        t([torch.rand(3, 10, 10)], [dict(target, crowd_boxes=torch.zeros(3))])


def test_crowd_boxes_and_proposals_follow_flip_and_crop_but_do_not_steer_the_crop():
    spec = [{"name": "HorizontalFlip", "p": 1.0}, {"name": "Crop", "x_min": 10, "y_min": 0, "x_max": 90,
                                                   "y_max": 50}]
    pipeline = build_transforms(spec, "detection", True, extra_boxes=("crowd_boxes", "proposals"))
    image = np.zeros((50, 100, 3), np.uint8)
    _, boxes, labels, extra = augment_detection(
        pipeline, image, np.array([[10.0, 10.0, 30.0, 20.0]]), np.array([3]),
        crowd_boxes=np.array([[0.0, 0.0, 40.0, 50.0]]),
        proposals=np.array([[60.0, 0.0, 80.0, 10.0], [95.0, 0.0, 100.0, 5.0]]),
    )
    # flip: x -> 100 - x; crop: x -> x - 10, clipped to [0, 80]; the second proposal is cropped away
    assert boxes.tolist() == [[60.0, 10.0, 80.0, 20.0]] and labels.tolist() == [3]
    assert np.allclose(extra["crowd_boxes"], [[50.0, 0.0, 80.0, 50.0]])
    assert np.allclose(extra["proposals"], [[10.0, 0.0, 30.0, 10.0]])
    # a box-safe crop keeps the objects whole, not the whole-image proposal or crowd region
    safe = build_transforms([{"name": "BBoxSafeRandomCrop", "p": 1.0}], "detection", True,
                            extra_boxes=("crowd_boxes", "proposals"))
    whole = np.array([[0.0, 0.0, 100.0, 50.0]])
    sizes = set()
    for seed in range(8):
        torch.manual_seed(seed)
        out, boxes, _, extra = augment_detection(safe, image, np.array([[40.0, 20.0, 60.0, 30.0]]),
                                                 np.array([1]), crowd_boxes=whole, proposals=whole)
        sizes.add(out.shape[:2])
        assert boxes.shape == (1, 4) and np.allclose(boxes[0, 2:] - boxes[0, :2], [20.0, 10.0], atol=1e-4)
        assert np.allclose(extra["proposals"], [[0, 0, out.shape[1], out.shape[0]]], atol=1e-4)
    assert len(sizes) > 1


def test_move_batch_hands_crowd_boxes_and_proposals_to_the_model():
    target = {"boxes": GT, "labels": torch.tensor([1]), "crowd_boxes": CROWD, "proposals": BOXES,
              "image_id": 7, "orig_size": torch.tensor([80, 80])}
    _, (moved,) = DetectionTask().move_batch(([torch.rand(3, 8, 8)], [target]), torch.device("cpu"))
    assert set(moved) == {"boxes", "labels", "crowd_boxes", "proposals"}
    assert torch.equal(moved["crowd_boxes"], CROWD)


def test_a_crowd_region_does_not_steer_the_box_safe_crop_of_a_coco_dataset(tmp_path):
    # Faster R-CNN's path: crowd regions ride in CocoDetection's own box list. The crowd box sits in a corner
    # that most crops around the object leave out; were it steering, every crop would keep it whole.
    import json

    from PIL import Image

    from vision.data.coco import CocoDetection

    Image.fromarray(np.zeros((50, 100, 3), np.uint8)).save(tmp_path / "a.png")
    (tmp_path / "a.json").write_text(json.dumps({
        "images": [{"id": 1, "file_name": "a.png", "width": 100, "height": 50}],
        "categories": [{"id": 1, "name": "thing"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [60, 20, 20, 10], "iscrowd": 0, "area": 200},
            {"id": 2, "image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 10], "iscrowd": 1, "area": 100}]}))
    for name in ("BBoxSafeRandomCrop", "RandomSizedBBoxSafeCrop"):
        params = {"height": 40, "width": 40} if name.startswith("RandomSized") else {}
        spec = [{"name": name, "erosion_rate": 0.0, "p": 1.0, **params}]
        dataset = CocoDetection(tmp_path, tmp_path / "a.json", cache=None,
                                transforms=build_transforms(spec, "detection", True))
        crowds = []
        for seed in range(12):
            torch.manual_seed(seed)
            image, target = dataset[0]
            assert len(target["boxes"]) == 1, (name, seed)
            if not params:  # a crop without resize: the object whole, 20 x 10 px
                box = target["boxes"][0]
                assert torch.allclose(box[2:] - box[:2], torch.tensor([20.0, 10.0]), atol=1e-3), seed
            crowds.append(len(target["crowd_boxes"]))
        assert 0 in crowds, name  # some crops leave the crowd region out: it did not steer them
