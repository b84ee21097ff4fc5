"""Mixed precision, gradient scaling, clipping and accumulation through the real trainer, on the CPU.

`train.amp=true` on the CPU is bfloat16 autocast (float16 with `train.amp_dtype=float16`, which brings the
gradient scaler): one step of each real task runs under it. A linear task whose gradients are known in
closed form checks what the optimizer applies: the mean over the accumulated batches, clipped to
`train.grad_clip`, and nothing at all when float16 gradients overflow (the scaler backs off, the run goes on).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from support.engine import CLASSES, ToyTask, register_toy_task, toy_config
from torch import nn
from torch.utils.data import Dataset

from apps.config import build_experiment
from apps.engine import precision
from apps.engine.trainer import train
from apps.tasks import TASKS, get_task
from apps.tasks.base import Datasets
from vision.checkpoint import load_checkpoint
from vision.data.synthetic import make_shapes

# ---- one step of each real task under bfloat16 autocast ---------------------------------------------------


def _split(folder: Path) -> dict[str, str]:
    return {"images": str(folder / "images"), "annotations": str(folder / "annotations.json")}


def _classification(root: Path) -> dict[str, Any]:
    shapes = make_shapes("classification", root, num_images=6, seed=0, image_size=32, val_fraction=0.5)
    return {"model": {"backbone": "resnet18"},
            "data": {"train": {"root": str(shapes["train"])}, "options": {"size": 32}}}


def _segmentation(root: Path) -> dict[str, Any]:
    shapes = make_shapes("segmentation", root, num_images=3, seed=0, image_size=(40, 48), val_fraction=0.34)
    return {"model": {"arch": "fcn_resnet18", "output_stride": 16},
            "data": {"train": _split(shapes["train"]), "options": {"crop_size": 32}}}


def _detection(root: Path) -> dict[str, Any]:
    shapes = make_shapes("detection", root, num_images=3, seed=0, image_size=(64, 80), val_fraction=0.34)
    model = {"arch": "faster_rcnn_r18_fpn", "frozen_bn": False, "min_size": 64, "max_size": 80,
             "fpn_channels": 32, "rpn": {"anchor_sizes": [[16], [32], [64], [128], [256]],
                                         "post_nms_top_n_train": 32},
             "roi": {"representation_size": 32, "batch_size_per_image": 16}}
    return {"model": model, "data": {"train": _split(shapes["train"])}}


@pytest.mark.parametrize("task, make", [("classification", _classification), ("segmentation", _segmentation),
                                        ("detection", _detection)])
def test_one_step_of_each_task_under_bfloat16_autocast(task, make, tmp_path, monkeypatch):
    torch.manual_seed(0)
    cfg = make(tmp_path / "data")
    cfg.update(task=task, device="cpu", output_dir=str(tmp_path / "run"))
    cfg["data"].update(val=None, workers=0)
    cfg["train"] = {"epochs": 1, "batch_size": 2, "lr": 0.01, "log_every": 1, "amp": True}

    dtypes: list[torch.dtype] = []  # what the convolutions computed in
    initial: dict[str, torch.Tensor] = {}
    kind = type(get_task(task))
    build = kind.build_model

    def recording_build(self, *args, **kwargs):
        model = build(self, *args, **kwargs)
        initial.update({k: v.detach().clone() for k, v in model.state_dict().items()})
        for module in model.modules():
            if isinstance(module, nn.Conv2d):
                module.register_forward_hook(lambda m, i, out: dtypes.append(out.dtype))
        return model

    monkeypatch.setattr(kind, "build_model", recording_build)
    result = train(build_experiment(cfg))

    assert result.status == "completed"
    assert dtypes and set(dtypes) == {torch.bfloat16}, set(dtypes)
    run = tmp_path / "run"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "train"] == [1]
    assert all(math.isfinite(v) for v in rows[0].values() if isinstance(v, float))
    assert "grad_scale" not in rows[0]  # bfloat16 needs no scaler
    assert "mixed precision: bfloat16 autocast on cpu" in (run / "train.log").read_text()
    state = load_checkpoint(run / "last.pt")["state_dict"]
    assert {v.dtype for v in state.values() if v.is_floating_point()} == {torch.float32}  # fp32 weights
    moved = [k for k, v in state.items() if v.is_floating_point() and not torch.equal(v, initial[k])]
    assert moved, "the optimizer step changed no weight"


# ---- a task whose gradients are known: loss = mean over the batch of w . x --------------------------------


class InfGrad(torch.autograd.Function):
    """Identity forward; backward returns infinity (a float16 overflow, injected)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf")


