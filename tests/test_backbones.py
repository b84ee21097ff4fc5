"""ResNet/VGG: parameter counts, torchvision equivalence both ways, feature maps, freezing, BN folding."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from vision.backbones import (
    BACKBONE_NAMES,
    FeatureInfo,
    ResNetFeatures,
    VGGFeatures,
    build_backbone,
    build_network,
)
from vision.layers import FrozenBatchNorm2d, convert_frozen_batchnorm, fold_conv_bn
from vision.weights import load_weights, to_torchvision_state_dict

# Published parameter counts with a 1000-class head (torchvision's model documentation).
PARAMETER_COUNTS = {
    "resnet18": 11_689_512, "resnet34": 21_797_672, "resnet50": 25_557_032, "resnet101": 44_549_160,
    "resnet152": 60_192_808,
    "vgg11": 132_863_336, "vgg11_bn": 132_868_840, "vgg13": 133_047_848, "vgg13_bn": 133_053_736,
    "vgg16": 138_357_544, "vgg16_bn": 138_365_992, "vgg19": 143_667_240, "vgg19_bn": 143_678_248,
}


def randomize_bn_statistics(model: nn.Module, seed: int) -> None:
    """Fresh BNs (mean 0, var 1, weight 1, bias 0) would hide a mis-mapped BN; make every one differ."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d | FrozenBatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(n, generator=g) * 0.1)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def test_names_cover_all_thirteen_variants():
    assert set(BACKBONE_NAMES) == set(PARAMETER_COUNTS)


@pytest.mark.parametrize("name", list(PARAMETER_COUNTS))
def test_parameter_count_and_torchvision_equivalence_both_ways(name):
    torch.manual_seed(0)
    ours = build_network(name).eval()
    assert sum(p.numel() for p in ours.parameters()) == PARAMETER_COUNTS[name]
    torch.manual_seed(1)
    theirs = getattr(torchvision.models, name)(weights=None).eval()
    with torch.no_grad():
        randomize_bn_statistics(theirs, seed=2)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(3))

    # torchvision -> ours: a torchvision state dict through the public loader.
    with torch.inference_mode():
        expected = theirs(x)
    load_weights(ours, theirs.state_dict())
    with torch.inference_mode():
        assert max_diff(ours(x), expected) <= 1e-5

    # ours -> torchvision, after changing every weight and BN statistic of ours (in place, no copies).
    with torch.no_grad():
        for i, tensor in enumerate(ours.state_dict().values()):
            if tensor.is_floating_point():
                tensor.mul_(0.8 + 0.03 * (i % 5))
    with torch.inference_mode():
        expected = ours(x)
        assert max_diff(theirs(x), expected) > 1e-3  # the weights now differ, so the check below can fail
    theirs.load_state_dict(to_torchvision_state_dict(ours))
    with torch.inference_mode():
        assert max_diff(theirs(x), expected) <= 1e-5


def test_dilated_resnet_matches_torchvision():
    torch.manual_seed(0)
    ours = build_network("resnet50", replace_stride_with_dilation=(False, True, True)).eval()
    theirs = torchvision.models.resnet50(weights=None, replace_stride_with_dilation=[False, True, True])
    theirs.eval()
    with torch.no_grad():
        randomize_bn_statistics(ours, seed=1)
    theirs.load_state_dict(to_torchvision_state_dict(ours))
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        assert max_diff(ours(x), theirs(x)) <= 1e-5


