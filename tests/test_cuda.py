"""The GPU paths: training in fp32 / fp16 / bf16, torchvision's converted weights on GPU against the CPU,
`visiondet predict` and the demo's handlers on cuda, a GPU-trained run resumed and used on the CPU, DDP over
NCCL and a compiled backbone.

Marked ``cuda``: run them with ``pytest -m cuda`` on a machine with a GPU (benchmarks/gpu.py does). Without
one every test here is skipped with the reason, so plain ``pytest`` still lists them.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torchvision
from PIL import Image
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torchvision.ops import box_iou

import apps.engine.trainer
from apps.cli import main
from apps.config import build_experiment
from apps.engine.trainer import train
from apps.tasks import get_task, load_model
from detection.models import RoIConfig
from detection.structures import Detections
from detection.torchvision_weights import load_torchvision_detector
from vision.checkpoint import load_checkpoint
from vision.data.synthetic import make_shapes

DEVICE = "cuda"
NO_GPU = "no CUDA GPU on this machine; run `pytest -m cuda` on one (benchmarks/gpu.py does)"
pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_GPU)]

PRECISIONS = {"fp32": ({"amp": False}, torch.float32),
              "fp16": ({"amp": True, "amp_dtype": "float16"}, torch.float16),
              "bf16": ({"amp": True, "amp_dtype": "bfloat16"}, torch.bfloat16)}
# small images and a light head keep every test here within seconds on a GPU
TINY_R18 = {"arch": "faster_rcnn_r18_fpn", "frozen_bn": False, "freeze_at": 0,
            "min_size": 96, "max_size": 128, "fpn_channels": 32,
            "rpn": {"anchor_sizes": [[16], [32], [64], [128], [256]], "post_nms_top_n_train": 64,
                    "post_nms_top_n_test": 32},
            "roi": {"representation_size": 32, "batch_size_per_image": 32, "detections_per_img": 20}}


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("shapes_cuda")
    return make_shapes("detection", root, num_images=8, seed=0, image_size=(96, 128), val_fraction=0.25)


def _split(folder: Path) -> dict[str, str]:
    return {"images": str(folder / "images"), "annotations": str(folder / "annotations.json")}


def experiment(shapes: dict[str, Path], out: Path, model: dict[str, Any], *, val: bool = True,
               **train_settings: Any) -> dict[str, Any]:
    return {"task": "detection", "model": model, "device": DEVICE, "output_dir": str(out), "seed": 0,
            "data": {"train": _split(shapes["train"]), "val": _split(shapes["val"]) if val else None,
                     "workers": 2},
            "train": {"epochs": 1, "batch_size": 2, "lr": 0.01, "log_every": 1, "grad_clip": 10.0,
                      **train_settings}}


def _train_rows(run: Path) -> list[dict[str, Any]]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["kind"] == "train"]


@pytest.fixture
def strict_fp32() -> Iterator[None]:
    """TF32 off: GPU float32 then differs from the CPU by rounding only."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


# ---- training precision -----------------------------------------------------------------------------------


@pytest.mark.parametrize("precision", list(PRECISIONS))
def test_faster_rcnn_r50_fpn_trains_on_the_gpu(precision, shapes, tmp_path, monkeypatch):
    settings, dtype = PRECISIONS[precision]
    model = {"arch": "faster_rcnn_r50_fpn", "min_size": 128, "max_size": 160}  # frozen BN, 3 trainable stages
    cfg = experiment(shapes, tmp_path / "run", model, val=False, **settings)

    seen: list[tuple[torch.dtype, str]] = []  # (dtype, device) of every convolution's output
    kind = type(get_task("detection"))
    build = kind.build_model

    def recording_build(self, *args, **kwargs):
        built = build(self, *args, **kwargs)
        for module in built.modules():
            if isinstance(module, nn.Conv2d):
                module.register_forward_hook(lambda m, i, out: seen.append((out.dtype, out.device.type)))
        return built

    monkeypatch.setattr(kind, "build_model", recording_build)
    result = train(build_experiment(cfg))

    assert result.status == "completed" and result.epochs_done == 1
    assert set(seen) == {(dtype, DEVICE)}, set(seen)
    rows = _train_rows(tmp_path / "run")
    ckpt = load_checkpoint(tmp_path / "run" / "last.pt")
    steps = ckpt["train_state"]["step"]
    assert len(rows) == steps
    if precision == "fp16":  # the scaler may skip overflowing first steps: each one halves its scale
        skipped = math.log2(65536.0 / ckpt["train_state"]["scaler"]["scale"])
        assert steps + skipped == 3 and all(r["grad_scale"] <= 65536.0 for r in rows)
    else:  # 6 images, batches of 2
        assert steps == 3 and not any("grad_scale" in r for r in rows)
    for row in rows:
        assert all(math.isfinite(v) for k, v in row.items() if k.startswith("loss")), row
        assert 0.0 <= row["data_wait"] <= 1.0
    assert all(torch.isfinite(v.float()).all() for v in ckpt["state_dict"].values())


