"""Optimiser parameter groups, learning-rate schedules and the weight EMA, against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch
from support.engine import ToyModelConfig, ToyNet
from torch import nn

from apps.config import TrainConfig
from apps.engine.ema import ModelEMA
from apps.engine.optim import build_optimizer, param_groups
from apps.engine.schedule import build_scheduler, lr_factor

SPE = 10  # optimizer steps per epoch; 10 epochs -> 100 steps


@pytest.mark.parametrize("settings, expected", [
    (dict(scheduler="constant"), {0: 1.0, 99: 1.0}),
    (dict(scheduler="step", step_size=3, gamma=0.1), {0: 1.0, 29: 1.0, 30: 0.1, 59: 0.1, 60: 0.01}),
    (dict(scheduler="multistep", milestones=[2, 5], gamma=0.5), {19: 1.0, 20: 0.5, 49: 0.5, 50: 0.25}),
    (dict(scheduler="cosine"), {0: 1.0, 25: (1 + math.cos(math.pi / 4)) / 2, 50: 0.5, 100: 0.0}),
    (dict(scheduler="cosine", min_lr_ratio=0.1), {50: 0.55, 100: 0.1}),
    (dict(scheduler="poly", power=2.0), {0: 1.0, 50: 0.25, 90: 0.01}),
    (dict(scheduler="poly", power=0.9), {50: 0.5 ** 0.9}),
    (dict(scheduler="cyclic", cycle_epochs=2, min_lr_ratio=0.2),
     {0: 0.2, 5: 0.6, 10: 1.0, 15: 0.6, 20: 0.2, 25: 0.6}),
    (dict(scheduler="constant", warmup_iters=10, warmup_factor=0.001), {0: 0.001, 5: 0.5005, 10: 1.0}),
    (dict(scheduler="cosine", warmup_iters=10, warmup_factor=0.0),
     {5: 0.5 * (1 + math.cos(math.pi * 0.05)) / 2, 10: (1 + math.cos(math.pi * 0.1)) / 2}),
])
def test_schedule_values(settings, expected):
    cfg = TrainConfig(epochs=10, **settings)
    for step, value in expected.items():
        assert lr_factor(step, cfg, SPE) == pytest.approx(value, abs=1e-12), step


def test_scheduler_drives_every_group_from_its_own_base_lr():
    cfg = TrainConfig(epochs=10, lr=0.2, scheduler="multistep", milestones=[1], gamma=0.1, warmup_iters=4,
                      warmup_factor=0.5, backbone_lr_mult=0.1)
    opt = build_optimizer(ToyNet(ToyModelConfig()), cfg)
    sched = build_scheduler(opt, cfg, SPE)
    seen = []
    for _ in range(12):
        seen.append({g["name"]: g["lr"] for g in opt.param_groups})
        opt.step()
        sched.step()
    assert seen[0]["head"] == pytest.approx(0.1) and seen[0]["backbone"] == pytest.approx(0.01)
    assert seen[2]["head"] == pytest.approx(0.2 * 0.75)
    assert seen[9]["head"] == pytest.approx(0.2) and seen[9]["backbone_no_decay"] == pytest.approx(0.02)
    assert seen[10]["head"] == pytest.approx(0.02) and seen[11]["backbone"] == pytest.approx(0.002)


def test_param_groups_split_norms_biases_and_backbone():
    model = ToyNet(ToyModelConfig())
    groups = param_groups(model, lr=1.0, weight_decay=0.5, norm_weight_decay=0.0, backbone_lr_mult=0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    got = {g["name"]: (sorted(names[id(p)] for p in g["params"]), g["lr"], g["weight_decay"]) for g in groups}
    assert got == {
        "head": (["head.weight"], 1.0, 0.5),
        "head_no_decay": (["head.bias"], 1.0, 0.0),
        "backbone": (["backbone.0.weight"], 0.1, 0.5),
        "backbone_no_decay": (["backbone.0.bias", "backbone.1.bias", "backbone.1.weight"], 0.1, 0.0),
    }
    assert groups[0]["name"] == "head"  # the group whose lr is logged


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_no_weight_decay_on_norms_and_biases(optimizer):
    # With zero gradients the only change a step makes is weight decay: lr * wd = 0.05 -> x 0.95.
    torch.manual_seed(0)
    model = ToyNet(ToyModelConfig())
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    cfg = TrainConfig(optimizer=optimizer, lr=0.1, weight_decay=0.5, momentum=0.0)
    opt = build_optimizer(model, cfg)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    for name, p in model.named_parameters():
        decayed = name in ("head.weight", "backbone.0.weight")
        assert torch.allclose(p, before[name] * (0.95 if decayed else 1.0), atol=1e-7), name


def test_frozen_parameters_wait_in_the_optimizer_until_unfrozen():
    model = ToyNet(ToyModelConfig())
    model.backbone.requires_grad_(False)
    opt = build_optimizer(model, TrainConfig(lr=0.1, momentum=0.0, weight_decay=0.0))
    frozen = model.backbone[0].weight.detach().clone()
    x, y = torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 0, 1])
    model(x, y)[1]["loss_cls"].backward()
    opt.step()
    assert torch.equal(model.backbone[0].weight, frozen)
    model.backbone.requires_grad_(True)
    opt.zero_grad()
    model(x, y)[1]["loss_cls"].backward()
    opt.step()
    assert not torch.equal(model.backbone[0].weight, frozen)


def test_optimizer_kinds_and_settings():
    model = nn.Linear(2, 2)
    sgd = build_optimizer(model, TrainConfig(optimizer="sgd", momentum=0.8, nesterov=True))
    assert isinstance(sgd, torch.optim.SGD) and sgd.defaults["nesterov"] and sgd.defaults["momentum"] == 0.8
    adam = build_optimizer(model, TrainConfig(optimizer="adam", betas=(0.8, 0.95)))
    assert isinstance(adam, torch.optim.Adam) and adam.defaults["betas"] == (0.8, 0.95)
    assert isinstance(build_optimizer(model, TrainConfig(optimizer="adagrad")), torch.optim.Adagrad)
    assert isinstance(build_optimizer(model, TrainConfig(optimizer="rmsprop")), torch.optim.RMSprop)
    assert type(build_optimizer(model, TrainConfig(optimizer="adamw"))) is torch.optim.AdamW


def test_ema_follows_the_warmed_up_decay():
    model = nn.Sequential(nn.Linear(1, 1, bias=False), nn.BatchNorm1d(1))
    ema = ModelEMA(model, decay=0.9)
    weight = model[0].weight
    for value in (1.0, 3.0, 0.0):
        with torch.no_grad():
            weight.fill_(value)
            model[1].running_mean.fill_(value)
        model[1].num_batches_tracked += 1
        ema.update(model)
    # update 1 copies (1); update 2: d = 2/11 -> 1 + 9/11 * 2; update 3: d = 3/12 -> x * 0.25
    expected = (1 + 18 / 11) * 0.25
    state = ema.state_dict()
    assert list(state) == list(model.state_dict())
    assert state["0.weight"].item() == pytest.approx(expected)
    assert state["1.running_mean"].item() == pytest.approx(expected)
    assert state["1.num_batches_tracked"].item() == 3
    assert ema.updates == 3 and ema.current_decay(10_000) == 0.9
    restored = ModelEMA(model, decay=0.9)
    restored.load_state_dict(state, ema.updates)
    assert restored.updates == 3 and restored.module[0].weight.item() == pytest.approx(expected)
