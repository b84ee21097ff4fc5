"""Segmentation models: shape and stride per arch, losses with ignore, prediction, torchvision import."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torchvision.models import segmentation as tv_segmentation

import vision.backbones
from vision.checkpoint import checkpoint_weights, load_checkpoint
from vision.layers import IMAGENET_MEAN, IMAGENET_STD
from vision.segmentation import (
    SegmentationConfig,
    build_segmentation_model,
    load_torchvision_segmentation,
    predict_mask,
    save_torchvision_segmentation,
    segmentation_loss,
)

WEIGHTS_DIR = Path(__file__).resolve().parents[1] / "weights"


@pytest.mark.parametrize(
    ("arch", "output_stride"),
    [("fcn_resnet18", 8), ("deeplabv3_resnet18", 16), ("pspnet_resnet18", 8), ("deeplabv3plus_resnet18", 16),
     ("deeplabv3_resnet50", 8)],
)
def test_resnet_heads_shape_and_stride(arch, output_stride):
    torch.manual_seed(0)
    model = build_segmentation_model(
        SegmentationConfig(arch=arch, num_classes=3, output_stride=output_stride, aux_loss=True)
    ).eval()
    info = model.backbone.feature_info
    assert info["c5"].stride == output_stride and info["c4"].stride == min(output_stride, 16)
    images = torch.rand(2, 3, 67, 45)  # not a multiple of any stride
    features = model.backbone(model.normalize(images))
    assert features["c5"].shape[-2:] == (math.ceil(67 / output_stride), math.ceil(45 / output_stride))
    assert features["c5"].shape[1] == info["c5"].channels
    logits, losses = model(images)
    assert logits.shape == (2, 4, 67, 45)  # K + 1 = 4, at input size
    assert losses == {}


def test_fcn8s_vgg16_strides_crop_and_fc6_fc7_from_the_pretrained_classifier(monkeypatch):
    def fake_load_weights(net, weights, **_):  # stands in for reading an ImageNet file
        with torch.no_grad():
            fc6 = net.classifier[0].weight
            fc6.copy_(torch.linspace(-1, 1, fc6.numel()).view_as(fc6))
            net.classifier[3].bias.fill_(0.5)

    # One VGG-16 build for all checks (it is the slowest model to build).
    monkeypatch.setattr(vision.backbones, "load_weights", fake_load_weights)
    cfg = SegmentationConfig(arch="fcn8s_vgg16", num_classes=2, backbone_weights="imagenet")
    model = build_segmentation_model(cfg).eval()
    fc6 = model.head.fc6.weight
    assert fc6.shape == (4096, 512, 7, 7)
    assert torch.equal(fc6.flatten(1), torch.linspace(-1, 1, fc6.numel()).view(4096, -1))
    assert torch.all(model.head.fc7.bias == 0.5)

    strides = {name: f.stride for name, f in model.backbone.feature_info.items()}
    assert strides == {"pool3": 8, "pool4": 16, "pool5": 32}
    images = torch.rand(1, 3, 50, 70)  # padded to 64 x 96 inside, scores cropped back
    logits, _ = model(images, torch.zeros(1, 50, 70, dtype=torch.long))
    assert logits.shape == (1, 3, 50, 70)
    # Score layers start at zero (Long et al.): every pixel starts at 1 / (K + 1) for every class.
    assert torch.count_nonzero(logits) == 0


def test_training_mode_returns_losses_only_and_trains_everything():
    torch.manual_seed(0)
    model = build_segmentation_model(SegmentationConfig(arch="pspnet_resnet18", num_classes=2, aux_loss=True,
                                                        aux_weight=0.4)).train()
    images, targets = torch.rand(2, 3, 48, 40), torch.randint(0, 3, (2, 48, 40))
    targets[:, :5] = 255
    logits, losses = model(images, targets)
    assert logits is None and set(losses) == {"loss_seg", "loss_aux"}
    sum(losses.values()).backward()
    assert model.backbone.conv1.weight.grad.abs().sum() > 0
    assert model.aux_head.classifier.weight.grad.abs().sum() > 0

    model.eval()  # eval with targets: outputs and a validation loss
    logits, losses = model(images, targets)
    assert logits.shape == (2, 3, 48, 40)
    aux = model.aux_head(model.backbone(model.normalize(images)))
    aux = F.interpolate(aux, size=(48, 40), mode="bilinear")
    expected_aux = 0.4 * F.cross_entropy(aux, targets, ignore_index=255)
    assert torch.allclose(losses["loss_aux"], expected_aux, atol=1e-5)
    assert torch.allclose(losses["loss_seg"], F.cross_entropy(logits, targets, ignore_index=255), atol=1e-5)


def test_loss_ignores_255_by_hand():
    # Pixel 0: equal scores for 2 classes -> ln 2 whatever the target; pixel 1: huge wrong score but ignored.
    logits = torch.tensor([[0.0, 50.0], [0.0, -50.0]]).view(1, 2, 1, 2)
    targets = torch.tensor([[[1, 255]]])
    assert segmentation_loss(logits, targets).item() == pytest.approx(math.log(2))
    # Every pixel ignored: 0 with a zero gradient instead of NaN (0 / 0).
    logits.requires_grad_(True)
    loss = segmentation_loss(logits, torch.full((1, 1, 2), 255))
    loss.backward()
    assert loss.item() == 0 and torch.count_nonzero(logits.grad) == 0


def test_predict_mask_single_and_batch():
    torch.manual_seed(0)
    model = build_segmentation_model(SegmentationConfig(arch="fcn_resnet18", num_classes=2))
    image = torch.rand(3, 33, 21)
    labels, probabilities = predict_mask(model, image)
    assert labels.shape == (33, 21) and labels.dtype == torch.int64
    assert probabilities.shape == (3, 33, 21)
    assert torch.allclose(probabilities.sum(0), torch.ones(33, 21), atol=1e-5)
    logits, _ = model(image[None])
    assert torch.equal(labels, logits[0].argmax(0))
    batch_labels, batch_probabilities = predict_mask(model, image[None].expand(2, -1, -1, -1))
    assert batch_labels.shape == (2, 33, 21) and torch.equal(batch_labels[1], labels)


def test_bad_configs_and_inputs_are_clear_errors():
    with pytest.raises(ValueError, match="num_classes"):
        build_segmentation_model(SegmentationConfig(arch="fcn_resnet18"))
    with pytest.raises(ValueError, match="unknown segmentation arch"):
        build_segmentation_model(SegmentationConfig(arch="unet_resnet18", num_classes=2))
    with pytest.raises(ValueError, match="auxiliary head"):
        build_segmentation_model(SegmentationConfig(arch="fcn8s_vgg16", num_classes=2, aux_loss=True))
    model = build_segmentation_model(SegmentationConfig(arch="fcn_resnet18", num_classes=2))
    with pytest.raises(ValueError, match=r"images must be \[N, 3, H, W\]"):
        model(torch.rand(3, 32, 32))
    with pytest.raises(ValueError, match="targets must be"):
        model(torch.rand(1, 3, 32, 32), torch.zeros(1, 31, 32, dtype=torch.long))


def _randomise_batch_norms(model: torch.nn.Module) -> None:
    # Fresh BN layers are the identity in eval mode; random statistics make the comparison meaningful.
    gen = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=gen) * 0.1)


@pytest.mark.parametrize("arch", ["fcn_resnet50", "deeplabv3_resnet50"])
@pytest.mark.parametrize("aux_loss", [True, False])
@torch.no_grad()
def test_torchvision_state_dict_gives_the_same_output(arch, aux_loss, tmp_path):
    torch.manual_seed(0)
    tv_model = getattr(tv_segmentation, arch)(weights=None, weights_backbone=None, num_classes=5,
                                              aux_loss=aux_loss).eval()
    _randomise_batch_norms(tv_model)
    path = tmp_path / "tv.pth"
    torch.save(tv_model.state_dict(), path)

    ours, cfg = load_torchvision_segmentation(path, arch)
    ours.eval()
    assert cfg.num_classes == 4 and cfg.aux_loss == aux_loss and cfg.output_stride == 8
    images = torch.rand(1, 3, 64, 64)
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    normalised = (images - mean) / std  # torchvision models expect normalised input; ours normalise inside
    expected = tv_model(normalised)
    logits, _ = ours(images)
    assert (logits - expected["out"]).abs().max() <= 1e-4
    if aux_loss:
        aux = ours.aux_head(ours.backbone(ours.normalize(images)))
        aux = F.interpolate(aux, size=(64, 64), mode="bilinear", align_corners=False)
        assert (aux - expected["aux"]).abs().max() <= 1e-4
    if arch == "fcn_resnet50" and not aux_loss:
        # As a visiondet checkpoint: rebuilt by the same loader as trained checkpoints, same outputs.
        from apps.tasks import load_model

        names = [{"id": i, "name": f"class{i}"} for i in range(1, 5)]
        loaded = load_model(save_torchvision_segmentation(path, arch, tmp_path / "ours.pt", classes=names))
        assert loaded.task.name == "segmentation" and loaded.classes == names
        assert torch.equal(loaded.model(images)[0], logits)


def test_torchvision_import_rejects_the_wrong_arch():
    tv_model = tv_segmentation.deeplabv3_resnet50(weights=None, weights_backbone=None, num_classes=3)
    state = tv_model.state_dict()
    with pytest.raises(ValueError, match="not a torchvision fcn_resnet50 state dict"):
        load_torchvision_segmentation(state, "fcn_resnet50")
    with pytest.raises(ValueError, match="no torchvision import"):
        load_torchvision_segmentation(state, "pspnet_resnet50")


def test_a_visiondet_classifiers_trunk_starts_the_segmenter():
    """Transfer learning from one's own classifier (weights/build.sh's classifier_*): its file has its own
    head, not ImageNet's fc, and the segmentation trunk takes every trunk weight from it."""
    path = WEIGHTS_DIR / "classifier_shapes.pt"
    trunk = {k.removeprefix("backbone."): v for k, v in checkpoint_weights(load_checkpoint(path)).items()
             if k.startswith("backbone.")}
    cfg = SegmentationConfig(arch="deeplabv3plus_resnet18", num_classes=2, backbone_weights=str(path),
                             output_stride=16)
    model = build_segmentation_model(cfg)
    state = model.backbone.state_dict()
    loaded = [k for k in state if k in trunk]
    assert len(loaded) > 100 and "conv1.weight" in loaded and "layer4.1.bn2.running_var" in loaded
    assert all(torch.equal(state[k], trunk[k].float()) for k in loaded)
