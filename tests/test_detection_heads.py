"""RPN and RoI heads on tiny hand-built inputs: proposals, losses (zero targets too), pooling, postprocess."""

import math

import pytest
import torch
from torch import nn

from detection.anchors import AnchorGenerator
from detection.interfaces import detections_from_scores
from detection.roi_heads import (
    BoxPredictor,
    RoIHeads,
    RoIPooler,
    TwoMLPHead,
    fast_rcnn_loss,
    fpn_levels,
)
from detection.rpn import RegionProposalNetwork, RPNHead
from detection.structures import Thresholds
from detection.transform import ImageBatch


def _batch(n=1, size=32):
    return ImageBatch(torch.zeros(n, 3, size, size), [(size, size)] * n, [(size, size)] * n)


def _tiny_rpn(**kwargs):
    # one 16 px square anchor per position of a stride-16 map
    rpn = RegionProposalNetwork(
        AnchorGenerator(sizes=((16,),), aspect_ratios=((1.0,),)), RPNHead(4, 1), in_features=["c4"], **kwargs
    )
    for p in rpn.head.parameters():
        nn.init.zeros_(p)
    return rpn


# ---------------------------------------------------------------- RPN


def test_rpn_head_shapes():
    head = RPNHead(8, 3, conv_depth=2)
    obj, deltas = head([torch.rand(2, 8, 5, 7), torch.rand(2, 8, 3, 4)])
    assert [o.shape for o in obj] == [(2, 3, 5, 7), (2, 3, 3, 4)]
    assert [d.shape for d in deltas] == [(2, 12, 5, 7), (2, 12, 3, 4)]


def test_rpn_proposals_are_clipped_anchors_when_deltas_are_zero():
    rpn = _tiny_rpn().eval()
    features = {"c4": torch.rand(1, 4, 2, 2)}  # 32 x 32 image, stride 16: centres (0|16, 0|16)
    proposals, losses = rpn(_batch(), features)
    expected = {(0.0, 0.0, 8.0, 8.0), (8.0, 0.0, 24.0, 8.0), (0.0, 8.0, 8.0, 24.0), (8.0, 8.0, 24.0, 24.0)}
    assert {tuple(b) for b in proposals[0].boxes.tolist()} == expected
    assert losses == {}
    # the objectness of the kept proposals travels with them: zero logits everywhere are sigmoid(0)
    assert proposals[0].scores.tolist() == [0.5] * 4
    # dx = 0.5 moves every anchor half its width (8 px) right before clipping
    nn.init.constant_(rpn.head.bbox_pred.bias, 0.0)
    rpn.head.bbox_pred.bias.data[0] = 0.5
    proposals, _ = rpn(_batch(), features)
    assert (16.0, 8.0, 32.0, 24.0) in {tuple(b) for b in proposals[0].boxes.tolist()}


def test_rpn_top_n_and_nms():
    rpn = _tiny_rpn(pre_nms_top_n_test=3, post_nms_top_n_test=2).eval()
    proposals, _ = rpn(_batch(2), {"c4": torch.rand(2, 4, 2, 2)})
    assert [len(p) for p in proposals] == [2, 2]
    # a huge NMS overlap threshold keeps everything, a zero one keeps only non-overlapping boxes
    wide = _tiny_rpn(nms_thresh=0.0).eval()
    wide.anchor_generator = AnchorGenerator(sizes=((64,),), aspect_ratios=((1.0,),))
    proposals, _ = wide(_batch(), {"c4": torch.rand(1, 4, 2, 2)})
    assert len(proposals[0]) == 1  # all four clipped anchors overlap


