"""Training and inference cost against torchvision and against this machine's own limits: one report.

    python benchmarks/efficiency.py --repeats 5 --ap-weights runs/realset_r18/best.pt    # the full report
    python benchmarks/efficiency.py --smoke                   # tiny sizes, one repeat: checks the script

The full report takes about 20 minutes on a quiet 2-core machine (the lead's command above; ``--sections``
picks some, ``--predict-images`` and ``--predict-size`` shrink the slowest row). Every row is a ratio of two
medians measured in this run, the paths interleaved (A, B, A, B, ...) so that a busy machine slows them
alike; the load average is printed before and after each section. Rows, all with random weights that are
the same on both sides (torchvision's, converted by detection/torchvision_weights.py):

- probes: 2048x2048 matrix products in float32, bfloat16 and int8 (fbgemm/x86 quantised linear), and the
  float32 one again as a 1x1 convolution (oneDNN, where the step's convolutions run; MKL runs ``a @ b``):
  the machine's reachable GFLOP/s in each precision (benchmarks/efficiency_train.py);
- training step (forward + backward + SGD step), batch 4 of real photographs (benchmarks/realset.py) at
  320/480 px: Faster R-CNN R18-FPN and R50-FPN at torchvision's widths, visiondet vs
  ``torchvision.models.detection``, float32 and bfloat16 autocast (where the processor computes bfloat16
  natively): time, peak memory of the step (resident set, in-process), achieved GFLOP/s
  (``torch.utils.flop_counter``) of the step and of the ResNet trunk alone against the probe of its
  precision; the top operators of visiondet's R50 step;
- data loading: images/s of the training pipeline alone (decode + augmentation, one process) against what
  the step consumes (batch / step time): how many workers keep the model fed;
- inference at 800 px, R50-FPN, one real photograph: torchvision eager, visiondet eager prepared (BN folded,
  channels-last), bfloat16 autocast, ONNX Runtime float32 and ONNX Runtime int8 (statically quantised, every
  Conv/Gemm/MatMul, calibrated on training images: vision/quantize.py), each vs torchvision, with each
  path's detections against torchvision's; then, with ``--ap-weights`` (a detector trained on the realset,
  e.g. ``visiondet train configs/detection/faster_rcnn_r18_fpn_cpu.yaml`` on it), AP on the realset's
  validation split for float32 and the fastest path (benchmarks/efficiency_infer.py);
- ``visiondet predict`` over real photographs with the fastest backend and its default workers vs a plain
  torchvision per-image loop, in interleaved chunks: images/s and the detections compared.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: the repository root, not benchmarks/, on sys.path
    sys.path[0] = str(Path(__file__).resolve().parents[1])

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ("probes", "train", "data", "inference", "predict")


# ---- the report's arithmetic (tests/test_efficiency_report.py checks it on hand-made numbers) -------------


def interleaved(fns: dict[str, Callable[[], Any]], repeats: int, *, warmup: int = 1,
                clock: Callable[[], float] = time.perf_counter) -> dict[str, list[float]]:
    """Seconds of every call of each function: ``warmup`` untimed rounds, then ``repeats`` rounds that call
    the functions in turn (A, B, A, B, ...), so that load from other processes hits them alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    runs: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = clock()
            fn()
            runs[name].append(clock() - start)
    return runs


@dataclass
class Row:
    """One line of the report: a median, and its ratio to a reference measured in the same run."""

    section: str
    name: str
    value: float
    unit: str
    reference: float | None = None
    goal: tuple[str, float] | None = None  # ("<=", 0.8): the ratio should be at most 0.8
    note: str = ""

    @property
    def ratio(self) -> float | None:
        return None if self.reference is None else self.value / self.reference

    @property
    def verdict(self) -> str:
        if self.goal is None or self.ratio is None:
            return ""
        op, bound = self.goal
        met = self.ratio <= bound if op == "<=" else self.ratio >= bound
        return f"{op} {bound:g}x: {'met' if met else 'missed'}"


def ratio_rows(section: str, runs: dict[str, Sequence[float]], reference: str, unit: str = "s", *,
               goals: dict[str, tuple[str, float]] | None = None,
               notes: dict[str, str] | None = None) -> list[Row]:
    """A row per entry of ``runs``: its median, as a ratio to the median of ``runs[reference]``."""
    medians = {name: statistics.median(values) for name, values in runs.items()}
    goals, notes = goals or {}, notes or {}
    return [Row(section, name, value, unit, medians[reference], goals.get(name), notes.get(name, ""))
            for name, value in medians.items()]