class LinearNet(nn.Module):
    """``loss_lin = mean_n (w . x_n)``: its gradient in ``w`` is the mean of the batch's ``x``."""

    overflow_calls: set[int] = set()  # forward calls (0-based) whose gradient overflows

    def __init__(self, w: torch.Tensor) -> None:
        super().__init__()
        self.w = nn.Parameter(w.clone())
        self.calls = 0

    def forward(self, images: torch.Tensor, targets: Any = None):
        w = InfGrad.apply(self.w) if self.calls in self.overflow_calls else self.w
        self.calls += 1
        return None, {"loss_lin": (images.flatten(1) @ w).mean()}


W0 = torch.tensor([0.5, -1.0, 2.0])


class Items(Dataset):
    def __init__(self, rows: list[list[float]]) -> None:
        self.rows = torch.tensor(rows)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.rows[i], 0


class LinearTask(ToyTask):
    name = "linear"
    rows: list[list[float]] = []

    def build_model(self, model_cfg, classes, *, load_pretrained: bool = True) -> nn.Module:
        return LinearNet(W0)

    def build_datasets(self, exp) -> Datasets:
        return Datasets(Items(self.rows), None, CLASSES)


@pytest.fixture
def linear(monkeypatch):
    monkeypatch.setitem(TASKS, "toy", "support.engine:ToyTask")
    monkeypatch.setitem(TASKS, "linear", "test_engine_amp:LinearTask")
    register_toy_task()
    monkeypatch.setattr(LinearNet, "overflow_calls", set())

    def run(tmp_path: Path, rows: list[list[float]], **settings: Any) -> dict[str, Any]:
        monkeypatch.setattr(LinearTask, "rows", rows)
        cfg = toy_config(tmp_path, epochs=1, optimizer="sgd", momentum=0.0, weight_decay=0.0,
                         scheduler="constant", **settings)
        cfg["task"] = "linear"
        cfg["data"]["val"] = None
        train(build_experiment(cfg))
        return load_checkpoint(tmp_path / "run" / "last.pt")

    return run


def test_the_applied_gradient_is_the_clipped_mean_of_the_accumulated_batches(linear, tmp_path):
    rows = [[3.0, 0.0, 4.0], [1.0, 2.0, 2.0], [0.0, 0.0, 0.0], [2.0, -2.0, 0.0]]
    ckpt = linear(tmp_path, rows, batch_size=2, accum_steps=2, lr=0.5, grad_clip=1.0)
    # one window of two batches of two: the gradient is the mean of the four rows, whatever the order
    mean = torch.tensor(rows).mean(0)  # [1.5, 0, 1.5], norm 2.1213 > 1: scaled to norm 1
    clipped = mean / mean.norm()
    assert ckpt["train_state"]["step"] == 1
    assert torch.allclose(ckpt["state_dict"]["w"], W0 - 0.5 * clipped, atol=1e-5)


def test_an_unclipped_gradient_is_applied_as_it_is(linear, tmp_path):
    rows = [[0.2, 0.0, 0.1], [0.0, 0.4, 0.1]]
    ckpt = linear(tmp_path, rows, batch_size=1, accum_steps=2, lr=1.0, grad_clip=10.0)
    assert torch.allclose(ckpt["state_dict"]["w"], W0 - torch.tensor([0.1, 0.2, 0.1]), atol=1e-6)


