"""GPU figures in one run: Faster R-CNN R50-FPN against torchvision's, `visiondet predict`, the cuda tests.

    python benchmarks/gpu.py                    # one GPU, about 8 minutes (each section has a time limit)
    python benchmarks/gpu.py --smoke            # tiny sizes, a few iterations, any device: proves the script
    python benchmarks/gpu.py --section-seconds 60 --tests-seconds 120 --json gpu.json

(a) training step time, ours against torchvision's ``fasterrcnn_resnet50_fpn`` with the same weights
    (random, imported by detection/torchvision_weights.py, both built like the COCO model: frozen batch norm,
    three trainable stages), batch 8 at 800 px, in fp32, AMP fp16 (with a gradient scaler) and AMP bf16;
(b) inference at 800 px, batch 1 and 8, fp32 and fp16 (autocast), channels-last: our model prepared for
    inference (batch norm folded, channels-last) against torchvision's model in channels-last;
(c) `visiondet predict` over 500 generated JPEGs against a plain per-image loop (read one image, predict
    it alone), images per second, same converted checkpoint;
(d) the peak GPU memory of each: the most allocated during the timed calls above what was allocated before
    them (weights, optimizer state and the other model are not counted);
then ``pytest -m cuda``. Models alternate in every measurement so that clocks and other load hit both
alike; each figure is the median after two warm-up calls. One table prints the ratios against the goals:
training <= 1.0x torchvision's time at the same precision, inference <= 0.8x, predict >= 2x the plain loop.

A section that reaches its time limit stops where it is: the rest of its rows say so, and a measurement
cut short reports the runs it finished.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

# Run as a script, this file's folder comes first on sys.path: the repository root goes there instead, so
# that `benchmarks.*` imports as it does from the root.
if __package__ in (None, ""):
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import torch
import torchvision
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
from torchvision.ops.misc import FrozenBatchNorm2d

from apps.cli import main as visiondet
from apps.predict.predictor import Predictor
from apps.predict.sources import find_images
from benchmarks.predict import synthetic_images
from detection.models import DetectorConfig, build_detector
from detection.torchvision_weights import (
    COCO_CATEGORIES,
    COCO_CLASSES,
    convert_torchvision_state_dict,
    torchvision_config,
)
from vision.checkpoint import save_checkpoint
from vision.data.images import read_image
from vision.layers import prepare_for_inference

ROOT = Path(__file__).resolve().parents[1]
PRECISIONS = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class Sizes:
    train_batch: int = 8
    train_px: int = 800
    infer_px: int = 800
    infer_batches: tuple[int, ...] = (1, 8)
    predict_images: int = 500
    predict_wh: tuple[int, int] = (640, 480)
    repeats: int = 10
    warmups: int = 2
    proposals: int | None = None  # None: the COCO model's (2000 / 1000 per image, 512 sampled regions)


# every code path at sizes a loaded 2-core CPU gets through in a few minutes (float16 is emulated there)
SMOKE = Sizes(train_batch=2, train_px=64, infer_px=64, infer_batches=(1, 2), predict_images=12,
              predict_wh=(96, 72), repeats=1, warmups=1, proposals=64)


@dataclass
class Row:
    section: str
    what: str
    baseline: str = "-"  # torchvision, or the plain loop
    ours: str = "-"
    ratio: float | None = None
    goal: str = ""
    met: bool | None = None
    memory: str = "-"  # peak GiB, baseline / ours
    note: str = ""
    numbers: dict[str, float] = field(default_factory=dict)


# ---- timing ------------------------------------------------------------------------------------------------


class Clock:
    """Times calls on one device (CUDA work is waited for) and keeps a section's deadline."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.deadline = float("inf")

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def out_of_time(self) -> bool:
        return time.perf_counter() > self.deadline

    def once(self, fn: Callable[[], object]) -> tuple[float, float | None]:
        """(seconds, peak GiB above the memory allocated before the call, or None off CUDA)."""
        self.sync()
        before = 0
        if self.device.type == "cuda":
            before = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        start = time.perf_counter()
        fn()
        self.sync()
        seconds = time.perf_counter() - start
        if self.device.type != "cuda":
            return seconds, None
        return seconds, (torch.cuda.max_memory_allocated(self.device) - before) / 2**30

    def compare(self, fns: dict[str, Callable[[], object]], repeats: int, warmups: int = 2
                ) -> tuple[dict[str, float], dict[str, float | None], int]:
        """Median seconds and peak GiB of each function, run in turns; also the timed runs completed.

        At the deadline the warm-ups stop after the first and the timed runs after the current round; when
        no timed round fits, the last warm-up's time stands in (runs completed: 0)."""
        peaks: dict[str, float | None] = {}
        last: dict[str, float] = {}
        for name, fn in fns.items():  # warm-ups (kernel choice, allocator); the last one's peak
            for i in range(warmups):
                if i and self.out_of_time():
                    break
                last[name], peaks[name] = self.once(fn)
        runs: dict[str, list[float]] = {name: [] for name in fns}
        for _ in range(repeats):
            if self.out_of_time():
                break
            for name, fn in fns.items():
                runs[name].append(self.once(fn)[0])
        done = len(runs[next(iter(runs))])
        return {n: statistics.median(r) if r else last[n] for n, r in runs.items()}, peaks, done