def test_rpn_proposal_scores_are_the_heads_objectness_of_the_kept_boxes():
    torch.manual_seed(0)
    rpn = _tiny_rpn().eval()
    for p in [*rpn.head.conv.parameters(), *rpn.head.cls_logits.parameters()]:
        nn.init.normal_(p)  # a different objectness at each position; deltas stay zero
    batch, features = _batch(), {"c4": torch.rand(1, 4, 2, 2)}
    (proposals,), _ = rpn(batch, features)
    with torch.no_grad():
        logits = rpn.head([features["c4"]])[0][0][0, 0]  # [2, 2]: one anchor per position
    # zero deltas: each proposal is its (clipped) anchor, whose centre gives the position it was scored at
    anchors = rpn.anchor_generator((32, 32), [(2, 2)], device="cpu")[0]
    for box, score in zip(proposals.boxes, proposals.scores, strict=True):
        index = int((anchors.clamp(0, 32) == box).all(dim=1).nonzero()[0])
        assert float(score) == pytest.approx(float(logits.flatten()[index].sigmoid()), abs=1e-6)
    assert bool((proposals.scores[:-1] >= proposals.scores[1:]).all())  # best first
    # inspect: the same proposals, and the candidates NMS chose them from
    stages = rpn.inspect(batch, features)
    assert torch.equal(stages.proposals[0].boxes, proposals.boxes)
    assert len(stages.candidates[0]) == 4 and stages.predictions.objectness.shape == (1, 4)


def test_rpn_losses_by_hand():
    rpn = _tiny_rpn(batch_size_per_image=4).train()
    # a ground truth equal to one anchor: IoU 1 with it, so it is the positive and its target is zero
    targets = [{"boxes": torch.tensor([[8.0, 8.0, 24.0, 24.0]]), "labels": torch.tensor([1])}]
    _, losses = rpn(_batch(), {"c4": torch.rand(1, 4, 2, 2)}, targets)
    assert set(losses) == {"loss_objectness", "loss_rpn_box_reg"}
    assert losses["loss_objectness"].item() == pytest.approx(math.log(2), rel=1e-6)  # all logits 0
    assert losses["loss_rpn_box_reg"].item() == 0.0


def test_rpn_zero_targets_train():
    torch.manual_seed(0)
    rpn = RegionProposalNetwork(
        AnchorGenerator(sizes=((16, 32),), aspect_ratios=((0.5, 1.0, 2.0),)),
        RPNHead(4, 6),
        in_features=["c4"],
    ).train()
    features = {"c4": torch.rand(2, 4, 4, 4, requires_grad=True)}
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}
    _, losses = rpn(_batch(2, 64), features, [empty, empty])
    assert losses["loss_rpn_box_reg"].item() == 0.0
    assert torch.isfinite(losses["loss_objectness"]) and losses["loss_objectness"] > 0
    sum(losses.values()).backward()
    assert rpn.head.cls_logits.weight.grad.abs().sum() > 0


def test_rpn_refuses_given_proposals():
    with pytest.raises(ValueError, match="own proposals"):
        _tiny_rpn()(_batch(), {"c4": torch.rand(1, 4, 2, 2)}, proposals=[torch.zeros(1, 4)])


# ---------------------------------------------------------------- RoI pooling


def test_roi_pool_and_align_by_hand():
    x = torch.arange(64, dtype=torch.float32).reshape(1, 1, 8, 8)
    boxes = [torch.tensor([[0.0, 0.0, 7.0, 7.0]])]
    pooled = RoIPooler("pool", ["c4"], [1], output_size=2)({"c4": x}, boxes, [(8, 8)])
    assert pooled.tolist() == [[[[27.0, 31.0], [59.0, 63.0]]]]  # max of each quadrant
    # stride 2: box (0, 0, 6, 6) in image pixels is cells 0..3 of the map (RoIPool rounds to whole cells)
    pooled = RoIPooler("pool", ["c4"], [2], output_size=2)(
        {"c4": x}, [torch.tensor([[0.0, 0, 6, 6]])], [(16, 16)]
    )
    assert pooled.tolist() == [[[[9.0, 11.0], [25.0, 27.0]]]]
    const = torch.full((1, 2, 8, 8), 3.0)
    aligned = RoIPooler("align", ["c4"], [1], output_size=7)({"c4": const}, boxes, [(8, 8)])
    assert aligned.shape == (1, 2, 7, 7) and torch.allclose(aligned, torch.full_like(aligned, 3.0))
    with pytest.raises(ValueError, match="unknown RoI pooler"):
        RoIPooler("crop", ["c4"], [1])