@pytest.mark.parametrize(
    ("name", "output_stride", "expected"),
    [
        ("resnet18", 32, {"c2": (64, 4), "c3": (128, 8), "c4": (256, 16), "c5": (512, 32)}),
        ("resnet50", 16, {"c2": (256, 4), "c3": (512, 8), "c4": (1024, 16), "c5": (2048, 16)}),
        ("resnet50", 8, {"c2": (256, 4), "c3": (512, 8), "c4": (1024, 8), "c5": (2048, 8)}),
        ("resnet18", 8, {"c2": (64, 4), "c3": (128, 8), "c4": (256, 8), "c5": (512, 8)}),
    ],
)
def test_resnet_feature_maps_match_declared_channels_and_strides(name, output_stride, expected):
    torch.manual_seed(0)
    backbone = build_backbone(name, output_stride=output_stride).eval()
    assert backbone.feature_info == {k: FeatureInfo(c, s) for k, (c, s) in expected.items()}
    with torch.inference_mode():
        maps = backbone(torch.rand(1, 3, 64, 96))
    assert list(maps) == list(expected)
    for k, (c, s) in expected.items():
        assert tuple(maps[k].shape) == (1, c, 64 // s, 96 // s)


def test_vgg_feature_maps_shapes_and_values():
    torch.manual_seed(0)
    net = build_network("vgg16").eval()
    names = ["conv1", "pool1", "conv2", "pool2", "conv3", "pool3", "conv4", "pool4", "conv5", "pool5"]
    backbone = VGGFeatures(net, list(reversed(names)))  # returned in network order whatever the request
    assert list(backbone.feature_info) == names
    expected = {"conv1": (64, 1), "pool1": (64, 2), "conv2": (128, 2), "pool2": (128, 4),
                "conv3": (256, 4), "pool3": (256, 8), "conv4": (512, 8), "pool4": (512, 16),
                "conv5": (512, 16), "pool5": (512, 32)}
    assert backbone.feature_info == {k: FeatureInfo(c, s) for k, (c, s) in expected.items()}
    x = torch.rand(1, 3, 32, 64)
    with torch.inference_mode():
        maps = backbone(x)
        for k, (c, s) in expected.items():
            assert tuple(maps[k].shape) == (1, c, 32 // s, 64 // s)
        # VGG16's conv5_3 ReLU is features[29]: Faster R-CNN's trunk is features[:30].
        assert torch.equal(maps["conv5"], net.features[:30](x))
        assert torch.equal(maps["pool5"], net.features(x))


def test_backbones_drop_unused_stages_and_keep_torchvision_names():
    torch.manual_seed(0)
    net = build_network("resnet50")
    c4 = ResNetFeatures(net, ["c4"])
    keys = list(c4.state_dict())
    assert keys[0] == "conv1.weight" and any(k.startswith("layer3.") for k in keys)
    assert not any(k.startswith(("layer4.", "fc.")) for k in keys)
    assert c4.conv1 is net.conv1  # wraps, does not copy
    # R50-C4: c4 then the network's own layer4 is the same as the full trunk.
    x = torch.rand(1, 3, 64, 64)
    net.eval()
    with torch.inference_mode():
        full = net.layer4(net.layer3(net.layer2(net.layer1(net.forward_stem(x)))))
        assert torch.equal(net.layer4(c4(x)["c4"]), full)

    small = build_network("vgg11")
    conv3 = VGGFeatures(small, ["conv3"])
    assert len(conv3.features) == 10  # vgg11: conv3 is the ReLU at index 9
    assert not any(k.startswith("classifier.") for k in conv3.state_dict())


def test_unknown_feature_or_output_stride_is_a_clear_error():
    with pytest.raises(ValueError, match="c6"):
        build_backbone("resnet18", out_features=["c6"])
    with pytest.raises(ValueError, match="output_stride"):
        build_backbone("resnet18", output_stride=4)
    with pytest.raises(ValueError, match="unknown network"):
        build_network("resnet19")


def test_frozen_batchnorm_hand_computed_and_state_dict_keys():
    bn = FrozenBatchNorm2d(2, eps=0.0)
    bn.load_state_dict({"weight": torch.tensor([2.0, 1.0]), "bias": torch.tensor([3.0, 0.0]),
                        "running_mean": torch.tensor([1.0, -1.0]), "running_var": torch.tensor([4.0, 1.0]),
                        "num_batches_tracked": torch.tensor(7)})
    x = torch.tensor([5.0, 2.0]).view(1, 2, 1, 1)
    # channel 0: (5 - 1) / 2 * 2 + 3 = 7; channel 1: (2 + 1) / 1 * 1 + 0 = 3
    assert bn(x).flatten().tolist() == [7.0, 3.0]
    assert set(bn.state_dict()) == {"weight", "bias", "running_mean", "running_var"}
    assert list(bn.parameters()) == []


def test_convert_frozen_batchnorm_keeps_outputs_and_stops_statistics():
    torch.manual_seed(0)
    backbone = build_backbone("resnet18", out_features=["c3"])
    with torch.no_grad():
        randomize_bn_statistics(backbone, seed=1)
    x = torch.rand(2, 3, 64, 64)
    with torch.inference_mode():
        expected = backbone.eval()(x)["c3"]
    convert_frozen_batchnorm(backbone)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in backbone.modules())
    stats = backbone.layer1[0].bn1.running_mean.clone()
    out = backbone.train()(x)["c3"]  # train mode: frozen BN still uses the stored statistics
    assert max_diff(out.detach(), expected) <= 1e-4
    assert torch.equal(backbone.layer1[0].bn1.running_mean, stats)
    out.sum().backward()
    assert backbone.conv1.weight.grad is not None  # convs still train


def test_freeze_at_stops_gradients_in_the_first_stages():
    torch.manual_seed(0)
    backbone = build_backbone("resnet18", freeze_at=2).train()
    frozen = [backbone.conv1, backbone.layer1]
    assert isinstance(backbone.bn1, FrozenBatchNorm2d)
    assert isinstance(backbone.layer1[0].bn1, FrozenBatchNorm2d)
    assert isinstance(backbone.layer2[0].bn1, nn.BatchNorm2d)
    sum(m.sum() for m in backbone(torch.rand(2, 3, 64, 64)).values()).backward()
    assert all(p.grad is None and not p.requires_grad for m in frozen for p in m.parameters())
    assert all(p.grad is not None for p in backbone.layer2.parameters())

    assert not any(p.requires_grad for p in build_backbone("resnet18", freeze_at=5).parameters())
    assert all(p.requires_grad for p in build_backbone("resnet18", freeze_at=0).parameters())
    with pytest.raises(ValueError, match="freeze_at"):
        build_backbone("resnet18", out_features=["c3"], freeze_at=4)  # only stem, res2, res3 kept


def test_vgg_freeze_at_counts_blocks():
    backbone = build_backbone("vgg11_bn", out_features=["conv5"], freeze_at=2)
    # vgg11_bn: block 1 = features[0..3] (conv, bn, relu, pool), block 2 = features[4..7]
    assert not any(p.requires_grad for p in backbone.features[:8].parameters())
    assert all(p.requires_grad for p in backbone.features[8:].parameters())
    assert isinstance(backbone.features[5], FrozenBatchNorm2d)
    assert isinstance(backbone.features[9], nn.BatchNorm2d)


@pytest.mark.parametrize("frozen_bn", [False, True])
def test_fold_conv_bn_within_1e4(frozen_bn):
    torch.manual_seed(0)
    backbone = build_backbone("resnet50", out_features=["c3", "c5"], frozen_bn=frozen_bn)
    with torch.no_grad():
        randomize_bn_statistics(backbone, seed=1)
    backbone.eval()
    folded = fold_conv_bn(backbone)
    assert not any(isinstance(m, nn.BatchNorm2d | FrozenBatchNorm2d) for m in folded.modules())
    assert any(isinstance(m, nn.BatchNorm2d | FrozenBatchNorm2d) for m in backbone.modules())  # original kept
    x = torch.rand(2, 3, 64, 64)
    with torch.inference_mode():
        expected, got = backbone(x), folded(x)
    for k in expected:
        assert max_diff(got[k], expected[k]) <= 1e-4 * max(1.0, expected[k].abs().max().item())


def test_fold_conv_bn_vgg_bn_network():
    torch.manual_seed(0)
    net = build_network("vgg11_bn")
    with torch.no_grad():
        randomize_bn_statistics(net, seed=1)
    net.eval()
    folded = fold_conv_bn(net)
    assert sum(isinstance(m, nn.Identity) for m in folded.features) == 8  # one per conv
    x = torch.rand(1, 3, 32, 32)
    with torch.inference_mode():
        assert max_diff(folded(x), net(x)) <= 1e-4


def test_frozen_norm_applied_through_the_conv_keeps_values_and_gradients():
    from vision.layers import conv_norm

    torch.manual_seed(0)
    conv, norm = torch.nn.Conv2d(8, 16, 3, padding=1, bias=False), FrozenBatchNorm2d(16)
    for name in ("weight", "bias", "running_mean"):
        getattr(norm, name).normal_()
    norm.running_var.uniform_(0.5, 2.0)
    x = torch.randn(2, 8, 12, 10)
    fused = conv_norm(conv, norm, x)
    (grad_fused,) = torch.autograd.grad(fused.square().sum(), conv.weight)
    plain = norm(conv(x))
    (grad_plain,) = torch.autograd.grad(plain.square().sum(), conv.weight)
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad_fused, grad_plain, rtol=1e-4, atol=1e-4)
    bn = torch.nn.BatchNorm2d(16).eval()  # any other norm: called as it is
    assert torch.equal(conv_norm(conv, bn, x), bn(conv(x)))
    with torch.no_grad():  # evaluation: the norm after the conv, as before
        assert torch.equal(conv_norm(conv, norm, x), norm(conv(x)))