def _runs_note(runs: int) -> str:
    return f"median of {runs}" if runs else "one warm-up run only: time limit"


def _gib(peaks: dict[str, float | None], a: str, b: str) -> str:
    if peaks.get(a) is None or peaks.get(b) is None:
        return "-"
    return f"{peaks[a]:.2f} / {peaks[b]:.2f}"


# ---- the two models ----------------------------------------------------------------------------------------


def torchvision_coco_model() -> FasterRCNN:
    """fasterrcnn_resnet50_fpn as torchvision builds it for its COCO weights, random weights (no download)."""
    body = resnet_fpn_backbone(backbone_name="resnet50", weights=None, norm_layer=FrozenBatchNorm2d,
                               trainable_layers=3)
    return FasterRCNN(body, num_classes=91)


def our_config(px: int, proposals: int | None) -> DetectorConfig:
    cfg = torchvision_config(min_size=px, max_size=round(px * 1333 / 800))
    if proposals is not None:
        cfg.rpn = replace(cfg.rpn, pre_nms_top_n_train=proposals, pre_nms_top_n_test=proposals,
                          post_nms_top_n_train=proposals, post_nms_top_n_test=proposals)
        cfg.roi = replace(cfg.roi, batch_size_per_image=proposals)
    return cfg


def same_weights(px: int, proposals: int | None = None) -> tuple[FasterRCNN, torch.nn.Module]:
    """torchvision's model and ours with its weights, both resizing to ``px`` (and, for the smoke run,
    keeping ``proposals`` regions per image in both)."""
    torch.manual_seed(0)
    theirs = torchvision_coco_model()
    ours = build_detector(our_config(px, proposals), load_pretrained=False)
    ours.load_state_dict(convert_torchvision_state_dict(theirs.state_dict()))
    theirs.transform.min_size, theirs.transform.max_size = (px,), round(px * 1333 / 800)
    if proposals is not None:
        theirs.rpn._pre_nms_top_n = theirs.rpn._post_nms_top_n = {"training": proposals, "testing": proposals}
        theirs.roi_heads.fg_bg_sampler.batch_size_per_image = proposals
    return theirs, ours


def images_and_targets(n: int, px: int, device: torch.device):
    """n images of px x 4/3 px with two boxes each; targets with COCO ids (torchvision) and our labels."""
    g = torch.Generator().manual_seed(1)
    h, w = px, px * 4 // 3
    images = [torch.rand(3, h, w, generator=g).to(device) for _ in range(n)]
    boxes = torch.tensor([[0.1, 0.1, 0.5, 0.6], [0.4, 0.3, 0.9, 0.95]]) * torch.tensor([w, h, w, h])
    coco_ids = [1, 18]  # person, dog: our contiguous labels 1 and 17
    ours_labels = [next(i + 1 for i, (cid, _) in enumerate(COCO_CATEGORIES) if cid == c) for c in coco_ids]
    theirs = [{"boxes": boxes.to(device), "labels": torch.tensor(coco_ids, device=device)} for _ in range(n)]
    ours = [{"boxes": boxes.to(device), "labels": torch.tensor(ours_labels, device=device)} for _ in range(n)]
    return images, theirs, ours


# ---- (a) training ------------------------------------------------------------------------------------------


def train_step(model: torch.nn.Module, losses: Callable[[], dict[str, torch.Tensor]],
               dtype: torch.dtype | None, device: torch.device) -> Callable[[], None]:
    """One SGD step of ``model`` on ``losses()`` under autocast in ``dtype`` (None: fp32); float16 with a
    gradient scaler, as the trainer does. The tiny learning rate keeps the random weights sane."""
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-5, momentum=0.9)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            total = sum(losses().values())
        scaler.scale(total).backward()
        scaler.step(optimizer)
        scaler.update()

    return step


