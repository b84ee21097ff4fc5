"""Two CPU processes (gloo). Under torchrun: both ranks train on their half of the data, rank 0 alone
writes, metrics are combined over the ranks, and the command line is the user's `visiondet train`.
Under mp.spawn: the engine really trains data-parallel: after every step both ranks hold identical weights,
equal to those of one process trained on the whole batches."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml
from support.engine import ToyNet, ToyTask, register_toy_task, toy_config
from torch import nn

from vision.checkpoint import load_checkpoint

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent

# Each rank appends the size of every batch it trains on to batches_<rank>.txt, then runs the real CLI.
WORKER = """
import os, sys
sys.path.insert(0, {tests!r})
from support.engine import ToyTask, register_toy_task
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


# ------------------------------------------------------------ data parallel = one process on the whole batch


def _build_without_batchnorm(self, model_cfg, classes, *, load_pretrained=True):
    # BatchNorm normalises by the statistics of the batch a process sees: halves differ from the whole
    net = ToyNet(self.model_config_for(model_cfg, classes))
    net.backbone[1] = nn.Identity()
    return net


def _train_recording_weights(rank: int, world: int, root: str, per_rank_batch: int) -> None:
    """One process of a run (spawned): trains the toy task and saves the weights it held before every
    forward (= after every optimizer step) and at the end, to ``weights_<world>_<rank>.pt``."""
    from apps.config import build_experiment
    from apps.engine.trainer import train

    torch.set_num_threads(1)
    register_toy_task()
    ToyTask.build_model = _build_without_batchnorm
    seen: list[list[torch.Tensor]] = []
    names: list[str] = []
    forward = ToyNet.forward

    def recording(self, images, targets=None):
        if self.training:
            names[:] = [name for name, _ in self.named_parameters()]
            seen.append([p.detach().clone() for p in self.parameters()])
        return forward(self, images, targets)

    ToyNet.forward = recording
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{root}/rendezvous", rank=rank, world_size=world)
    try:
        cfg = toy_config(Path(root) / f"world{world}", epochs=2, batch_size=per_rank_batch)
        cfg["data"].pop("val")
        cfg["model"] = {"dropout": 0.0}  # dropout masks differ between processes
        result = train(build_experiment(cfg))
        if world > 1:
            dist.barrier()
    finally:
        if world > 1:
            dist.destroy_process_group()
    if rank == 0:
        final = load_checkpoint(result.run_dir / "last.pt")["state_dict"]
        seen.append([final[name] for name in names])
    torch.save(seen, Path(root) / f"weights_{world}_{rank}.pt")


def test_two_ranks_on_half_batches_step_like_one_process_on_the_whole(tmp_path):
    # 16 items, epochs 2: ranks take 2 items per step (their halves of each 4-item batch), one process 4
    mp.spawn(_train_recording_weights, args=(2, str(tmp_path), 2), nprocs=2, join=True)
    mp.spawn(_train_recording_weights, args=(1, str(tmp_path), 4), nprocs=1, join=True)
    rank0 = torch.load(tmp_path / "weights_2_0.pt", weights_only=True)
    rank1 = torch.load(tmp_path / "weights_2_1.pt", weights_only=True)
    single = torch.load(tmp_path / "weights_1_0.pt", weights_only=True)
    steps = 2 * 16 // 4
    assert len(rank1) == steps and len(rank0) == len(single) == steps + 1  # + the saved final weights
    for step in range(steps):
        # identical on both ranks: gradients were averaged over the ranks before every update
        assert all(torch.equal(a, b) for a, b in zip(rank0[step], rank1[step], strict=True)), step
    for step in range(steps + 1):
        for a, b in zip(rank0[step], single[step], strict=True):
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-6), (step, (a - b).abs().max())
    moved = max((a - b).abs().max().item() for a, b in zip(single[0], single[-1], strict=True))
    assert moved > 1e-3  # the weights changed: they agree because the training does, not by standing still
