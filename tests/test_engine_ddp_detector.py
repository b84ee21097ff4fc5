"""Data-parallel training of a real (tiny) detector whose batch norm trains: two gloo processes, each on its
share of the batches. With DDP the ranks hold the same weights and batch-norm statistics at every step (its
gradient all-reduce and buffer broadcast); with DDP patched out of the engine they drift apart, which is
what the first test would catch if the engine stopped wrapping the model."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from vision.data.synthetic import make_shapes

TINY = {"arch": "faster_rcnn_r18_fpn", "frozen_bn": False, "freeze_at": 0, "min_size": 64, "max_size": 96,
        "fpn_channels": 16, "rpn": {"post_nms_top_n_train": 32, "post_nms_top_n_test": 16},
        "roi": {"representation_size": 16, "batch_size_per_image": 16, "detections_per_img": 10}}


def _train_rank(rank: int, world: int, root: str) -> None:
    """One spawned process: trains the tiny detector twice, with the engine's DDP and with DDP patched out,
    and saves its state at the start of every step of each run."""
    import apps.engine.trainer as trainer_module
    from apps.config import build_experiment
    from detection.models import TwoStageDetector

    torch.set_num_threads(1)
    states: list[dict[str, torch.Tensor]] = []
    forward = TwoStageDetector.forward

    def recording(self, images, targets=None, proposals=None, **kwargs):
        if self.training:
            states.append({k: v.detach().clone() for k, v in self.state_dict().items()})
        return forward(self, images, targets, proposals, **kwargs)

    TwoStageDetector.forward = recording
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", init_method=f"file://{root}/rendezvous", rank=rank, world_size=world)
    try:
        data = Path(root) / "data" / "train"
        for with_ddp in (True, False):
            if not with_ddp:  # each rank on its own: what the engine would do if it stopped wrapping
                trainer_module.DistributedDataParallel = lambda module, **kwargs: module
            exp = build_experiment({
                "task": "detection", "model": TINY, "device": "cpu", "seed": 0,
                "output_dir": str(Path(root) / f"run_{with_ddp}"),
                "data": {"train": {"images": str(data / "images"),
                                   "annotations": str(data / "annotations.json")}, "val": None, "workers": 0},
                "train": {"epochs": 1, "batch_size": 2, "lr": 0.02, "warmup_iters": 0, "log_every": 1}})
            trainer_module.train(exp)
            torch.save(states, Path(root) / f"states_{with_ddp}_{rank}.pt")
            states.clear()
            dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[bool, tuple[list, list]]:
    root = tmp_path_factory.mktemp("ddp_detector")
    make_shapes("detection", root / "data", num_images=8, seed=0, image_size=(64, 96), val_fraction=0.0)
    mp.spawn(_train_rank, args=(2, str(root)), nprocs=2, join=True)
    return {ddp: tuple(torch.load(root / f"states_{ddp}_{r}.pt", weights_only=True) for r in (0, 1))
            for ddp in (True, False)}


def _differences(a: dict, b: dict) -> list[str]:
    return [k for k in a if a[k].dtype.is_floating_point and not torch.allclose(a[k], b[k], atol=1e-6)]


def test_ranks_of_a_batch_norm_detector_train_as_one(runs):
    rank0, rank1 = runs[True]
    assert len(rank0) == len(rank1) == 2  # 8 images, 2 ranks, batches of 2: two steps each
    bn = [k for k in rank0[0] if k.endswith("running_mean")]
    assert bn  # the backbone's batch norms train (frozen_bn: false)
    # after the first update: the same weights and the same batch-norm statistics on both ranks
    assert _differences(rank0[1], rank1[1]) == []
    moved = [k for k in bn if not torch.equal(rank0[0][k], rank0[1][k])]
    assert moved and _differences(rank0[0], rank0[1])  # training moved them: equal by training, not by rest


def test_without_ddp_the_ranks_drift_apart(runs):
    rank0, rank1 = runs[False]
    drifted = _differences(rank0[1], rank1[1])  # the first test's check, failing: each rank on its own
    assert any(k.endswith("running_mean") for k in drifted) and any(k.endswith("weight") for k in drifted)