def train_section(clock: Clock, sizes: Sizes, rows: list[Row]) -> None:
    device = clock.device
    theirs, ours = same_weights(sizes.train_px, sizes.proposals)
    theirs.to(device).train()
    ours.to(device).train()
    images, t_targets, o_targets = images_and_targets(sizes.train_batch, sizes.train_px, device)
    for name, dtype in PRECISIONS.items():
        what = f"train step, batch {sizes.train_batch} at {sizes.train_px} px, {name}"
        if clock.out_of_time():
            rows.append(Row("a", what, note="not run: section time limit"))
            continue
        steps = {"torchvision": train_step(theirs, lambda: theirs(images, t_targets), dtype, device),
                 "ours": train_step(ours, lambda: ours(images, o_targets)[1], dtype, device)}
        medians, peaks, runs = clock.compare(steps, sizes.repeats, sizes.warmups)
        t, o = medians["torchvision"], medians["ours"]
        rows.append(Row("a", what, f"{t:.3f} s", f"{o:.3f} s", o / t, "<= 1.0x", o / t <= 1.0,
                        _gib(peaks, "torchvision", "ours"), _runs_note(runs),
                        {"torchvision_s": t, "ours_s": o}))


# ---- (b) inference -----------------------------------------------------------------------------------------


def inference_section(clock: Clock, sizes: Sizes, rows: list[Row]) -> None:
    device = clock.device
    theirs, ours = same_weights(sizes.infer_px, sizes.proposals)
    theirs = theirs.to(device).eval().to(memory_format=torch.channels_last)
    ours = prepare_for_inference(ours.to(device).eval())  # folded batch norm, channels-last
    for batch in sizes.infer_batches:
        images, _, _ = images_and_targets(batch, sizes.infer_px, device)
        for name in ("fp32", "fp16"):
            dtype = PRECISIONS[name]
            what = f"inference, batch {batch} at {sizes.infer_px} px, {name}, channels-last"
            if clock.out_of_time():
                rows.append(Row("b", what, note="not run: section time limit"))
                continue

            def run(model, unpack, dtype=dtype, images=images):
                with torch.inference_mode(), torch.autocast(device.type, dtype=dtype or torch.float32,
                                                            enabled=dtype is not None):
                    return unpack(model(images))

            calls = {"torchvision": lambda: run(theirs, lambda out: out),
                     "ours": lambda: run(ours, lambda out: out[0])}
            medians, peaks, runs = clock.compare(calls, sizes.repeats, sizes.warmups)
            t, o = medians["torchvision"], medians["ours"]
            rows.append(Row("b", what, f"{t * 1000:.1f} ms", f"{o * 1000:.1f} ms", o / t, "<= 0.8x",
                            o / t <= 0.8, _gib(peaks, "torchvision", "ours"), _runs_note(runs),
                            {"torchvision_s": t, "ours_s": o}))


# ---- (c) predict over a folder -----------------------------------------------------------------------------


def predict_section(clock: Clock, sizes: Sizes, rows: list[Row], work: Path, workers: int) -> None:
    device = clock.device
    what = f"predict, {sizes.predict_images} JPEGs {sizes.predict_wh[0]}x{sizes.predict_wh[1]}, images/s"
    folder = work / "images"
    synthetic_images(folder, sizes.predict_images, *sizes.predict_wh)
    _, ours = same_weights(sizes.infer_px, sizes.proposals)
    cfg = our_config(sizes.infer_px, sizes.proposals)
    weights = save_checkpoint({"format": "visiondet", "version": 1, "task": "detection", "model": asdict(cfg),
                               "classes": COCO_CLASSES, "preprocess": {}, "state_dict": ours.state_dict(),
                               "config": {}, "metrics": {}}, work / "r50_fpn.pt")
    files = find_images([folder]).files

    def plain() -> int:
        """Load, then read and predict each file alone; stops at the deadline. Returns images done."""
        predictor = Predictor(weights, str(device))
        for done, file in enumerate(files):
            if clock.out_of_time():
                return done
            predictor.predict([read_image(file.path)])
        return len(files)

    def ours_cli() -> None:
        code = visiondet(["predict", "--weights", str(weights), "--source", str(folder), "--output",
                          str(work / "out"), "--batch-size", "8", "--workers", str(workers), "--device",
                          str(device), "--overwrite", "--no-progress"])
        if code != 0:
            raise RuntimeError(f"visiondet predict failed with exit code {code}")

    # the command first: the plain loop is the one that may be cut short by the limit
    cli_s, cli_peak = clock.once(ours_cli)
    done = 0

    def plain_run() -> None:
        nonlocal done
        done = plain()

    plain_s, plain_peak = clock.once(plain_run)
    plain_rate, cli_rate = done / plain_s, len(files) / cli_s
    note = "" if done == len(files) else f"plain loop cut at {done} images by the time limit"
    peaks = {"plain": plain_peak, "ours": cli_peak}
    rows.append(Row("c", what, f"{plain_rate:.1f}", f"{cli_rate:.1f}", cli_rate / plain_rate, ">= 2x",
                    cli_rate / plain_rate >= 2.0, _gib(peaks, "plain", "ours"),
                    f"{workers} workers, batch 8; {note}".rstrip("; "),
                    {"plain_images_per_s": plain_rate, "predict_images_per_s": cli_rate}))


