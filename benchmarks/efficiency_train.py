"""The efficiency report's probes, training-step and data-loading rows (see benchmarks/efficiency.py)."""

from __future__ import annotations

import ctypes
import json
import math
from pathlib import Path
from statistics import median
from typing import Any

import torch
from torch import Tensor
from torch.utils.flop_counter import FlopCounterMode
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
from torchvision.ops.misc import FrozenBatchNorm2d

from apps.config import load_config
from apps.tasks import get_task
from benchmarks.efficiency import Row, interleaved, load, rate, ratio_rows
from detection.models import DetectorConfig, RoIConfig, build_detector
from detection.torchvision_weights import convert_torchvision_state_dict
from vision.data.images import read_image

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "configs" / "detection" / "faster_rcnn_r18_fpn_cpu.yaml"


def bf16_native() -> bool:
    """Whether oneDNN computes bfloat16 natively here (AVX512-BF16 or AMX): only then is autocast faster."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


# ---- probes ----------------------------------------------------------------------------------------------


CONV_PROBE = "float32 as a 1x1 conv (oneDNN)"
PROBE_NOTES = {"float32": "vs the faster float32 probe", "bfloat16": "vs the bfloat16 probe"}


def probe_rows(s: Any) -> tuple[dict[str, float], list[Row]]:
    """GFLOP/s of an n x n x n matrix product in float32, bfloat16 and int8 (quantised linear, fbgemm/x86),
    and of the same product as a 1x1 convolution in float32 (n channels in and out over n positions).

    Two float32 probes because two libraries compute float32 here: ``a @ b`` goes to MKL, the convolutions
    of a step to oneDNN, and one processor's best kernels in each need not reach the same rate. The float32
    limit a step is measured against is the faster of the two."""
    n = s.probe_size
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(n, n, generator=gen), torch.randn(n, n, generator=gen)
    a16, b16 = a.bfloat16(), b.bfloat16()
    engines = torch.backends.quantized.supported_engines
    torch.backends.quantized.engine = "x86" if "x86" in engines else "fbgemm"
    linear = torch.ao.nn.quantized.Linear(n, n, bias_=False)
    linear.set_weight_bias(torch.quantize_per_tensor(b, 0.05, 0, torch.qint8), None)
    a8 = torch.quantize_per_tensor(a, 0.05, 128, torch.quint8)
    maps = torch.randn(1, n, n // 32, 32, generator=gen).contiguous(memory_format=torch.channels_last)
    kernel = torch.randn(n, n, 1, 1, generator=gen).contiguous(memory_format=torch.channels_last)
    fns = {"float32": lambda: a @ b, CONV_PROBE: lambda: torch.nn.functional.conv2d(maps, kernel),
           "int8": lambda: linear(a8)}
    if bf16_native():
        fns["bfloat16"] = lambda: a16 @ b16
    runs = interleaved(fns, s.repeats * 3, warmup=2)
    gflop = 2 * n**3 / 1e9
    rows = ratio_rows(f"probe {n}x{n} matmul", {k: [rate(gflop, t) for t in v] for k, v in runs.items()},
                      "float32", "GFLOP/s")
    probes = {row.name: row.value for row in rows}
    print(f"probes: {', '.join(f'{k} {v:.0f} GFLOP/s' for k, v in probes.items())}; {load()}", flush=True)
    probes["float32"] = max(probes["float32"], probes.pop(CONV_PROBE))
    return probes, rows


# ---- the training step -------------------------------------------------------------------------------------


def realset_batch(data: Path, count: int = 4) -> tuple[list[Tensor], list[dict[str, Tensor]]]:
    """The first ``count`` annotated training images of the realset as [3, H, W] in [0, 1] with their boxes;
    labels 1..7 by category order (COCO ids 1..7 for torchvision: the same contiguous labels for both)."""
    coco = json.loads((data / "train" / "annotations.json").read_text())
    order = {c["id"]: i + 1 for i, c in enumerate(coco["categories"])}
    by_image: dict[int, list[dict]] = {}
    for a in coco["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a)
    images, targets = [], []
    for entry in coco["images"]:
        if entry["id"] not in by_image:
            continue
        array = read_image(data / "train" / "images" / entry["file_name"])
        images.append(torch.from_numpy(array).permute(2, 0, 1).float().div(255).contiguous())
        anns = by_image[entry["id"]]
        boxes = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)])
        targets.append({"boxes": boxes, "labels": torch.tensor([order[a["category_id"]] for a in anns])})
        if len(images) == count:
            break
    return images, targets


def detector_pair(depth: int, min_size: int, max_size: int,
                  rois: int = 512) -> tuple[FasterRCNN, torch.nn.Module]:
    """torchvision's Faster R-CNN R{depth}-FPN as it builds its COCO model (frozen BN, 3 stages train) and
    ours at the same widths with the same random weights; ``rois`` regions sampled per training image
    (torchvision's 512; the smoke run takes fewer)."""
    torch.manual_seed(0)
    backbone = resnet_fpn_backbone(backbone_name=f"resnet{depth}", weights=None, norm_layer=FrozenBatchNorm2d,
                                   trainable_layers=3)
    tv = FasterRCNN(backbone, num_classes=91, min_size=min_size, max_size=max_size,
                    box_batch_size_per_image=rois)
    cfg = DetectorConfig(arch=f"faster_rcnn_r{depth}_fpn", num_classes=80, void_classes=10, min_size=min_size,
                         max_size=max_size, roi=RoIConfig(batch_size_per_image=rois))
    ours = build_detector(cfg, load_pretrained=False)
    ours.load_state_dict(convert_torchvision_state_dict(tv.state_dict(), cfg.arch))
    return tv.train(), ours.train()


def train_step(model: torch.nn.Module, images: list[Tensor], targets: list[dict], *, bf16: bool):
    """forward (bfloat16 autocast if asked) + backward + SGD step, as a function of nothing."""
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-5, momentum=0.9,
                                weight_decay=1e-4)
    ours = not isinstance(model, FasterRCNN)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = model(images, targets)
        losses = out[1] if ours else out
        sum(losses.values()).backward()
        optimizer.step()

    return step