def test_frozen_norm_conv_keeps_the_weight_not_a_scaled_copy_and_autograds_gradients():
    from vision.layers import conv_norm

    torch.manual_seed(0)
    conv, norm = torch.nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False), FrozenBatchNorm2d(16).train()
    norm.weight.normal_()
    norm.running_var.uniform_(0.5, 2.0)
    x = torch.randn(2, 8, 12, 10).contiguous(memory_format=torch.channels_last).requires_grad_()
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = conv_norm(conv, norm, x)
    weights = [t for t in saved if t.shape == conv.weight.shape]
    assert weights and all(t.data_ptr() == conv.weight.data_ptr() for t in weights)  # no scaled copy held
    grads = torch.autograd.grad(out.square().sum(), (x, conv.weight))
    # what autograd computes through the plain product, to the bit
    scale, shift = norm.scale_and_shift()
    plain = conv._conv_forward(x, conv.weight * scale.view(-1, 1, 1, 1), shift)
    assert torch.equal(out, plain)
    for got, want in zip(grads, torch.autograd.grad(plain.square().sum(), (x, conv.weight)), strict=True):
        assert torch.equal(got, want)
    conv.weight.requires_grad_(False)  # a frozen stage: only the input's gradient
    (grad_x,) = torch.autograd.grad(conv_norm(conv, norm, x).sum(), x)
    plain = conv._conv_forward(x, conv.weight * scale.view(-1, 1, 1, 1), shift)
    assert torch.equal(grad_x, torch.autograd.grad(plain.sum(), x)[0])


def test_trunk_trains_channels_last_on_the_cpu_and_infers_as_before():
    trunk = build_backbone("resnet18", frozen_bn=True, out_features=["c2", "c5"])
    x = torch.rand(1, 3, 64, 64)
    maps = trunk.train()(x)
    assert all(m.is_contiguous(memory_format=torch.channels_last) for m in maps.values())
    with torch.no_grad():
        assert all(m.is_contiguous() for m in trunk(x).values())  # no autograd: as before
    torch.testing.assert_close(maps["c5"].detach(), trunk.eval()(x)["c5"], rtol=1e-4, atol=1e-4)
