"""Every YAML file in configs/ loads through the real config loader and builds its model; every detector
(the VGG-16 layouts included, at a small input size) runs one training forward and backward.

Nothing is read or downloaded: models are built as a checkpoint rebuilds them (``load_pretrained=False``:
random weights), and the data paths are pointed at empty stand-ins (only their existence is checked here).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from apps.config import load_config, load_yaml_with_bases
from apps.tasks import get_task
from detection.rpn import RegionProposalNetwork

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
FILES = sorted(CONFIGS.rglob("*.yaml"))
CLASSES = [{"id": 1, "name": "a"}, {"id": 3, "name": "b"}, {"id": 7, "name": "c"}]
PATH_KEYS = {"images": "dir", "root": "dir", "masks": "dir", "annotations": "file"}
# small detector inputs (the VGG-16 layouts at 64-96 px instead of 600-1000) and few regions per image
DETECTOR_SIZE = ["model.min_size=64", "model.max_size=96", "model.roi.batch_size_per_image=8"]
RPN_SIZE = ["model.rpn.pre_nms_top_n_train=100", "model.rpn.post_nms_top_n_train=50"]  # faster_rcnn_* only
RCNN_SIZE = ["model.rcnn.input_size=64", "model.rcnn.region_batch=8", "model.rcnn.batch_size=8"]


def _bases() -> set[Path]:
    """Files other configs name as their ``base:``."""
    used = set()
    for path in FILES:
        base = yaml.safe_load(path.read_text()).get("base") or []
        for name in [base] if isinstance(base, str) else base:
            used.add((path.parent / name).resolve())
    return used


def _data_overrides(data: dict, tmp_path: Path) -> list[str]:
    """Point every data path the file names at an existing empty folder or file."""
    overrides = []
    for split in ("train", "val"):
        for key, kind in PATH_KEYS.items():
            if (data.get("data") or {}).get(split, {}) and key in data["data"][split]:
                stand_in = tmp_path / f"{split}_{key}"
                stand_in.mkdir(exist_ok=True) if kind == "dir" else stand_in.touch()
                overrides.append(f"data.{split}.{key}={stand_in}")
    return overrides


def test_every_config_file_is_an_experiment_or_a_base_of_one():
    assert len(FILES) >= 15
    bases = _bases()
    for path in FILES:
        if "task" not in load_yaml_with_bases(path) or path.name.startswith("_"):
            assert path.resolve() in bases, f"{path} is partial but no config uses it as a base"


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_config_loads_and_builds_its_model(path, tmp_path):
    torch.set_num_threads(2)
    torch.manual_seed(0)
    data = load_yaml_with_bases(path)
    if "task" not in data or path.name.startswith("_"):
        pytest.skip("a base, loaded with the configs that extend it")
    overrides = _data_overrides(data, tmp_path)
    if data["task"] == "detection":
        arch = data["model"]["arch"]
        if arch.startswith("rcnn_"):
            overrides += RCNN_SIZE
        else:
            overrides += DETECTOR_SIZE + (RPN_SIZE if arch.startswith("faster_rcnn_") else [])
    exp = load_config(path, overrides)  # the loader `visiondet train` uses: typed, checked, bases merged
    task = get_task(exp.task)
    model = task.build_model(exp.model, CLASSES, load_pretrained=False)
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params > 0
    model.train()
    if task.name == "detection":
        _detector_step(model)
    elif task.name == "classification":
        _, losses = model(torch.rand(2, 3, 64, 64), torch.tensor([0, 2]))
        assert losses and all(torch.isfinite(v) for v in losses.values())
        sum(losses.values()).backward()
    else:
        target = torch.randint(0, 4, (2, 64, 64))
        _, losses = model(torch.rand(2, 3, 64, 64), target)
        assert losses and all(torch.isfinite(v) for v in losses.values())
        sum(losses.values()).backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def _detector_step(model: torch.nn.Module) -> None:
    images = [torch.rand(3, 64, 80), torch.rand(3, 72, 64)]
    targets = [
        {"boxes": torch.tensor([[8.0, 8.0, 40.0, 48.0]]), "labels": torch.tensor([2]),
         "crowd_boxes": torch.tensor([[50.0, 0.0, 80.0, 30.0]])},
        {"boxes": torch.tensor([[10.0, 20.0, 60.0, 70.0], [0.0, 0.0, 20.0, 20.0]]),
         "labels": torch.tensor([1, 3]), "crowd_boxes": torch.zeros(0, 4)},
    ]
    if not isinstance(getattr(model, "proposal_generator", None), RegionProposalNetwork):
        for target in targets:  # external proposals come with the data
            target["proposals"] = torch.tensor([[6.0, 6.0, 42.0, 46.0], [0.0, 0.0, 30.0, 30.0],
                                                [30.0, 30.0, 64.0, 64.0], [12.0, 18.0, 58.0, 66.0]])
    _, losses = model(images, targets)
    assert losses and all(torch.isfinite(v) for v in losses.values()), losses
    sum(losses.values()).backward()
