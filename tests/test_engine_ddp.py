"""Two CPU processes under torchrun (gloo): both ranks train on their half of the data, rank 0 alone
writes, metrics are combined over the ranks, and the command line is the user's `visiondet train`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml
from test_engine_support import toy_config

from vision.checkpoint import load_checkpoint

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent

# Each rank appends the size of every batch it trains on to batches_<rank>.txt, then runs the real CLI.
WORKER = """
import os, sys
sys.path.insert(0, {tests!r})
from test_engine_support import ToyTask, register_toy_task
register_toy_task()
from apps.cli import main

move_batch = ToyTask.move_batch
def recording_move_batch(self, batch, device):
    with open(f"batches_{{os.environ['RANK']}}.txt", "a") as f:
        f.write(f"{{len(batch[1])}}\\n")
    return move_batch(self, batch, device)
ToyTask.move_batch = recording_move_batch
sys.exit(main(["train", sys.argv[1], "train.log_every=1"]))
"""


def test_two_gloo_processes_train_and_rank_zero_writes_one_checkpoint(tmp_path):
    cfg = toy_config(tmp_path, epochs=2, batch_size=4)
    cfg["data"]["options"] = {"num_items": 16, "num_val": 7}  # 7: the ranks evaluate 4 and 3 images
    (tmp_path / "exp.yaml").write_text(yaml.safe_dump(cfg))
    (tmp_path / "worker.py").write_text(WORKER.format(tests=str(TESTS)))
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node=2", "worker.py", "exp.yaml"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]

    # both ranks trained: 16 images / 2 ranks / batch 4 = 2 batches per epoch each
    for rank in (0, 1):
        assert (tmp_path / f"batches_{rank}.txt").read_text().split() == ["4"] * 4, rank
    run = tmp_path / "run"
    assert sorted(p.name for p in run.glob("*.pt")) == ["best.pt", "last.pt"]
    assert not list(run.glob(".*.tmp"))
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "train"] == [1, 2, 3, 4]  # one writer, not two
    last = load_checkpoint(run / "last.pt")
    assert last["train_state"]["step"] == 4 and len(last["train_state"]["rng"]) == 2
    assert rows[-1]["kind"] == "val" and rows[-1]["images"] == 7  # counted over both ranks' shards
    assert proc.stdout.count("completed after 2 epochs") == 1
