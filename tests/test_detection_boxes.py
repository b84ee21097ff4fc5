"""Box coding, matching, sampling, anchors and the in-model transform, against hand-computed values."""

import math

import pytest
import torch

from detection.anchors import AnchorGenerator
from detection.boxes import (
    BACKGROUND,
    FOREGROUND,
    IGNORE,
    BalancedPositiveNegativeSampler,
    BoxCoder,
    Matcher,
)
from detection.structures import Detections
from detection.transform import DetectionTransform

# ---------------------------------------------------------------- BoxCoder


def test_encode_by_hand():
    boxes = torch.tensor([[0.0, 0.0, 10.0, 20.0]])  # centre (5, 10), 10 x 20
    gt = torch.tensor([[5.0, 5.0, 15.0, 25.0]])  # centre (10, 15), same size
    assert torch.allclose(BoxCoder().encode(gt, boxes), torch.tensor([[0.5, 0.25, 0.0, 0.0]]))
    assert torch.allclose(BoxCoder((10, 10, 5, 5)).encode(gt, boxes), torch.tensor([[5.0, 2.5, 0.0, 0.0]]))
    gt_big = torch.tensor([[-5.0, -10.0, 15.0, 30.0]])  # same centre, twice the size
    assert torch.allclose(
        BoxCoder().encode(gt_big, boxes), torch.tensor([[0.0, 0.0, math.log(2), math.log(2)]])
    )


def test_encode_decode_round_trip():
    torch.manual_seed(0)
    xy = torch.rand(50, 2) * 100
    boxes = torch.cat((xy, xy + 1 + torch.rand(50, 2) * 50), dim=1)
    xy = torch.rand(50, 2) * 100
    gt = torch.cat((xy, xy + 1 + torch.rand(50, 2) * 50), dim=1)
    for weights in [(1, 1, 1, 1), (10, 10, 5, 5)]:
        coder = BoxCoder(weights)
        assert torch.allclose(coder.decode(coder.encode(gt, boxes), boxes), gt, atol=1e-3)


def test_decode_per_class_blocks_and_clamp():
    coder = BoxCoder()
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    deltas = torch.tensor(
        [[0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0]]
    )  # class 0: nothing; class 1: shift right
    out = coder.decode(deltas, boxes)
    assert out.shape == (1, 8)
    assert torch.allclose(out, torch.tensor([[0.0, 0.0, 10.0, 10.0, 10.0, 0.0, 20.0, 10.0]]))
    # a huge log-scale is clamped at log(1000 / 16): width 10 -> 625, no inf
    huge = coder.decode(torch.tensor([[0.0, 0.0, 50.0, 0.0]]), boxes)
    assert torch.isfinite(huge).all()
    assert huge[0, 2] - huge[0, 0] == pytest.approx(10 * 1000 / 16, rel=1e-5)
    with pytest.raises(ValueError, match="deltas"):
        coder.decode(torch.zeros(2, 4), boxes)


# ---------------------------------------------------------------- Matcher


def test_matcher_thresholds_and_ignore_band():
    iou = torch.tensor([[0.8, 0.5, 0.2, 0.0], [0.1, 0.6, 0.75, 0.0]])
    matched, labels = Matcher(0.7, 0.3)(iou)
    assert labels.tolist() == [FOREGROUND, IGNORE, FOREGROUND, BACKGROUND]
    assert matched[labels == FOREGROUND].tolist() == [0, 1]
    # exactly on a threshold: >= fg is foreground, >= bg is not background
    matched, labels = Matcher(0.7, 0.3)(torch.tensor([[0.7, 0.3, 0.2999]]))
    assert labels.tolist() == [FOREGROUND, IGNORE, BACKGROUND]


def test_matcher_low_quality_matches_include_ties_and_keep_argmax():
    # no box reaches 0.7; gt0's best (0.4) is tied at boxes 0 and 2, gt1's best (0.6) is box 2
    iou = torch.tensor([[0.4, 0.2, 0.4], [0.1, 0.5, 0.6]])
    _, labels = Matcher(0.7, 0.3)(iou)
    assert labels.tolist() == [IGNORE, IGNORE, IGNORE]
    matched, labels = Matcher(0.7, 0.3, allow_low_quality_matches=True)(iou)
    assert labels.tolist() == [FOREGROUND, IGNORE, FOREGROUND]
    assert matched.tolist()[0] == 0 and matched.tolist()[2] == 1  # box 2 keeps its own best ground truth