def test_multiscale_pooler_picks_levels_by_size():
    feats = {"p2": torch.full((1, 1, 64, 64), 2.0), "p3": torch.full((1, 1, 32, 32), 3.0)}
    pooler = RoIPooler("multiscale", ["p2", "p3"], [4, 8], output_size=2)
    # sqrt(area) 112 -> level floor(4 + log2(0.5)) = 3 (clamped to the given p2..p3); 16 -> level 2
    boxes = [torch.tensor([[0.0, 0.0, 112.0, 112.0], [0.0, 0.0, 16.0, 16.0]])]
    out = pooler(feats, boxes, [(256, 256)])
    assert out[:, 0, 0, 0].tolist() == [3.0, 2.0]
    # the level scales come from the declared strides, never from the image sizes of a batch
    assert pooler(feats, boxes, [(100, 100)])[:, 0, 0, 0].tolist() == [3.0, 2.0]
    # regions of several images keep their order and read their own image's maps
    two = {"p2": torch.stack([torch.full((1, 64, 64), 2.0), torch.full((1, 64, 64), 20.0)]),
           "p3": torch.stack([torch.full((1, 32, 32), 3.0), torch.full((1, 32, 32), 30.0)])}
    out = pooler(two, [boxes[0][:1], boxes[0]], [(256, 256)] * 2)
    assert out[:, 0, 0, 0].tolist() == [3.0, 30.0, 20.0]
    # RoIAlign at the level's own scale: a map that is its x coordinate, read at a region's bin centres
    ramp = torch.arange(32.0).expand(1, 1, 32, 32)
    out = pooler({"p2": ramp.repeat(1, 1, 2, 2), "p3": ramp}, [torch.tensor([[64.0, 0.0, 192.0, 128.0]])],
                 [(256, 256)])
    # sqrt(area) 128 -> P3 (stride 8): x from 8 to 24 cells; two samples per bin side (no half-pixel
    # shift) at 10, 14 and 18, 22, averaged -> 12 and 20
    assert out[0, 0, 0].tolist() == [12.0, 20.0]
    with pytest.raises(ValueError, match="consecutive"):
        RoIPooler("multiscale", ["p2", "p4"], [4, 16])


def test_fpn_levels_equation_one():
    # k = floor(4 + log2(sqrt(wh) / 224)): 224 px -> 4, 112 -> 3, 111 -> 2, 448 -> 5, clamped to [2, 5]
    sides = torch.tensor([224.0, 112.0, 111.0, 448.0, 10.0, 5000.0])
    boxes = torch.stack([torch.zeros(6), torch.zeros(6), sides, sides], dim=1)
    assert fpn_levels(boxes, 2, 5).tolist() == [4, 3, 2, 5, 2, 5]
    # not square: sqrt(wh) of 56 x 896 is 224
    assert fpn_levels(torch.tensor([[0.0, 0.0, 56.0, 896.0]]), 2, 5).tolist() == [4]


# ---------------------------------------------------------------- loss and post-processing


def test_fast_rcnn_loss_by_hand():
    logits = torch.zeros(2, 3)  # K = 2
    deltas = torch.zeros(2, 12)
    labels = torch.tensor([1, 0])
    targets = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    losses = fast_rcnn_loss(logits, deltas, labels, targets)
    assert losses["loss_classifier"].item() == pytest.approx(math.log(3), rel=1e-6)
    # smooth-L1 (beta 1/9) of |1|: 1 - beta / 2 = 17/18, divided by the 2 regions
    assert losses["loss_box_reg"].item() == pytest.approx(17 / 36, rel=1e-6)
    assert fast_rcnn_loss(logits, deltas, labels, targets, smooth_l1_beta=0)["loss_box_reg"].item() == 0.5
    # the loss reads the deltas of the ground-truth class (columns 4..7 for label 1)
    deltas[0, 4] = 1.0
    assert fast_rcnn_loss(logits, deltas, labels, targets)["loss_box_reg"].item() == 0.0
    empty = fast_rcnn_loss(torch.zeros(0, 3, requires_grad=True), torch.zeros(0, 12), labels[:0], targets[:0])
    assert empty["loss_classifier"].item() == 0.0 and empty["loss_classifier"].requires_grad


