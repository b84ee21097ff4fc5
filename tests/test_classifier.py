"""Classifier: forward/loss contract, normalisation inside, transfer learning (freeze, unfreeze, lr)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from vision.classification import Classifier, ClassifierConfig


def make(**overrides) -> Classifier:
    torch.manual_seed(0)
    return Classifier(ClassifierConfig(**{"num_classes": 5, **overrides}))


def test_forward_contract_in_train_and_eval():
    model = make()
    images, targets = torch.rand(2, 3, 64, 64), torch.tensor([0, 4])
    outputs, losses = model.train()(images, targets)
    assert outputs is None and set(losses) == {"loss_cls"} and losses["loss_cls"].dim() == 0

    model.eval()
    outputs, losses = model(images, targets)
    assert outputs.shape == (2, 5)
    assert torch.allclose(losses["loss_cls"], F.cross_entropy(outputs, targets))
    outputs, losses = model(images)
    assert outputs.shape == (2, 5) and losses == {}


def test_loss_of_a_zero_head_is_log_k():
    model = make().eval()
    nn.init.zeros_(model.head.weight)
    nn.init.zeros_(model.head.bias)
    _, losses = model(torch.rand(3, 3, 32, 32), torch.tensor([0, 1, 2]))
    assert losses["loss_cls"].item() == pytest.approx(math.log(5), abs=1e-6)  # uniform over 5 classes


def test_normalisation_happens_inside_the_model():
    mean, std = (0.5, 0.25, 0.125), (0.5, 0.25, 2.0)
    model = make(mean=mean, std=std).eval()
    x = torch.rand(1, 3, 32, 32)
    manual = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    with torch.inference_mode():
        features = model.backbone(manual)["c5"].mean(dim=(2, 3))
        assert torch.allclose(model(x)[0], model.head(features), atol=1e-6)
    assert not any(k.startswith("normalize.") for k in model.state_dict())  # config, not weights


def test_bad_inputs_are_clear_errors():
    model = make().eval()
    with pytest.raises(ValueError, match=r"images \[N, 3, H, W\]"):
        model(torch.rand(3, 32, 32))
    with pytest.raises(ValueError, match=r"targets \[N\]"):
        model(torch.rand(2, 3, 32, 32), torch.tensor([[0], [1]]))
    with pytest.raises(ValueError, match="num_classes"):
        Classifier(ClassifierConfig(num_classes=0))


def test_frozen_backbone_trains_only_the_head_then_unfreezes():
    model = make(freeze_at=5, dropout=0.5)
    bn = model.backbone.bn1
    stats = bn.running_mean.clone()
    optimizer = torch.optim.SGD(model.param_groups(lr=0.1, backbone_lr_mult=0.1), lr=0.1)
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.1, 0.01])
    trunk_before = model.backbone.layer1[0].conv1.weight.clone()
    head_before = model.head.weight.clone()

    model.train()
    assert not model.backbone.training and model.head.training and model.dropout.training
    _, losses = model(torch.rand(4, 3, 32, 32), torch.tensor([0, 1, 2, 3]))
    losses["loss_cls"].backward()
    optimizer.step()
    assert all(p.grad is None for p in model.backbone.parameters())
    assert torch.equal(model.backbone.layer1[0].conv1.weight, trunk_before)
    assert torch.equal(bn.running_mean, stats)  # BN kept in eval mode: statistics unchanged
    assert not torch.equal(model.head.weight, head_before)

    # Phase two: the same optimizer now updates the trunk, at the lower learning rate.
    model.unfreeze_backbone()
    model.train()
    assert model.backbone.training
    optimizer.zero_grad()
    _, losses = model(torch.rand(4, 3, 32, 32), torch.tensor([0, 1, 2, 3]))
    losses["loss_cls"].backward()
    grad = model.backbone.layer1[0].conv1.weight.grad.clone()
    optimizer.step()
    step = trunk_before - model.backbone.layer1[0].conv1.weight
    assert torch.allclose(step, 0.01 * grad, atol=1e-7)
    assert not torch.equal(bn.running_mean, stats)


def test_torchvision_imagenet_state_dict_loads_into_the_trunk(tmp_path):
    torch.manual_seed(1)
    tv = torchvision.models.resnet18(weights=None).eval()
    path = tmp_path / "resnet18-imagenet-like.pth"
    torch.save(tv.state_dict(), path)
    model = make(backbone_weights=str(path)).eval()
    assert model.head.out_features == 5
    x = torch.rand(1, 3, 32, 32)
    with torch.inference_mode():
        c5 = tv.layer4(tv.layer3(tv.layer2(tv.layer1(tv.maxpool(tv.relu(tv.bn1(tv.conv1(x))))))))
        assert torch.allclose(model.backbone(x)["c5"], c5, atol=1e-5)
    # Rebuilding from a checkpoint must not read the pretrained file again.
    path.unlink()
    rebuilt = Classifier(model.cfg, load_pretrained=False)
    rebuilt.load_state_dict(model.state_dict())


def test_vgg_classifier_uses_pool5():
    model = make(backbone="vgg11").eval()
    assert model.feature_name == "pool5" and model.head.in_features == 512
    assert not hasattr(model.backbone, "classifier")  # fc6/fc7 are not part of this classifier
    assert model(torch.rand(1, 3, 32, 32))[0].shape == (1, 5)
