"""detection.explain on small random-weight detectors: anchors where hand computation puts them, each stage
the model's own intermediate results (``model.inspect``), and final detections identical to the model's
forward, with the model's thresholds or the call's."""

import pytest
import torch
from torchvision.ops import box_iou

from detection.explain import explain
from detection.generation import FAST_RCNN, FASTER_RCNN, RCNN
from detection.proposals import ProposalSource
from detection.structures import Thresholds

# 128 px inputs (the anchors computed by hand below assume it), 3 classes, every score kept
SMALL = {"num_classes": 3, "min_size": 128, "max_size": 128}


@pytest.fixture(scope="module")
def faster(tiny_detector):
    rpn = {"pre_nms_top_n_test": 200, "post_nms_top_n_test": 60}
    return tiny_detector("faster_rcnn_r18_fpn", **SMALL, rpn=rpn, roi={"score_thresh": 0.0}).eval()


@pytest.fixture(scope="module")
def image():
    torch.manual_seed(1)
    return torch.rand(3, 64, 64)  # resized x2 to 128 x 128 (min_size 128): every box is halved on the way out


def test_anchors_at_position_by_hand(faster, image):
    # Original (20.5, 11.5) is (41, 23) in the 128 px input. p2 (stride 4): cell (row 6, col 10), centre
    # (40, 24); p3 (stride 8): cell (3, 5), centre (40, 24) too. FPN sizes 32 / 64, ratios 0.5, 1, 2.
    e = explain(faster, image, position=(20.5, 11.5), top_n=10)
    assert e.generation is FASTER_RCNN and e.input_size == (128, 128)
    assert e.position == (20.0, 12.0)
    assert len(e.anchors.boxes) == 5 * 3
    by_name = dict(zip(e.anchors.names, e.anchors.boxes.tolist(), strict=True))
    # square 32 px at (40, 24) in the input is [24, 8, 56, 40]; halved for the 64 px original.
    assert by_name["p2 32px 1:1"] == [12.0, 4.0, 28.0, 20.0]
    # ratio 0.5 (h / w): 45.25 x 22.63 rounded to 46 x 22 -> [17, 13, 63, 35] in the input.
    assert by_name["p2 32px 2:1"] == [8.5, 6.5, 31.5, 17.5]
    assert by_name["p3 64px 1:1"] == [4.0, -4.0, 36.0, 28.0]


def test_anchor_scores_are_the_rpn_heads_objectness(faster, image):
    e = explain(faster, image, position=(20.5, 11.5), top_n=10)
    with torch.inference_mode():
        batch, _, _ = faster.transform([image])
        features = faster.backbone(batch.tensors)
        objectness, _ = faster.proposal_generator.head([features["p2"], features["p3"]])
    # The head's map [1, A, H, W] at the cell (6, 10) of p2 and (3, 5) of p3; ratios in the head's order.
    expected = torch.cat([objectness[0][0, :, 6, 10], objectness[1][0, :, 3, 5]]).sigmoid()
    assert torch.allclose(e.anchors.scores[:6], expected, atol=1e-6)
    assert e.anchors.labels.tolist()[:6] == [0, 0, 0, 1, 1, 1]


def test_rpn_stages_match_the_models_proposals_and_detections(faster, image):
    e = explain(faster, image, top_n=25)
    with torch.inference_mode():
        batch, _, _ = faster.transform([image])
        features = faster.backbone(batch.tensors)
        (proposals,), _ = faster.proposal_generator(batch, features)
        detections, _ = faster([image])
    # After NMS: exactly the RPN's proposals (best first) with their objectness, in the 64 px image's pixels.
    assert e.after_nms.total == len(proposals)
    assert torch.allclose(e.after_nms.boxes, proposals.boxes[:25] / 2, atol=1e-5)
    assert torch.equal(e.after_nms.scores, proposals.scores[:25])
    # Before NMS: ranked by objectness; the best box overall always survives NMS.
    scores = e.before_nms.scores
    assert len(e.before_nms.boxes) == 25 and bool((scores[:-1] >= scores[1:]).all())
    assert e.before_nms.total > e.after_nms.total
    assert torch.equal(e.after_nms.boxes[0], e.before_nms.boxes[0])
    assert e.after_nms.scores[0] == e.before_nms.scores[0]
    assert torch.equal(e.detections.boxes, detections[0].boxes)
    assert torch.equal(e.detections.labels, detections[0].labels)


