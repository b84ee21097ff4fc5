"""benchmarks/efficiency.py: the report's arithmetic on hand-made numbers, and its --smoke run end to end."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.efficiency import Row, format_rows, interleaved, rate, ratio_rows

ROOT = Path(__file__).resolve().parents[1]


def test_interleaved_calls_in_turn_and_times_each_call() -> None:
    calls: list[str] = []
    ticks = iter([0.0, 1.0, 1.0, 4.0, 10.0, 12.0, 12.0, 12.5])  # start, end of each timed call
    runs = interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, 2, warmup=1,
                       clock=lambda: next(ticks))
    assert calls == ["a", "b", "a", "b", "a", "b"]  # one untimed round, then A, B, A, B
    assert runs == {"a": [1.0, 2.0], "b": [3.0, 0.5]}


def test_ratio_rows_are_medians_over_the_reference_median() -> None:
    runs = {"torchvision": [3.0, 1.0, 2.0, 10.0, 4.0], "ours": [1.0, 1.5, 0.5, 9.0, 2.0]}
    rows = ratio_rows("step", runs, "torchvision", goals={"ours": ("<=", 0.8)}, notes={"ours": "n"})
    assert [(r.name, r.value, r.reference) for r in rows] == [("torchvision", 3.0, 3.0), ("ours", 1.5, 3.0)]
    assert rows[1].ratio == 0.5 and rows[1].verdict == "<= 0.8x: met" and rows[1].note == "n"
    assert rows[0].ratio == 1.0 and rows[0].verdict == ""
    assert Row("s", "fast", 4.0, "images/s", 2.0, (">=", 3.0)).verdict == ">= 3x: missed"
    assert Row("s", "no reference", 1.0, "MB").ratio is None
    assert rate(200, 50.0) == 4.0


def test_format_rows() -> None:
    table = format_rows([Row("probe", "float32", 150.0, "GFLOP/s", 100.0, (">=", 0.6), "x"),
                         Row("step", "ours", 0.25, "s", 0.5)])
    assert table.splitlines()[2] == "| probe | float32 | 150 GFLOP/s | 1.50x | >= 0.6x: met | x |"
    assert table.splitlines()[3] == "| step | ours | 0.250 s | 0.50x |  |  |"


@pytest.mark.slow
def test_smoke_run(tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    pytest.importorskip("skimage")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "efficiency.py"), "--smoke", "--data",
                           str(tmp_path / "realset")], capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    for row in ("| probe 128x128 matmul | float32 |",
                "| probe 128x128 matmul | float32 as a 1x1 conv (oneDNN) |",
                "| train R18-FPN, 4 x 64/96 px | visiondet fp32 |",
                "peak memory, visiondet fp32", "achieved, visiondet ResNet trunk alone fp32",
                "| data loading |", "| inference R18-FPN 96 px | onnxruntime int8 |",
                "| predict 4 photographs at 96 px | plain torchvision loop |", "top operators"):
        assert row in out, row
    assert out.count("load average") >= 3