def rate(count: float, seconds: float) -> float:
    """``count`` per second (images/s, or GFLOP/s with ``count`` in GFLOP)."""
    return count / seconds


def format_rows(rows: Sequence[Row]) -> str:
    """The rows as a markdown table."""
    lines = ["| section | row | median | vs reference | goal | note |", "|---|---|---:|---:|---|---|"]
    for row in rows:
        ratio = "" if row.ratio is None else f"{row.ratio:.2f}x"
        value = f"{row.value:.3f} {row.unit}" if row.value < 100 else f"{row.value:.0f} {row.unit}"
        lines.append(f"| {row.section} | {row.name} | {value} | {ratio} | {row.verdict} | {row.note or ''} |")
    return "\n".join(lines)


def load() -> str:
    one, five, _ = os.getloadavg()
    return f"load average {one:.2f} (1 min), {five:.2f} (5 min) on {os.cpu_count()} CPUs"


# ---- the run ------------------------------------------------------------------------------------------


@dataclass
class Settings:
    repeats: int
    train_sizes: tuple[int, int]  # (min_size, max_size) of the training step
    depths: tuple[int, ...]
    infer_size: int
    infer_depth: int
    probe_size: int
    predict_images: int
    predict_size: int
    predict_chunks: int
    calibration_images: int
    data: Path
    ap_weights: Path | None
    threads: int
    rois: int = 512  # regions sampled per training image (torchvision's 512)


def settings(args: argparse.Namespace) -> Settings:
    if args.smoke:
        return Settings(repeats=1, train_sizes=(64, 96), depths=(18,), infer_size=96, infer_depth=18,
                        probe_size=128, predict_images=4, predict_size=96, predict_chunks=2,
                        calibration_images=2, data=args.data, ap_weights=args.ap_weights,
                        threads=args.threads or 1, rois=16)
    return Settings(repeats=args.repeats, train_sizes=(320, 480), depths=tuple(args.depths), infer_size=800,
                    infer_depth=50, probe_size=2048, predict_images=args.predict_images,
                    predict_size=args.predict_size, predict_chunks=5,
                    calibration_images=args.calibration_images, data=args.data, ap_weights=args.ap_weights,
                    threads=args.threads or os.cpu_count() or 1)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, one repeat: checks the script runs")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--data", type=Path, default=ROOT / "runs" / "realset",
                        help="the real-imagery set (built there by benchmarks/realset.py when missing)")
    parser.add_argument("--ap-weights", type=Path, default=None,
                        help="a detector trained on the realset: AP of float32 and of the fastest path")
    parser.add_argument("--depths", type=int, nargs="+", choices=(18, 50), default=[18, 50],
                        help="the training rows' ResNet depths")
    parser.add_argument("--predict-images", type=int, default=200)
    parser.add_argument("--predict-size", type=int, default=800, help="the predict row's short side")
    parser.add_argument("--calibration-images", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None, help="torch and ONNX Runtime threads")
    args = parser.parse_args(argv)

    import torch

    from benchmarks import efficiency_infer, efficiency_train
    from benchmarks.realset import build_realset

    s = settings(args)
    torch.set_num_threads(s.threads)
    if args.smoke and args.data == parser.get_default("data"):
        import tempfile

        s.data = Path(tempfile.mkdtemp(prefix="visiondet-efficiency-"))
    if not (s.data / "train" / "annotations.json").is_file():
        if args.smoke:
            build_realset(s.data, seed=0, num_train=8, num_val=4)
        else:
            build_realset(s.data, seed=0)
    smoke = "smoke run: the figures mean nothing, " if args.smoke else ""
    print(f"torch {torch.__version__}, {s.threads} threads, {smoke}median of {s.repeats} interleaved "
          f"repeats; {load()}", flush=True)
    rows: list[Row] = []
    probes: dict[str, float] = {}
    step_seconds: float | None = None
    if "probes" in args.sections or "train" in args.sections:
        probes, probe_rows = efficiency_train.probe_rows(s)
        rows += probe_rows
    if "train" in args.sections:
        train_rows, step_seconds = efficiency_train.training_rows(s, probes)
        rows += train_rows
    if "data" in args.sections:
        rows += efficiency_train.data_rows(s, step_seconds)
    fastest = None
    if "inference" in args.sections:
        infer_rows, fastest = efficiency_infer.inference_rows(s)
        rows += infer_rows
    if "predict" in args.sections:
        rows += efficiency_infer.predict_rows(s, fastest or "onnxruntime int8")
    print(f"\n{format_rows(rows)}\n\n{load()} at the end", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
