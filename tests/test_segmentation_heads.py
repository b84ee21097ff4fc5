"""Segmentation heads on hand-made feature maps: shapes, bilinear upsampling, ASPP / PPM wiring, fc6/fc7."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from vision.segmentation.fcn_vgg import BilinearUpsample, FCNVGGHead, bilinear_kernel
from vision.segmentation.heads import ASPP, DeepLabV3Head, DeepLabV3PlusHead, FCNHead, PSPHead, PyramidPooling


def info(channels: int, stride: int) -> SimpleNamespace:
    return SimpleNamespace(channels=channels, stride=stride)


def test_bilinear_kernel_by_hand():
    taps = torch.tensor([0.25, 0.75, 0.75, 0.25])  # factor 2: centre at 1.5, 1 - |i - 1.5| / 2
    assert torch.allclose(bilinear_kernel(2), taps[:, None] * taps[None, :])
    assert bilinear_kernel(8).shape == (16, 16)


@pytest.mark.parametrize("factor", [2, 8, 32])
@pytest.mark.parametrize("learnable", [True, False])
def test_bilinear_upsample_matches_interpolate_away_from_the_border(factor, learnable):
    x = torch.randn(2, 3, 5, 4)
    up = BilinearUpsample(3, factor, learnable=learnable)
    y = up(x)
    assert y.shape == (2, 3, 5 * factor, 4 * factor)
    ref = F.interpolate(x, scale_factor=factor, mode="bilinear", align_corners=False)
    # Transposed convolution pads with zeros where interpolate repeats the edge: compare the interior.
    inner = (..., slice(factor, -factor), slice(factor, -factor))
    assert torch.allclose(y[inner], ref[inner], atol=1e-5)
    assert any(p.requires_grad for p in up.parameters()) == learnable


def test_bilinear_upsample_rejects_odd_factor():
    with pytest.raises(ValueError, match="even integer"):
        BilinearUpsample(3, 3, learnable=False)


VGG_INFO = {"pool3": info(6, 8), "pool4": info(7, 16), "pool5": info(8, 32)}


def vgg_features(h: int, w: int) -> dict[str, torch.Tensor]:
    # Maps of a (32 h) x (32 w) input at each feature's stride.
    return {
        name: torch.randn(2, f.channels, 32 * h // f.stride, 32 * w // f.stride)
        for name, f in VGG_INFO.items()
    }


@pytest.mark.parametrize("variant", ["fcn32s", "fcn16s", "fcn8s"])
def test_fcn_vgg_head_output_at_input_resolution(variant):
    head = FCNVGGHead(VGG_INFO, num_outputs=4, variant=variant, fc_channels=16).eval()
    out = head(vgg_features(2, 3))
    assert out.shape == (2, 4, 64, 96)
    # The paper's zero-initialised score layers: the net starts by predicting all classes equally.
    assert torch.count_nonzero(out) == 0


def test_fcn8s_skips_reach_the_output_at_their_own_resolution():
    head = FCNVGGHead(VGG_INFO, num_outputs=1, variant="fcn8s", fc_channels=16).eval()
    torch.nn.init.ones_(head.score_pool3.weight)  # scores = channel sum of pool3, bilinearly upsampled x8
    features = vgg_features(2, 2)
    out = head(features)
    expected = head.upscore(features["pool3"].sum(dim=1, keepdim=True))
    assert torch.allclose(out, expected, atol=1e-5)


def test_fc6_fc7_convolutionalised_from_linear_layers():
    # fc6 as a 7x7 conv, evaluated on a 7x7 map, must equal the Linear layer on the flattened map.
    head = FCNVGGHead({"pool5": info(3, 32)}, num_outputs=2, variant="fcn32s", fc_channels=5)
    fc6, fc7 = torch.nn.Linear(3 * 7 * 7, 5), torch.nn.Linear(5, 5)
    head.load_fc_from_classifier(fc6, fc7)
    x = torch.randn(1, 3, 7, 7)
    centre = head.fc6(x)[0, :, 3, 3]  # padding 3: the centre output sees exactly the whole map
    assert torch.allclose(centre, fc6(x.flatten(1))[0], atol=1e-5)
    with pytest.raises(ValueError, match="do not fit"):
        head.load_fc_from_classifier(torch.nn.Linear(10, 5), fc7)


def test_fcn_head_shape_and_width():
    head = FCNHead("c5", 64, num_outputs=3).eval()
    assert head.conv.conv.out_channels == 16  # C_in / 4
    assert head({"c5": torch.randn(2, 64, 9, 7)}).shape == (2, 3, 9, 7)


def test_aspp_branches_follow_the_rates():
    aspp = ASPP(16, rates=(6, 12, 18), channels=8).eval()
    assert [b.conv.dilation for b in aspp.branches] == [(1, 1), (6, 6), (12, 12), (18, 18)]
    assert aspp.project.conv.in_channels == 5 * 8  # 1x1, three atrous, image pooling
    assert aspp(torch.randn(2, 16, 9, 11)).shape == (2, 8, 9, 11)


def test_image_pooling_branch_is_constant_over_the_map():
    aspp = ASPP(4, rates=(2,), channels=3).eval()
    pooled = aspp.image_pool(torch.randn(1, 4, 5, 6))
    assert torch.allclose(pooled, pooled[..., :1, :1].expand_as(pooled))


def test_deeplabv3_and_psp_heads_shapes():
    features = {"c5": torch.randn(2, 32, 9, 7)}
    assert DeepLabV3Head("c5", 32, 5, rates=(1, 2, 3), channels=8).eval()(features).shape == (2, 5, 9, 7)
    assert PSPHead("c5", 32, 5, channels=8).eval()(features).shape == (2, 5, 9, 7)


def test_deeplabv3plus_decodes_at_the_low_level_resolution():
    head = DeepLabV3PlusHead("c5", 32, "c2", 16, 5, rates=(1, 2), channels=8).eval()
    assert head.low_proj.conv.out_channels == 48 and head.fuse[0].conv.in_channels == 8 + 48
    out = head({"c5": torch.randn(2, 32, 3, 4), "c2": torch.randn(2, 16, 12, 16)})
    assert out.shape == (2, 5, 12, 16)


def test_pyramid_pooling_bins_and_channels():
    ppm = PyramidPooling(8, bins=(1, 2, 3, 6)).eval()
    x = torch.randn(1, 8, 12, 12)
    y = ppm(x)
    assert y.shape == (1, 16, 12, 12)  # input + 4 stages of 8 / 4 channels
    assert torch.equal(y[:, :8], x)
    stage1 = y[:, 8:10]  # bin 1: one value per channel, broadcast over the map
    assert torch.allclose(stage1, stage1[..., :1, :1].expand_as(stage1))