def test_matcher_no_ground_truth_and_unreachable_ground_truth():
    matched, labels = Matcher(0.7, 0.3, allow_low_quality_matches=True)(torch.zeros(0, 5))
    assert labels.tolist() == [BACKGROUND] * 5 and matched.tolist() == [0] * 5
    # a ground truth overlapping nothing must not turn every IoU-0 box into a low-quality positive
    _, labels = Matcher(0.7, 0.3, allow_low_quality_matches=True)(torch.zeros(1, 4))
    assert labels.tolist() == [BACKGROUND] * 4


def test_matcher_background_range_lower_bound():
    # Fast R-CNN: background in [0.1, 0.5), lower overlaps ignored (also in an image without objects)
    matcher = Matcher(0.5, 0.5, bg_iou_min=0.1)
    _, labels = matcher(torch.tensor([[0.05, 0.1, 0.45, 0.5]]))
    assert labels.tolist() == [IGNORE, BACKGROUND, BACKGROUND, FOREGROUND]
    _, labels = matcher(torch.zeros(0, 3))
    assert labels.tolist() == [IGNORE] * 3
    with pytest.raises(ValueError, match="thresholds"):
        Matcher(0.3, 0.7)


# ---------------------------------------------------------------- sampler


@pytest.mark.parametrize(
    "num_fg, num_bg, expected",
    [
        (200, 1000, (128, 128)),
        (100, 1000, (100, 156)),
        (10, 1000, (10, 246)),
        (1000, 0, (128, 0)),
        (0, 20, (0, 20)),
        (0, 0, (0, 0)),
    ],
)
def test_sampler_ratios(num_fg, num_bg, expected):
    torch.manual_seed(0)
    labels = torch.cat(
        (torch.full((num_fg,), FOREGROUND), torch.full((num_bg,), BACKGROUND), torch.full((7,), IGNORE))
    )
    labels = labels[torch.randperm(labels.numel())]
    pos, neg = BalancedPositiveNegativeSampler(256, 0.5)(labels)
    assert (pos.numel(), neg.numel()) == expected
    assert (labels[pos] == FOREGROUND).all() and (labels[neg] == BACKGROUND).all()
    assert pos.unique().numel() == pos.numel() and neg.unique().numel() == neg.numel()


def test_sampler_quarter_foreground():
    labels = torch.tensor([FOREGROUND] * 300 + [BACKGROUND] * 1000)
    pos, neg = BalancedPositiveNegativeSampler(512, 0.25)(labels)
    assert (pos.numel(), neg.numel()) == (128, 384)


# ---------------------------------------------------------------- anchors


def test_paper_anchors_by_hand():
    gen = AnchorGenerator()  # 3 sizes x 3 ratios on one map
    assert gen.num_anchors_per_location() == [9]
    # ratio 0.5 (h / w): w = 128 * sqrt(2) = 181.02, h = 90.51 -> half sizes 90.51, 45.25 rounded
    expected = torch.tensor(
        [
            [-91, -45, 91, 45], [-181, -91, 181, 91], [-362, -181, 362, 181],
            [-64, -64, 64, 64], [-128, -128, 128, 128], [-256, -256, 256, 256],
            [-45, -91, 45, 91], [-91, -181, 91, 181], [-181, -362, 181, 362],
        ],
        dtype=torch.float32,
    )  # fmt: skip
    assert torch.equal(gen.cell_anchors(0), expected)
    (anchors,) = gen((64, 96), [(4, 6)])  # stride 16
    assert anchors.shape == (4 * 6 * 9, 4)
    # position row 1, column 2 -> centre (x=32, y=16); anchor 4 = ratio 1, size 256
    assert anchors[(1 * 6 + 2) * 9 + 4].tolist() == [32 - 128, 16 - 128, 32 + 128, 16 + 128]
    assert anchors[0].tolist() == [-91, -45, 91, 45]