def test_detections_from_scores_by_hand():
    boxes = torch.tensor(
        [
            [[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 10.0]],
            [[1.0, 1.0, 11.0, 11.0], [1.0, 1.0, 11.0, 11.0]],
            [[20.0, 20.0, 60.0, 60.0], [20.0, 20.0, 60.0, 60.0]],
        ]
    )  # [P=3, K=2, 4]
    scores = torch.tensor([[0.9, 0.03], [0.8, 0.1], [0.2, 0.7]])
    det = detections_from_scores(boxes, scores, (40, 50), Thresholds(score_thresh=0.05, nms_thresh=0.5))
    # class 1: box 1 suppressed by box 0 (IoU 0.68); class 2: score 0.03 dropped; box 2 clipped to 50 x 40
    assert det.labels.tolist() == [1, 2, 1, 2]
    assert det.scores.tolist() == pytest.approx([0.9, 0.7, 0.2, 0.1])
    assert det.boxes[1].tolist() == [20.0, 20.0, 50.0, 40.0]
    capped = detections_from_scores(boxes, scores, (40, 50), Thresholds(detections_per_img=2))
    assert capped.scores.tolist() == pytest.approx([0.9, 0.7])
    # a looser NMS keeps box 1 of class 1; a higher score cut drops the 0.1 and 0.2
    loose = detections_from_scores(boxes, scores, (40, 50), Thresholds(nms_thresh=0.7))
    assert loose.scores.tolist() == pytest.approx([0.9, 0.8, 0.7, 0.2, 0.1])
    high = detections_from_scores(boxes, scores, (40, 50), Thresholds(score_thresh=0.5))
    assert high.scores.tolist() == pytest.approx([0.9, 0.7])


def test_thresholds_are_checked():
    with pytest.raises(ValueError, match="score_thresh"):
        Thresholds(score_thresh=1.5)
    with pytest.raises(ValueError, match="detections_per_img"):
        Thresholds(detections_per_img=0)


def _tiny_roi_heads(**kwargs):
    pooler = RoIPooler("align", ["c4"], [4], output_size=2)
    return RoIHeads(pooler, TwoMLPHead(8 * 2 * 2, 16), BoxPredictor(16, 2), **kwargs)


def test_roi_heads_sampling_ratio_and_labels():
    torch.manual_seed(0)
    heads = _tiny_roi_heads(batch_size_per_image=16, positive_fraction=0.25)
    gt = torch.tensor([[10.0, 10.0, 30.0, 30.0]])
    near = gt + torch.tensor([[1.0, 0.0, 1.0, 0.0]])  # IoU 0.9
    proposals = [torch.cat((near.repeat(10, 1), torch.tensor([[40.0, 40.0, 60.0, 60.0]]).repeat(30, 1)))]
    regions, labels, box_targets = heads.sample_regions(
        proposals, [{"boxes": gt, "labels": torch.tensor([2])}]
    )
    assert regions[0].shape == (16, 4) and labels.tolist() == [2] * 4 + [0] * 12
    assert box_targets[4:].abs().sum() == 0 and box_targets[:4].abs().sum() > 0