# ---- converted torchvision weights: GPU against CPU -------------------------------------------------------


def _matched(a: Detections, b: Detections, k: int) -> torch.Tensor:
    """For each of ``a``'s ``k`` best detections: is there one in ``b`` with its label, IoU >= 0.98 and a
    score within 1e-3? (Random weights give many near-equal scores: a rank swap at the cut is not a miss.)"""
    top = a.scores.argsort(descending=True)[:k]
    iou = box_iou(a.boxes[top], b.boxes)
    same = (a.labels[top, None] == b.labels[None]) & ((a.scores[top, None] - b.scores[None]).abs() <= 1e-3)
    return ((iou >= 0.98) & same).any(1)


def test_converted_torchvision_weights_detect_the_same_on_gpu_as_on_cpu(tmp_path, strict_fp32):
    torch.manual_seed(0)
    theirs = torchvision.models.detection.fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None)
    torch.save(theirs.state_dict(), tmp_path / "fasterrcnn_resnet50_fpn.pth")
    # a score cut just under 1/91 keeps random-init detections (as in test_detection_convert.py)
    cpu_model, _ = load_torchvision_detector(tmp_path / "fasterrcnn_resnet50_fpn.pth", min_size=512,
                                             max_size=512, roi=RoIConfig(score_thresh=0.0112))
    cpu_model.eval()
    gpu_model = copy.deepcopy(cpu_model).to(DEVICE)
    torch.manual_seed(1)
    images = [torch.rand(3, 400, 512), torch.rand(3, 512, 320)]
    with torch.inference_mode():
        on_cpu, _ = cpu_model(images)
        on_gpu, _ = gpu_model([im.to(DEVICE) for im in images])
    for c, g in zip(on_cpu, on_gpu, strict=True):
        g = g.to("cpu")
        assert len(c.scores) >= 20 and abs(len(c.scores) - len(g.scores)) <= 0.1 * len(c.scores)
        assert _matched(c, g, 20).sum() >= 18 and _matched(g, c, 20).sum() >= 18


# ---- a run trained on the GPU: predict, demo, resume on the CPU --------------------------------------------


class _Stop(Exception):
    pass


@pytest.fixture(scope="module")
def gpu_run(shapes, tmp_path_factory) -> Path:
    """A 2-epoch float16 run on the GPU stopped after its first epoch (last.pt and best.pt written)."""
    run = tmp_path_factory.mktemp("gpu_run") / "run"
    save_last = apps.engine.trainer._Trainer._save_last

    def save_then_stop(self):
        save_last(self)
        raise _Stop

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(apps.engine.trainer._Trainer, "_save_last", save_then_stop)
        with pytest.raises(_Stop):
            train(build_experiment(experiment(shapes, run, TINY_R18, epochs=2, amp=True,
                                              amp_dtype="float16")))
    return run


def test_predict_runs_on_cuda(gpu_run, shapes, tmp_path):
    out = tmp_path / "out"
    code = main(["predict", "--weights", str(gpu_run / "best.pt"), "--source", str(shapes["val"] / "images"),
                 "--output", str(out), "--device", DEVICE, "--score-threshold", "0.0", "--workers", "2",
                 "--no-progress"])
    assert code == 0
    records = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(records) == len(list((shapes["val"] / "images").iterdir())) == 2
    assert all(r["detections"] for r in records)  # a threshold of 0 keeps the head's boxes

    from apps.predict.predictor import Predictor

    image = np.array(Image.open(next((shapes["val"] / "images").iterdir())).convert("RGB"))
    on_gpu = Predictor(str(gpu_run / "best.pt"), DEVICE, score_thresh=0.0).predict([image])[0]
    on_cpu = Predictor(str(gpu_run / "best.pt"), "cpu", score_thresh=0.0).predict([image])[0]
    assert len(on_gpu.scores) > 0 and abs(len(on_gpu.scores) - len(on_cpu.scores)) <= 2
    assert abs(float(on_gpu.scores.max()) - float(on_cpu.scores.max())) <= 1e-2