def test_a_float16_overflow_skips_its_step_lowers_the_scale_and_the_run_goes_on(linear, tmp_path):
    LinearNet.overflow_calls = {0}  # the first batch's gradient is infinite; its loss is finite
    rows = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]
    ckpt = linear(tmp_path, rows, batch_size=1, lr=1.0, amp=True, amp_dtype="float16")
    state = ckpt["train_state"]
    # three batches, one optimizer step each; the first was skipped, the next two applied
    assert (state["epoch"], state["step"]) == (1, 2)
    assert state["scaler"]["scale"] == 65536.0 / 2  # torch's initial scale, backed off once
    # which two rows were applied depends on the shuffled order: find it from the moved weights
    moved = W0 - ckpt["state_dict"]["w"].float()
    applied = sorted(int(i) for i in torch.nonzero(moved > 0.5).flatten())
    assert len(applied) == 2 and torch.allclose(moved, (moved > 0.5).float(), atol=1e-3), moved
    assert torch.isfinite(ckpt["state_dict"]["w"]).all()
    rows_logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["grad_scale"] for r in rows_logged if r["kind"] == "train"] == [32768.0, 32768.0]
    log = (tmp_path / "run" / "train.log").read_text()
    assert "float16 autocast on cpu with a gradient scaler" in log and "non-finite loss" not in log


# ---- train.amp: auto: bfloat16 where the processor computes it natively ----------------------------------


def test_cpu_flags_are_read_from_x86_and_arm_cpuinfo(tmp_path):
    x86 = tmp_path / "x86"
    x86.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16\n\nprocessor\t: 1\n"
                   "flags\t\t: fpu avx2 avx512f avx512_bf16\n")
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\nCPU implementer\t: 0x41\n")
    assert {"avx512_bf16", "avx2"} <= precision.cpu_flags(x86) and "bf16" in precision.cpu_flags(arm)
    assert precision.cpu_flags(tmp_path / "missing") == set()


@pytest.mark.parametrize("flags, expected", [
    ({"avx2", "avx512f", "avx512_bf16"}, "CPU flags avx512_bf16"),
    ({"avx512f", "amx_tile", "amx_bf16", "avx512_bf16"}, "CPU flags amx_bf16, avx512_bf16"),
    ({"asimd", "bf16"}, "CPU flags bf16"),
    ({"avx2", "avx512f"}, None),  # AVX-512 without BF16: bfloat16 would be emulated, slower than float32
    (set(), None),
])
def test_native_bfloat16_on_the_cpu_follows_its_flags(flags, expected, monkeypatch):
    monkeypatch.setattr(precision, "cpu_flags", lambda: flags)
    assert precision.native_bfloat16(torch.device("cpu")) == expected


@pytest.mark.parametrize("native, capability, expected", [
    (True, (8, 0), "GPU of compute capability 8.0"), (False, (7, 5), None)])
def test_native_bfloat16_on_a_gpu_excludes_emulation(native, capability, expected, monkeypatch):
    asked = []

    def is_bf16_supported(including_emulation=True):
        asked.append(including_emulation)
        return native or including_emulation  # a Turing GPU emulates bfloat16

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert precision.native_bfloat16(torch.device("cuda", 0)) == expected and asked == [False]


@pytest.mark.parametrize("flags, dtype", [({"avx512_bf16"}, torch.bfloat16), ({"avx2"}, torch.float32)])
def test_amp_auto_trains_in_bfloat16_only_where_native_and_says_so(flags, dtype, tmp_path, monkeypatch):
    monkeypatch.setitem(TASKS, "toy", "test_engine_support:ToyTask")
    register_toy_task()
    monkeypatch.setattr(precision, "cpu_flags", lambda: flags)
    dtypes: list[torch.dtype] = []
    build = ToyTask.build_model

    def recording_build(self, *args, **kwargs):
        model = build(self, *args, **kwargs)
        model.backbone[0].register_forward_hook(lambda m, i, out: dtypes.append(out.dtype))
        return model

    monkeypatch.setattr(ToyTask, "build_model", recording_build)
    cfg = toy_config(tmp_path, epochs=1, amp="auto")
    cfg["data"]["val"] = None
    train(build_experiment(cfg))
    assert dtypes and set(dtypes) == {dtype}
    log = (tmp_path / "run" / "train.log").read_text()
    said = ("mixed precision: train.amp=auto: bfloat16 autocast on cpu (CPU flags avx512_bf16)"
            if dtype == torch.bfloat16 else "mixed precision: train.amp=auto: float32 (this cpu computes no "
            "bfloat16 natively)")
    assert said in log