_LIBC = ctypes.CDLL(None)


def _status_mb(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {key} in /proc/self/status")


def peak_memory_mb(fn) -> float:
    """How far the resident set rises above its level before ``fn()`` (MB): freed heap returned to the system
    first (malloc_trim), the peak counter reset (/proc/self/clear_refs), the peak read after."""
    _LIBC.malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")
    before = _status_mb("VmRSS")
    fn()
    return _status_mb("VmHWM") - before


def median_peaks(first, second, repeats: int) -> tuple[float, float]:
    """Median ``peak_memory_mb`` of two functions over ``repeats`` alternating calls: one reading moves by
    tens of MB with where the allocator happens to place the step's large buffers."""
    peaks: tuple[list[float], list[float]] = ([], [])
    for _ in range(repeats):
        for fn, out in zip((first, second), peaks, strict=True):
            out.append(peak_memory_mb(fn))
    return median(peaks[0]), median(peaks[1])


def flops_of(fn) -> tuple[float, dict[str, float]]:
    """(total GFLOP of ``fn()``, GFLOP per module path) counted by torch.utils.flop_counter."""
    with FlopCounterMode(display=False) as counter:
        fn()
    per_module = {name: sum(ops.values()) / 1e9 for name, ops in counter.get_flop_counts().items()}
    return counter.get_total_flops() / 1e9, per_module


def training_rows(s: Any, probes: dict[str, float]) -> tuple[list[Row], float | None]:
    """Per depth: step time and peak memory, visiondet vs torchvision (float32, bfloat16), achieved GFLOP/s of
    the step and of the ResNet trunk against the probes; then visiondet's top operators (the last depth).
    Returns the rows and visiondet's float32 step seconds at the first depth (for the data-loading row)."""
    images, targets = realset_batch(s.data)
    min_size, max_size = s.train_sizes
    precisions = [False, True] if bf16_native() else [False]
    rows: list[Row] = []
    first_step = None
    for depth in s.depths:
        section = f"train R{depth}-FPN, {len(images)} x {min_size}/{max_size} px"
        tv, ours = detector_pair(depth, min_size, max_size, s.rois)
        steps = {}
        for bf16 in precisions:
            tag = "bf16 autocast" if bf16 else "fp32"
            steps[f"torchvision {tag}"] = train_step(tv, images, targets, bf16=bf16)
            steps[f"visiondet {tag}"] = train_step(ours, images, targets, bf16=bf16)
        runs = interleaved(steps, s.repeats)
        tv_bf16 = runs.get("torchvision bf16 autocast")
        notes = {}
        if tv_bf16:
            ratio = median(runs["visiondet bf16 autocast"]) / median(tv_bf16)
            notes["visiondet bf16 autocast"] = f"{ratio:.2f}x torchvision's bf16 step"
        step_rows = ratio_rows(section, runs, "torchvision fp32", goals={
            "visiondet fp32": ("<=", 0.8), "visiondet bf16 autocast": ("<=", 0.5)}, notes=notes)
        rows += step_rows
        seconds = {row.name: row.value for row in step_rows}
        first_step = first_step or seconds["visiondet fp32"]
        for bf16 in precisions:
            tag = "bf16 autocast" if bf16 else "fp32"
            tv_mb, ours_mb = median_peaks(steps[f"torchvision {tag}"], steps[f"visiondet {tag}"], s.repeats)
            rows.append(Row(section, f"peak memory, torchvision {tag}", tv_mb, "MB", tv_mb))
            rows.append(Row(section, f"peak memory, visiondet {tag}", ours_mb, "MB", tv_mb, ("<=", 1.0)))
        rows += achieved_rows(section, tv, ours, images, targets, seconds, probes, precisions, s.repeats)
        print(f"{section}: done; {load()}", flush=True)
    print_profile(steps["visiondet fp32"])
    return rows, first_step


def achieved_rows(section: str, tv, ours, images, targets, seconds: dict[str, float],
                  probes: dict[str, float], precisions: list[bool], repeats: int) -> list[Row]:
    """GFLOP/s of each step against the probe of its precision, and of the ResNet trunk alone (forward +
    backward on the step's own padded batch, timed apart)."""
    rows = []
    for name, model in (("torchvision", tv), ("visiondet", ours)):
        total, per_module = flops_of(lambda m=model: _forward_backward(m, images, targets))
        trunk = sum(v for k, v in per_module.items() if k.endswith("backbone.body"))
        for bf16 in precisions:
            tag, probe = ("bf16 autocast", "bfloat16") if bf16 else ("fp32", "float32")
            achieved = rate(total, seconds[f"{name} {tag}"])
            label = f"achieved, {name} {tag} step ({total:.0f} GFLOP, trunk {trunk / total:.0%})"
            rows.append(Row(section, label, achieved, "GFLOP/s", probes.get(probe),
                            note=PROBE_NOTES[probe]))
    batch = ours.transform(images, targets)[0]
    x = batch.tensors if hasattr(batch, "tensors") else batch
    body = ours.backbone.body
    trunk_flops, _ = flops_of(lambda: _trunk_step(body, x, False))
    fns = {("bf16 autocast" if b else "fp32"): (lambda b=b: _trunk_step(body, x, b)) for b in precisions}
    runs = interleaved(fns, repeats)
    for tag, values in runs.items():
        probe = "bfloat16" if tag.startswith("bf16") else "float32"
        t = median(values)
        rows.append(Row(section, f"achieved, visiondet ResNet trunk alone {tag} ({trunk_flops:.0f} GFLOP, "
                        f"{t:.3f} s)", rate(trunk_flops, t), "GFLOP/s", probes.get(probe), (">=", 0.6),
                        note=PROBE_NOTES[probe]))
    return rows


def _forward_backward(model, images, targets) -> None:
    out = model(images, targets)
    losses = out if isinstance(model, FasterRCNN) else out[1]
    sum(losses.values()).backward()
    model.zero_grad(set_to_none=True)


def _trunk_step(body, x: Tensor, bf16: bool) -> None:
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        maps = body(x)
    sum(m.float().mean() for m in maps.values()).backward()
    body.zero_grad(set_to_none=True)


def print_profile(step, top: int = 10) -> None:
    """The operators that take the most time of one step (self CPU time), as torch.profiler counts them."""
    step()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) or 1
    print(f"\ntop operators of visiondet's float32 step (self CPU time, {total / 1e6:.2f} s in all):")
    print("| operator | calls | self CPU s | share |\n|---|---:|---:|---:|")
    for e in events[:top]:
        seconds = e.self_cpu_time_total / 1e6
        print(f"| {e.key} | {e.count} | {seconds:.3f} | {e.self_cpu_time_total / total:.1%} |")
    print(flush=True)


