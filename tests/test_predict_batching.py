"""`visiondet predict` with a real (tiny, random-weight) detector: the detections of an image do not depend on
its batch (batch size, worker count, a killed-then-resumed run), and a `kill -9` of the command takes its
DataLoader worker processes with it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from support.processes import children, survivors_after

from apps.cli import main

ROOT = Path(__file__).resolve().parents[1]
# (h, w) cycled over the files: with min_size 64 / max_size 96 they resize (and pad) to different sizes, so
# a batch of them is padded beyond each image's own size
SIZES = [(320, 480), (512, 384), (400, 400), (240, 720), (576, 320), (360, 640), (480, 488)]


def write_images(src: Path, count: int) -> list[str]:
    names = []
    for i in range(count):
        h, w = SIZES[i % len(SIZES)]
        image = np.random.default_rng(i).integers(0, 256, (h, w, 3), dtype=np.uint8)
        image[h // 4: h // 2, w // 4: w // 2] = (220, 40, 40)  # something box-like to find
        name = f"{i % 3}/{i:03d}.png"
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(src / name)
        names.append(name)
    return names


def detections(out: Path) -> dict[str, list]:
    records = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    by_file = {r["file"]: r["detections"] for r in records}
    assert len(by_file) == len(records)  # every image once
    return by_file


def predict(weights: Path, src: Path, out: Path, *extra: object) -> int:
    return main(["predict", "--weights", str(weights), "--source", str(src), "--output", str(out),
                 "--device", "cpu", "--score-threshold", "0.0", "--no-progress", *map(str, extra)])


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_detector_checkpoint) -> tuple[Path, Path, dict[str, list]]:
    tmp = tmp_path_factory.mktemp("batching")
    weights = tiny_detector_checkpoint(tmp / "det.pt")
    src = tmp / "src"
    write_images(src, 40)
    assert predict(weights, src, tmp / "one", "--batch-size", 1, "--workers", 0) == 0
    reference = detections(tmp / "one")
    assert sum(len(d) for d in reference.values()) > 100  # enough boxes that any difference would show
    return weights, src, reference


def test_batch_size_and_workers_do_not_change_detections(setup, tmp_path):
    weights, src, reference = setup
    assert predict(weights, src, tmp_path / "eight", "--batch-size", 8, "--workers", 2) == 0
    assert detections(tmp_path / "eight") == reference  # every box and score, to the digit written


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_kill_9_takes_the_workers_along_and_the_resumed_run_matches(setup, tmp_path):
    weights, src, reference = setup
    out = tmp_path / "killed"
    # --save-images: the decoded pictures travel back through the workers' result pipe, and a worker whose
    # pipe is full when the parent dies hangs at its exit, holding its memory (what the issue saw)
    args = ["--weights", weights, "--source", src, "--output", out, "--batch-size", 4, "--workers", 2,
            "--device", "cpu", "--score-threshold", "0.0", "--no-progress", "--save-images"]
    # the reference ran in this process: the child gets as many threads, or its sums (and the fifth digit of
    # a score) could differ for that reason alone
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "OMP_NUM_THREADS": str(torch.get_num_threads())}
    log = tmp_path / "stderr.txt"  # a file, not a pipe: orphaned workers would hold a pipe open
    with open(log, "wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "apps.cli", "predict", *map(str, args)], cwd=ROOT,
                                env=env, stdout=subprocess.DEVNULL, stderr=err)
    journal, workers = out / "predictions.jsonl", []
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and proc.poll() is None:
        if journal.is_file() and journal.read_bytes().count(b"\n") >= 2:
            workers = children(proc.pid)  # the DataLoader workers, busy decoding the next batches
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.005)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, f"the run was not interrupted: {log.read_text()}"
    assert len(workers) == 2, workers
    assert survivors_after(workers, 5.0) == [], "DataLoader workers outlived predict's kill -9"

    done = len(detections(out))
    assert 2 <= done < len(reference)
    assert predict(weights, src, out, "--resume", "--batch-size", 3, "--workers", 1) == 0
    assert detections(out) == reference  # resumed in other batches: the same detections, every image once