# ---- the cuda tests ----------------------------------------------------------------------------------------


def tests_section(seconds: float, rows: list[Row]) -> None:
    cmd = [sys.executable, "-m", "pytest", "-m", "cuda", "-rs", "-p", "no:cacheprovider"]  # -q: pyproject
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=seconds,
                              env={**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"})
    except subprocess.TimeoutExpired:
        rows.append(Row("tests", "pytest -m cuda", note=f"stopped at the {seconds:.0f} s limit"))
        return
    # pytest's last line of counts ("9 passed, 1 skipped, 390 deselected in 61.2s"); -rs lines come before
    counts = [line.strip("= ") for line in proc.stdout.splitlines()
              if re.search(r"\d+ (passed|failed|skipped|deselected|errors?)\b", line) and " in " in line]
    summary = counts[-1] if counts else "no summary line"
    if proc.returncode not in (0, 5):  # 5: nothing collected
        print(proc.stdout[-6000:], proc.stderr[-2000:], sep="\n", flush=True)
    rows.append(Row("tests", "pytest -m cuda", ours=summary, met=proc.returncode == 0,
                    note=f"{time.perf_counter() - start:.0f} s, exit code {proc.returncode}"))


# ---- report ------------------------------------------------------------------------------------------------


def print_table(rows: list[Row]) -> None:
    head = ("", "measurement", "torchvision / plain", "ours", "ratio", "goal", "met", "peak GiB t / o",
            "note")
    cells = [head] + [(r.section, r.what, r.baseline, r.ours,
                       f"{r.ratio:.2f}x" if r.ratio is not None else "-", r.goal,
                       {True: "yes", False: "NO", None: "-"}[r.met], r.memory, r.note) for r in rows]
    widths = [max(len(str(c[i])) for c in cells) for i in range(len(head))]
    for c in cells:
        print("  ".join(str(v).ljust(w) for v, w in zip(c, widths, strict=True)).rstrip(), flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes and few runs, on any device")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--section-seconds", type=float, default=90.0,
                        help="time limit of each of sections a, b and c (90)")
    parser.add_argument("--tests-seconds", type=float, default=200.0,
                        help="time limit of pytest -m cuda (200)")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per measurement (10; smoke 2)")
    parser.add_argument("--workers", type=int, default=None,
                        help="predict's decoding processes (CPU cores - 1, at most 8)")
    parser.add_argument("--sections", nargs="+", default=["a", "b", "c", "tests"],
                        choices=["a", "b", "c", "tests"])
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    sizes = SMOKE if args.smoke else Sizes()
    if args.repeats:
        sizes = Sizes(**{**sizes.__dict__, "repeats": args.repeats})
    workers = args.workers if args.workers is not None else max(1, min(8, (os.cpu_count() or 2) - 1))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"{name}; torch {torch.__version__}, torchvision {torchvision.__version__}"
          f"{', smoke sizes' if args.smoke else ''}; section limit {args.section_seconds:.0f} s", flush=True)
    if device.type == "cpu" and not args.smoke:
        print("warning: no GPU: these sizes take a long time on the CPU (use --smoke to check the script)",
              flush=True)

    clock = Clock(device)
    rows: list[Row] = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="visiondet-gpu-") as tmp:
        for section, run in (("a", lambda: train_section(clock, sizes, rows)),
                             ("b", lambda: inference_section(clock, sizes, rows)),
                             ("c", lambda: predict_section(clock, sizes, rows, Path(tmp), workers))):
            if section not in args.sections:
                continue
            clock.deadline = time.perf_counter() + args.section_seconds
            begin = time.perf_counter()
            try:
                run()
            except Exception as exc:  # one broken section must not cost the others' figures
                traceback.print_exc()
                rows.append(Row(section, "(the rest of the section)", note=f"FAILED: {type(exc).__name__}: "
                                f"{str(exc).splitlines()[0][:120] if str(exc) else ''}", met=False))
            print(f"section {section}: {time.perf_counter() - begin:.0f} s", flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    if "tests" in args.sections:
        tests_section(args.tests_seconds, rows)
    print(f"\n{name}, {time.perf_counter() - started:.0f} s in all", flush=True)
    print_table(rows)
    if args.json:
        args.json.write_text(json.dumps({"device": name, "smoke": args.smoke, "torch": torch.__version__,
                                         "rows": [r.__dict__ for r in rows]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