# ---- data loading ------------------------------------------------------------------------------------------


def data_rows(s: Any, step_seconds: float | None) -> list[Row]:
    """Images/s of the CPU recipe's training pipeline alone (decode + augmentation, one process, in chunks)
    against the images/s the visiondet step consumes (batch 4 / its float32 step time)."""
    data = s.data
    exp = load_config(RECIPE, [f"data.train.images={data}/train/images",
                               f"data.train.annotations={data}/train/annotations.json",
                               f"data.val.images={data}/val/images",
                               f"data.val.annotations={data}/val/annotations.json"])
    dataset = get_task("detection").build_datasets(exp).train
    chunk = max(2, min(len(dataset) // (s.repeats + 1), 40))
    index = iter(range(len(dataset)))

    def read_chunk() -> None:
        for _ in range(chunk):
            dataset[next(index)]

    runs = interleaved({"pipeline": read_chunk}, s.repeats)
    per_second = [rate(chunk, t) for t in runs["pipeline"]]
    value = median(per_second)
    if step_seconds is None:
        return [Row("data loading", "training pipeline, one process", value, "images/s")]
    consumed = rate(4, step_seconds)
    workers = math.ceil(consumed / value)
    return [Row("data loading", "training pipeline, one process (decode + augmentation)", value, "images/s",
                consumed, note=f"the R{s.depths[0]} visiondet fp32 step consumes {consumed:.1f} images/s: "
                f"{workers} worker(s) keep it fed")]