def test_fpn_anchors_one_size_per_level():
    gen = AnchorGenerator(sizes=((32,), (64,)), aspect_ratios=((0.5, 1.0, 2.0),))
    assert gen.num_anchors_per_location() == [3, 3]
    p2, p3 = gen((64, 64), [(16, 16), (8, 8)])
    assert p2.shape == (16 * 16 * 3, 4) and p3.shape == (8 * 8 * 3, 4)
    assert p2[(0 * 16 + 1) * 3 + 1].tolist() == [4 - 16, -16, 4 + 16, 16]  # stride 4, size 32, ratio 1
    assert p3[(2 * 8 + 0) * 3 + 1].tolist() == [-32, 16 - 32, 32, 16 + 32]  # stride 8, size 64
    with pytest.raises(ValueError, match="levels"):
        gen((64, 64), [(16, 16)])


# ---------------------------------------------------------------- transform


def test_transform_resize_pad_and_map_back():
    t = DetectionTransform(min_size=50, max_size=1000, size_divisible=32).eval()
    images = [torch.full((3, 100, 200), 0.5), torch.full((3, 60, 60), 0.5)]
    targets = [
        {"boxes": torch.tensor([[10.0, 20.0, 30.0, 40.0]]), "labels": torch.tensor([1])},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)},
    ]
    batch, out_targets, _ = t(images, targets)
    assert batch.image_sizes == [(50, 100), (50, 50)] and batch.original_sizes == [(100, 200), (60, 60)]
    assert batch.tensors.shape == (2, 3, 64, 128)  # padded to multiples of 32
    assert torch.allclose(out_targets[0]["boxes"], torch.tensor([[5.0, 10.0, 15.0, 20.0]]))
    assert targets[0]["boxes"][0, 0] == 10.0  # inputs untouched
    # normalised: (0.5 - mean) / std inside the image, zeros in the padding
    assert batch.tensors[0, 0, 0, 0].item() == pytest.approx((0.5 - 0.485) / 0.229, rel=1e-5)
    assert batch.tensors[1, :, 50:, :].abs().sum() == 0 and batch.tensors[1, :, :, 50:].abs().sum() == 0
    dets = [
        Detections(torch.tensor([[5.0, 10.0, 15.0, 20.0]]), torch.ones(1), torch.ones(1, dtype=torch.int64))
    ]
    dets.append(Detections.empty())
    back = t.postprocess(dets, batch)
    assert torch.allclose(back[0].boxes, torch.tensor([[10.0, 20.0, 30.0, 40.0]]))
    assert len(back[1]) == 0


def test_transform_max_size_wins():
    t = DetectionTransform(min_size=100, max_size=200).eval()
    batch, _, proposals = t([torch.rand(3, 100, 400)], proposals=[torch.tensor([[0.0, 0.0, 400.0, 100.0]])])
    assert batch.image_sizes == [(50, 200)]
    assert proposals[0].tolist() == [[0.0, 0.0, 200.0, 50.0]]


def test_transform_errors_name_the_input():
    t = DetectionTransform(min_size=32, max_size=64)
    with pytest.raises(TypeError, match="image 0.*float"):
        t([torch.zeros(3, 8, 8, dtype=torch.uint8)])
    with pytest.raises(ValueError, match=r"image 1: expected a \[3, H, W\]"):
        t([torch.rand(3, 8, 8), torch.rand(8, 8)])
    with pytest.raises(TypeError, match="list"):
        t(torch.rand(2, 3, 8, 8))
    bad = [{"boxes": torch.tensor([[5.0, 5.0, 2.0, 9.0]]), "labels": torch.tensor([1])}]
    with pytest.raises(ValueError, match=r"target 0: boxes \[0\] have zero or negative width"):
        t([torch.rand(3, 8, 8)], bad)
    with pytest.raises(ValueError, match="target 0: labels must be int64"):
        t(
            [torch.rand(3, 8, 8)],
            [{"boxes": torch.tensor([[0.0, 0.0, 2.0, 2.0]]), "labels": torch.tensor([1.0])}],
        )