def test_fast_rcnn_with_given_proposals(image, tiny_detector):
    model = tiny_detector("fast_rcnn_r18_fpn", **SMALL, roi={"score_thresh": 0.0, "nms_thresh": 0.3}).eval()
    assert model.generation is FAST_RCNN
    torch.manual_seed(2)
    xy = torch.rand(40, 2) * 40
    proposals = torch.cat([xy, xy + 8 + torch.rand(40, 2) * 16], dim=1)
    e = explain(model, image, proposals=proposals, top_n=30)
    with torch.inference_mode():
        detections, _ = model([image], proposals=[proposals])
    assert e.anchors is None and e.proposals_source.total == 40
    assert torch.allclose(e.proposals_source.boxes, proposals[:30], atol=1e-4)
    assert e.before_nms.total == 40 and set(e.before_nms.labels.tolist()) <= {1, 2, 3}
    # Per-class NMS at 0.3: no two kept boxes of one class overlap more than that.
    for label in e.after_nms.labels.unique():
        boxes = e.after_nms.boxes[e.after_nms.labels == label]
        iou = box_iou(boxes, boxes).fill_diagonal_(0)
        assert float(iou.max()) <= 0.3 + 1e-5
    assert torch.equal(e.detections.boxes, detections[0].boxes)
    assert torch.equal(e.detections.scores, detections[0].scores)


class FixedBoxes(ProposalSource):
    def __init__(self, boxes):
        self.boxes = boxes

    def propose(self, image, image_id=None):
        return self.boxes.clone()

    def settings(self):
        return {"source": "fixed"}


def test_rcnn_stages_and_detections(tiny_detector):
    roi = {"output_size": 2, "representation_size": 16, "score_thresh": 0.0, "nms_thresh": 0.3}
    model = tiny_detector("rcnn_r18", frozen_bn=False, freeze_at=0, roi=roi,
                          rcnn={"input_size": 32, "context_padding": 4, "region_batch": 16}).eval()
    model.proposal_generator.source = FixedBoxes(
        torch.tensor([[0.0, 0.0, 20, 20], [2, 2, 22, 22], [30, 30, 60, 50]]))
    image = torch.rand(3, 64, 64)
    e = explain(model, image, top_n=2)
    with torch.inference_mode():
        detections, _ = model([image])
    assert e.generation is RCNN and e.proposals_source.total == 3 and len(e.proposals_source.boxes) == 2
    assert e.before_nms.total == 3 and len(e.before_nms.boxes) == 2
    assert e.input_size == (64, 64) and e.nms_thresh == 0.3  # its own size; the model's NMS
    assert torch.equal(e.detections.boxes, detections[0].boxes)
    # the demo's NMS slider reaches R-CNN's own NMS (no second NMS after a fixed 0.3)
    loose = explain(model, image, top_n=2, thresholds=Thresholds(0.0, 0.95, 100))
    with torch.inference_mode():
        expected, _ = model([image], thresholds=Thresholds(0.0, 0.95, 100))
    assert loose.nms_thresh == 0.95 and torch.equal(loose.detections.boxes, expected[0].boxes)
    assert len(expected[0]) >= len(detections[0])


def test_bad_calls(faster, image):
    with pytest.raises(ValueError, match="do not pass proposals"):
        explain(faster, image, proposals=torch.zeros(1, 4))
    with pytest.raises(ValueError, match="one \\[3, H, W\\] image"):
        explain(faster, image[None])
    with pytest.raises(ValueError, match="cannot explain a Linear"):
        explain(torch.nn.Linear(2, 2).eval(), image)
    faster.train()
    try:
        with pytest.raises(ValueError, match="eval mode"):
            explain(faster, image)
    finally:
        faster.eval()


def test_thresholds_of_the_call_reach_the_detections(image, tiny_detector):
    model = tiny_detector("fast_rcnn_r18_fpn", **SMALL, roi={"score_thresh": 0.0}).eval()  # NMS 0.5, 100 kept
    torch.manual_seed(2)
    xy = torch.rand(40, 2) * 40
    proposals = torch.cat([xy, xy + 8 + torch.rand(40, 2) * 16], dim=1)
    strict = Thresholds(score_thresh=0.25, nms_thresh=0.2, detections_per_img=5)  # scores reach about 0.26
    e = explain(model, image, proposals=proposals, top_n=30, thresholds=strict)
    with torch.inference_mode():
        detections, _ = model([image], proposals=[proposals], thresholds=strict)
        default, _ = model([image], proposals=[proposals])
    assert torch.equal(e.detections.boxes, detections[0].boxes) and e.nms_thresh == 0.2
    assert len(detections[0]) == 5 and bool((detections[0].scores > 0.25).all())
    assert len(default[0]) > len(detections[0])  # the model's own thresholds were left as configured
    assert model.thresholds == Thresholds(0.0, 0.5, 100)


def test_inspect_keeps_the_intermediate_results(faster, image):
    seen = faster.inspect(image)
    with torch.inference_mode():
        detections, _ = faster([image])
    (candidates,), (proposals,) = seen.stages.candidates, seen.stages.proposals
    assert len(candidates) > len(proposals) and proposals.scores is not None
    assert seen.class_boxes.shape == (len(proposals), 3, 4) and seen.class_scores.shape == (len(proposals), 3)
    assert torch.equal(seen.detections.boxes, detections[0].boxes)
    assert torch.equal(seen.detections.scores, detections[0].scores)
