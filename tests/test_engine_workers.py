"""The training loaders' DataLoader workers die with their process: a child process iterates
``apps.engine.loader.make_loader`` and ``eval_loader`` (what `visiondet train` uses) with two workers whose
items are large enough to fill the result pipe, and is killed with SIGKILL; its workers must be gone within a
few seconds. Without ``tie_to_parent`` they hang at exit on the full pipe, holding their memory."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support.processes import children, survivors_after

ROOT = Path(__file__).resolve().parents[1]

CHILD = """
import os, sys, time
import numpy as np
from torch.utils.data import Dataset
from apps.engine.loader import SeededItems, eval_loader, make_loader

class Big(Dataset):  # 3 MB arrays travel through the workers' result pipe (numpy, not shared tensors)
    def __len__(self):
        return 64
    def __getitem__(self, i):
        return np.full((1024, 1024, 3), i % 256, dtype=np.uint8)

if sys.argv[1] == "train":
    loader = make_loader(SeededItems(Big(), seed=0), [[i, i + 1] for i in range(0, 64, 2)], list, workers=2,
                         pin_memory=False, seed=0)
else:
    loader = eval_loader(Big(), list, batch_size=2, workers=2)
for batch in loader:
    print("batch", flush=True)
    time.sleep(30)  # the workers fill the pipe meanwhile
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("kind", ["train", "eval"])
def test_training_loader_workers_die_with_a_killed_parent(tmp_path, kind):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, str(script), kind], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    try:
        assert proc.stdout.readline().strip() == "batch"
        time.sleep(1.0)  # the workers fill their pipe
        workers = children(proc.pid)
        assert len(workers) == 2
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        proc.stdout.close()
    assert survivors_after(workers, 5.0) == [], "DataLoader workers outlived their killed parent"