def test_the_demo_handlers_run_on_cuda(gpu_run, shapes, tmp_path):
    from apps.demo.handlers import DemoHandlers
    from apps.demo.models import ModelCache, find_checkpoints

    found, problems = find_checkpoints([], [gpu_run / "best.pt"])
    assert not problems and len(found) == 1
    handlers = DemoHandlers(ModelCache(found, DEVICE), max_pixels=10_000_000, max_side=640,
                            files_dir=tmp_path / "files")
    image = str(next((shapes["val"] / "images").iterdir()))
    picture, rows, json_path, info = handlers.detect(image, found[0].label, 0.0, 0.5, None)
    assert picture.ndim == 3 and rows and f"on {DEVICE}" in info
    assert json.loads(Path(json_path).read_text())["detections"]
    explained = handlers.explain(image, found[0].label, 50.0, 50.0, 10, 0.0)
    assert explained and isinstance(explained[-1], str)


def test_a_gpu_trained_run_resumes_and_predicts_on_the_cpu(gpu_run, shapes, tmp_path):
    before = load_checkpoint(gpu_run / "last.pt")
    assert before["train_state"]["epoch"] == 1 and before["train_state"]["scaler"] is not None
    cfg = experiment(shapes, gpu_run, TINY_R18, epochs=2, amp=True, amp_dtype="float16")
    cfg.update(device="cpu", resume=str(gpu_run / "last.pt"), resume_force=True)  # (a longer schedule)
    result = train(build_experiment(cfg))
    assert result.status == "completed" and result.epochs_done == 2
    after = load_checkpoint(gpu_run / "last.pt")
    assert after["train_state"]["step"] > before["train_state"]["step"]
    assert all(v.device.type == "cpu" for v in after["state_dict"].values())

    from apps.predict.predictor import Predictor

    loaded = load_model(gpu_run / "best.pt", "cpu")
    assert all(p.device.type == "cpu" for p in loaded.model.parameters())
    image = np.array(Image.open(next((shapes["val"] / "images").iterdir())).convert("RGB"))
    result = Predictor(str(gpu_run / "best.pt"), "cpu", score_thresh=0.0).predict([image])[0]
    assert result.boxes.shape[1] == 4 and np.isfinite(result.boxes).all()


# ---- DDP over NCCL and a compiled backbone ---------------------------------------------------------------


def _batch() -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 96, 128, generator=g).to(DEVICE) for _ in range(2)]
    targets = [{"boxes": torch.tensor([[10.0, 12.0, 60.0, 70.0], [70.0, 20.0, 120.0, 90.0]], device=DEVICE),
                "labels": torch.tensor([1, 3], device=DEVICE)} for _ in range(2)]
    return images, targets


def test_ddp_over_nccl_gives_the_single_process_gradients(tmp_path, strict_fp32, tiny_detector):
    backend = "nccl" if DEVICE == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"file://{tmp_path / 'group'}", rank=0, world_size=1)
    try:
        model = tiny_detector(**TINY_R18, num_classes=3, seed=0).to(DEVICE).train()
        alone = copy.deepcopy(model)
        ddp = DistributedDataParallel(model, device_ids=[0] if DEVICE == "cuda" else None,
                                      find_unused_parameters=get_task("detection").find_unused_parameters)
        images, targets = _batch()
        losses = []
        for net in (ddp, alone):
            torch.manual_seed(1)  # the same sampled anchors and regions in both
            _, loss = net(images, targets)  # float32: only summation order may differ (atomics)
            total = sum(loss.values())
            total.backward()
            losses.append(total.detach().float())
        assert torch.isfinite(losses[0]) and torch.allclose(losses[0], losses[1], rtol=1e-4)
        for (name, p), q in zip(model.named_parameters(), alone.parameters(), strict=True):
            assert (p.grad is None) == (q.grad is None), name
            if p.grad is not None:
                assert torch.allclose(p.grad, q.grad, rtol=1e-3, atol=1e-5), name
        one = torch.ones(1, device=DEVICE)
        dist.all_reduce(one)
        assert one.item() == 1.0
    finally:
        dist.destroy_process_group()


def test_a_compiled_backbone_matches_eager_and_trains(strict_fp32, tiny_detector):
    model = tiny_detector(**TINY_R18, num_classes=3, seed=0).to(DEVICE)
    eager = copy.deepcopy(model.backbone).eval()
    model.backbone.compile()  # in place: same module, same state-dict keys
    x = torch.rand(2, 3, 96, 128, device=DEVICE)
    with torch.no_grad():
        model.backbone.eval()
        expected, got = eager(x), model.backbone(x)
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.allclose(expected[key], got[key], rtol=1e-3, atol=1e-4), key

    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    images, targets = _batch()
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        _, losses = model(images, targets)
    sum(losses.values()).backward()
    assert all(torch.isfinite(v) for v in losses.values())
    grads = [p.grad for p in model.backbone.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    optimizer.step()