def test_roi_heads_train_eval_and_zero_targets():
    torch.manual_seed(0)
    heads = _tiny_roi_heads()
    features = {"c4": torch.rand(2, 8, 16, 16, requires_grad=True)}
    proposals = [torch.tensor([[0.0, 0.0, 20.0, 20.0], [10.0, 10.0, 50.0, 40.0]]), torch.zeros(0, 4)]
    targets = [
        {"boxes": torch.tensor([[2.0, 2.0, 22.0, 22.0]]), "labels": torch.tensor([1])},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)},  # no objects
    ]
    out, losses = heads.train()(features, proposals, [(64, 64)] * 2, targets)
    assert out is None and set(losses) == {"loss_classifier", "loss_box_reg"}
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert heads.box_predictor.cls_score.weight.grad.abs().sum() > 0
    out, losses = heads.eval()(features, proposals, [(64, 64)] * 2, targets)
    assert len(out) == 2 and set(losses) == {"loss_classifier", "loss_box_reg"}
    assert len(out[1]) == 0
    # only images without objects and without proposals: losses are zero, not NaN
    _, losses = heads.train()(features, [torch.zeros(0, 4)] * 2, [(64, 64)] * 2, [targets[1]] * 2)
    assert losses["loss_box_reg"].item() == 0.0 and torch.isfinite(losses["loss_classifier"])


def test_roi_heads_thresholds_per_call_leave_the_defaults_alone():
    torch.manual_seed(0)
    heads = _tiny_roi_heads(score_thresh=0.0, detections_per_img=100).eval().requires_grad_(False)
    features = {"c4": torch.rand(1, 8, 16, 16)}
    xy = torch.rand(30, 2) * 30
    proposals = [torch.cat([xy, xy + 10 + torch.rand(30, 2) * 20], dim=1)]
    everything, _ = heads(features, proposals, [(64, 64)])
    capped, _ = heads(features, proposals, [(64, 64)], thresholds=Thresholds(0.0, 0.5, 3))
    assert len(capped[0]) == 3 and torch.equal(capped[0].boxes, everything[0].boxes[:3])
    tight, _ = heads(features, proposals, [(64, 64)], thresholds=Thresholds(0.0, 0.1, 100))
    assert len(tight[0]) < len(everything[0])
    cut = float(everything[0].scores.median())
    high, _ = heads(features, proposals, [(64, 64)], thresholds=Thresholds(cut, 0.5, 100))
    assert bool((high[0].scores > cut).all()) and len(high[0]) < len(everything[0])
    # the configured defaults are untouched by the calls
    assert heads.thresholds == Thresholds(0.0, 0.5, 100)
    again, _ = heads(features, proposals, [(64, 64)])
    assert torch.equal(again[0].boxes, everything[0].boxes)


def test_box_head_trains_its_fc_layers_as_one_by_one_convolutions_with_linears_gradients():
    torch.manual_seed(0)
    head = TwoMLPHead(8 * 7 * 7, 32).train()
    x = torch.randn(20, 8, 7, 7, requires_grad=True)
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = head(x)
    assert sum(type(f).__name__ == "_ConvLinearBackward" for f in _grad_fns(out)) == 2  # fc6 and fc7
    # fc6 saves its weight itself for backward, not a reordered copy
    weights = [t for t in saved if t.numel() == head.fc6.weight.numel()]
    assert weights and all(t.data_ptr() == head.fc6.weight.data_ptr() for t in weights)
    params = (x, head.fc6.weight, head.fc6.bias, head.fc7.weight, head.fc7.bias)
    grads = torch.autograd.grad(out.square().sum(), params)

    def plain(x):  # nn.Linear's arithmetic
        return torch.relu(head.fc7(torch.relu(head.fc6(x.flatten(1)))))

    torch.testing.assert_close(out, plain(x), rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, torch.autograd.grad(plain(x).square().sum(), params), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    with torch.no_grad():  # evaluation: nn.Linear itself
        assert torch.equal(head.eval()(x), plain(x))


def _grad_fns(tensor: torch.Tensor) -> list:
    seen, todo = [], [tensor.grad_fn]
    while todo:
        fn = todo.pop()
        if fn is not None and fn not in seen:
            seen.append(fn)
            todo.extend(f for f, _ in fn.next_functions)
    return seen
