"""A tiny task for the engine tests (no test functions here): 8x8 images whose class shows in their mean
colour, a small conv net with BatchNorm and dropout, and per-item random noise (so that the data
randomness of a run is exercised). Items listed in ``data.options.nan_items`` are NaN images.

Child processes (resume, kill and DDP tests) import it too: see ``register_toy_task``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from apps.config import SplitConfig
from apps.engine.distributed import all_reduce_sum
from apps.tasks import TASKS
from apps.tasks.base import Datasets, Task

CLASSES = [{"id": 0, "name": "dark"}, {"id": 1, "name": "bright"}]


def register_toy_task() -> None:
    TASKS["toy"] = "support.engine:ToyTask"


@dataclass
class ToyModelConfig:
    num_classes: int = 2
    width: int = 4
    dropout: float = 0.2


@dataclass
class ToyOptions:
    num_items: int = 16
    num_val: int = 8
    nan_items: list[int] = field(default_factory=list)


class ToyDataset(Dataset):
    def __init__(self, n: int, nan_items: list[int] = (), offset: int = 0) -> None:
        self.n, self.nan_items, self.offset = n, set(nan_items), offset

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        label = i % 2
        # a fixed image per item plus fresh noise at every load (the "augmentation")
        base = torch.Generator().manual_seed(1000 + self.offset + i)
        image = 0.3 + 0.4 * label + 0.1 * torch.rand(3, 8, 8, generator=base) + 0.05 * torch.rand(3, 8, 8)
        if i in self.nan_items:
            image = torch.full_like(image, float("nan"))
        return image, label


class ToyNet(nn.Module):
    def __init__(self, cfg: ToyModelConfig) -> None:
        super().__init__()
        width = cfg.width
        self.backbone = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU())
        self.dropout = nn.Dropout(cfg.dropout)
        self.head = nn.Linear(cfg.width, cfg.num_classes)

    def forward(self, images: torch.Tensor, targets: torch.Tensor | None = None):
        logits = self.head(self.dropout(self.backbone(images).mean(dim=(2, 3))))
        losses = {"loss_cls": F.cross_entropy(logits, targets)} if targets is not None else {}
        return (None if self.training else logits), losses


class ToyTask(Task):
    name = "toy"
    model_config_type = ToyModelConfig
    options_type = ToyOptions
    primary_metric = "accuracy"
    split_keys = ()

    def build_model(self, model_cfg: ToyModelConfig, classes: list[dict[str, Any]], *,
                    load_pretrained: bool = True) -> nn.Module:
        return ToyNet(self.model_config_for(model_cfg, classes))

    def model_config_for(self, model_cfg: ToyModelConfig, classes: list[dict[str, Any]]) -> ToyModelConfig:
        return ToyModelConfig(len(classes), model_cfg.width, model_cfg.dropout)

    def build_datasets(self, exp) -> Datasets:
        opts = exp.data.options
        val = ToyDataset(opts.num_val, offset=500) if exp.data.val is not None else None
        return Datasets(ToyDataset(opts.num_items, opts.nan_items), val, CLASSES)

    def build_eval_dataset(self, split: SplitConfig, loaded) -> Dataset:
        return ToyDataset(8, offset=500)

    def move_batch(self, batch, device):
        images, labels = batch
        return images.to(device), labels.to(device)

    def sample_names(self, dataset, indices):
        return [f"toy-{i}" for i in indices]

    def evaluate(self, model, loader, device, classes) -> dict[str, float]:
        counts = torch.zeros(2, dtype=torch.float64)
        for images, labels in loader:
            logits, _ = model(images.to(device))
            counts += torch.tensor([(logits.argmax(1).cpu() == labels).sum().item(), len(labels)])
        correct, total = all_reduce_sum(counts).tolist()
        return {"accuracy": correct / max(total, 1.0), "images": total}


def toy_config(tmp_path, **train: Any) -> dict[str, Any]:
    """A config mapping for the toy task writing to ``tmp_path / 'run'``."""
    return {
        "task": "toy",
        "data": {"train": {}, "val": {}, "workers": 0, "options": {}},
        "train": {"epochs": 2, "batch_size": 4, "lr": 0.1, "log_every": 1, **train},
        "output_dir": str(tmp_path / "run"),
        "device": "cpu",
        "seed": 3,
    }


def budget_config(tmp_path, name: str) -> dict[str, Any]:
    """A 60 s time-budgeted toy run writing to ``tmp_path / name`` (timed exactly by the ``clock`` fixture).
    16 items / batch 4: 4 steps an epoch; 8 validation items: 2 evaluation batches."""
    cfg = toy_config(tmp_path, epochs=1, time_budget="60s", scheduler="cosine", min_lr_ratio=0.1,
                     warmup_iters=50, checkpoint_every=1)
    cfg["output_dir"] = str(tmp_path / name)
    return cfg


# ---- a fake clock for time-budgeted runs (the `clock` fixture in tests/conftest.py) --------------------


class FakeClock:
    """Stands in for the trainer's ``clock``: the time is ``now``, moved only by whoever holds it."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Interrupt(Exception):
    """Raised by the ``clock`` fixture at batch ``interrupt_at``: a run stopped mid-way."""
