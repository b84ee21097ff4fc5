"""The Task interface: what the training loop (apps/engine/trainer.py) and `visiondet evaluate` need.

A task (classification, segmentation, detection) provides its model, its data and its evaluator; the
engine provides everything else (optimiser, schedule, AMP, DDP, EMA, checkpoints, logging). One module
per task, ``apps/tasks/<name>.py``, defines a :class:`Task` subclass; ``apps.tasks.TASKS`` names it.

How the engine uses a task, in order:

1. ``check_config(exp)`` while loading the config: missing data files are errors before any work.
2. ``build_datasets(exp)`` -> :class:`Datasets` (train, val or None, classes).
3. ``build_model(exp.model, classes, load_pretrained=True)``; ``exp.model`` is an instance of
   ``model_config_type``. The model follows the contract in docs/ARCHITECTURE.md:
   ``forward(images, targets=None) -> (outputs, losses)``. Parameters of a child module named
   ``backbone`` get ``train.backbone_lr_mult``; a model that supports ``train.unfreeze_at_epoch`` has a
   method ``unfreeze_backbone()``.
4. Training batches: the engine samples indices (a DistributedSampler, also with one process, so the
   order depends only on seed and epoch), groups them with ``batch_sampler(...)``, loads items with
   ``dataset[i]``, collates them with ``collate(items)`` and moves them with ``move_batch(batch, device)``
   -> ``(images, targets)`` that go straight into the model.
5. ``evaluate(model, loader, device, classes)`` on the validation split (the loader yields
   ``collate``-d batches of this process's shard; the model is unwrapped, in eval mode, and the call
   runs under ``torch.inference_mode()``). It returns flat float metrics, already reduced over all
   processes (see apps.engine.distributed: ``all_reduce_sum``, ``all_gather_object``). Per-class values
   use ``group/name`` keys, e.g. ``acc/circle``, ``AP/person``. ``primary_metric`` (higher is better)
   picks best.pt and drives early stopping.
6. ``preprocess(exp)`` is stored in the checkpoint: what prediction needs beyond the model, read by the
   task's ``inference`` (apps/tasks/inference/), which predict, the demo and export use.
7. ``finish_training(exp, run_dir, device, log)`` after the loop, for tasks with later stages (R-CNN).

`visiondet evaluate` calls ``build_eval_dataset(split, loaded)`` then ``evaluate``; a task that can score
a results file without a model (detection: COCO results JSON) overrides ``score_predictions``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn
from torch.utils.data import BatchSampler, Dataset, Sampler, default_collate

from apps.experiment import Experiment, SplitConfig
from apps.schema import ConfigError
from apps.tasks.inference.base import Inference

__all__ = ["Task", "Datasets", "NoOptions", "LoadedModel"]


@dataclass
class NoOptions:
    """``data.options`` of a task that has none."""


@dataclass
class Datasets:
    """What ``Task.build_datasets`` returns. ``classes``: ``[{"id", "name"}, ...]`` in label order."""

    train: Dataset
    val: Dataset | None
    classes: list[dict[str, Any]]


class Relabelled(Dataset):
    """``dataset`` with each item's target ``t`` replaced by ``lookup[t]`` (a list for class indices, a
    tensor for label maps)."""

    def __init__(self, dataset: Dataset, lookup: Any) -> None:
        self.dataset, self.lookup = dataset, lookup

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        image, target = self.dataset[index]
        return image, self.lookup[target]


def class_positions(own: list[dict[str, Any]], classes: list[dict[str, Any]], where: str,
                    what: str = "classes") -> list[int] | None:
    """Index in ``classes`` (the model's order) of each of a dataset's ``own`` classes, matched by name;
    None when the two orders already agree. A class the model does not know is a ConfigError."""
    names = [c["name"] for c in classes]
    mine = [c["name"] for c in own]
    if mine == names:
        return None
    unknown = [n for n in mine if n not in names]
    if unknown:
        raise ConfigError(f"{where}: {what} {unknown} are not among the model's classes {names}")
    return [names.index(n) for n in mine]


class Task(ABC):
    """Model, data and evaluation of one task; subclasses set the class attributes and abstract methods."""

    name: ClassVar[str]
    # Everything predict, the demo, export and explain's caller need at inference (apps/tasks/inference/):
    # input transform, model output -> result, drawing, records. They dispatch on this, never on ``name``.
    inference: ClassVar[type[Inference]]
    model_config_type: ClassVar[type]  # dataclass rebuilt from checkpoint["model"], e.g. ClassifierConfig
    options_type: ClassVar[type] = NoOptions  # dataclass for the config's data.options
    primary_metric: ClassVar[str]  # key of evaluate()'s result, higher is better: "top1", "mIoU", "AP50"
    split_keys: ClassVar[tuple[str, ...]]  # SplitConfig fields each split needs: ("images", "annotations")
    # DDP: True when some trainable parameters may get no gradient in a step (slower; DDP must search)
    find_unused_parameters: ClassVar[bool] = False

    # ---- configuration -----------------------------------------------------------------------------------

    def check_config(self, exp: Experiment) -> None:
        """Raise ConfigError for missing keys or files of the data splits (called before any work)."""
        splits = [("data.train", exp.data.train)]
        if exp.data.val is not None:
            splits.append(("data.val", exp.data.val))
        for where, split in splits:
            self.check_split(split, where)

    def check_split(self, split: SplitConfig, where: str) -> None:
        for key in self.split_keys:
            if getattr(split, key) is None:
                raise ConfigError(f"{where}.{key}: required by the {self.name} task")
        for key in ("images", "annotations", "masks", "root"):
            value = getattr(split, key)
            if value is not None and not Path(value).exists():
                raise ConfigError(f"{where}.{key}: {value}: no such file or folder")

    # ---- model -------------------------------------------------------------------------------------------

    @abstractmethod
    def build_model(self, model_cfg: Any, classes: list[dict[str, Any]], *, load_pretrained: bool = True
                    ) -> nn.Module:
        """The model for ``classes`` (its class count comes from ``classes``, not from ``model_cfg``).

        ``load_pretrained=False`` (rebuilding from a checkpoint) must not read or download any weights.
        """

    def model_config_for(self, model_cfg: Any, classes: list[dict[str, Any]]) -> Any:
        """The model config as stored in the checkpoint (e.g. with num_classes set); default: unchanged."""
        return model_cfg

    def fit_to_data(self, exp: Experiment, data: Datasets) -> tuple[Experiment, list[str]]:
        """``exp`` with the settings it leaves to the training data filled in (e.g. detection's
        ``model.rpn.anchor_sizes: auto``), and lines for the run's log; default: unchanged. The trainer
        calls it once the datasets exist, so the run folder and checkpoints keep the fitted values."""
        return exp, []

    # ---- data --------------------------------------------------------------------------------------------

    @abstractmethod
    def build_datasets(self, exp: Experiment) -> Datasets:
        """Training and validation datasets from ``exp.data`` (train transforms on train only)."""

    @abstractmethod
    def build_eval_dataset(self, split: SplitConfig, loaded: LoadedModel) -> Dataset:
        """A dataset for `visiondet evaluate`, preprocessed as the checkpoint says, labelled in the
        checkpoint's class order (a class set that does not match is a ConfigError naming both)."""

    def collate(self, items: list[Any]) -> Any:
        """Items -> one batch. Default: stack (classification, segmentation)."""
        return default_collate(items)

    def batch_sampler(self, dataset: Dataset, sampler: Sampler[int], batch_size: int, *, drop_last: bool
                      ) -> Iterable[list[int]]:
        """Group sampled indices into batches. Detection overrides it with aspect-ratio grouping; the result
        must be deterministic given the sampler's order (resuming mid-epoch replays it and skips batches)."""
        return BatchSampler(sampler, batch_size, drop_last)

    @abstractmethod
    def move_batch(self, batch: Any, device: torch.device) -> tuple[Any, Any]:
        """A collated batch -> ``(images, targets)`` on ``device``, as the model's forward takes them."""

    def sample_names(self, dataset: Dataset, indices: Sequence[int]) -> list[str]:
        """Human-readable ids of dataset items (file names, COCO image ids) for warnings."""
        return [str(i) for i in indices]

    # ---- evaluation --------------------------------------------------------------------------------------

    @abstractmethod
    def evaluate(self, model: nn.Module, loader: Iterable[Any], device: torch.device,
                 classes: list[dict[str, Any]], preprocess: dict[str, Any] | None = None) -> dict[str, float]:
        """Metrics over every process's shard, reduced across processes; includes ``primary_metric``.
        ``preprocess``: a checkpoint's, for what it calibrated after training (a segmenter's pixel
        thresholds); None while training."""

    def score_predictions(self, predictions: str, split: SplitConfig) -> dict[str, float]:
        """Metrics of a saved predictions file against ``split``'s ground truth (no model needed)."""
        raise ConfigError(f"--predictions: the {self.name} task cannot score a predictions file")

    def format_metrics(self, metrics: dict[str, float]) -> str:
        """A printable summary for `visiondet evaluate` (default: one ``key: value`` line each)."""
        width = max((len(k) for k in metrics), default=0)
        return "\n".join(f"{k:<{width}}  {v:.4f}" for k, v in metrics.items())

    # ---- after training ----------------------------------------------------------------------------------

    def finish_training(self, exp: Experiment, run_dir: Path, device: torch.device,
                        log: Callable[[str], None] = print) -> dict[str, float]:
        """Work after the training loop, e.g. R-CNN's SVM and box-regression stages (default: none).

        The engine calls it once the loop has ended normally, in a single process (rank 0, after the
        process group is closed), with the run folder; returned metrics become the run's final metrics.
        """
        return {}

    # ---- checkpoint --------------------------------------------------------------------------------------

    def preprocess(self, exp: Experiment) -> dict[str, Any]:
        """Stored as checkpoint["preprocess"]: what prediction needs beyond the model (plain types only)."""
        return {}


@dataclass
class LoadedModel:
    """A model rebuilt from a checkpoint, in eval mode on its device (apps.tasks.load_model)."""

    task: Task
    model: nn.Module
    classes: list[dict[str, Any]]
    preprocess: dict[str, Any]
    checkpoint: dict[str, Any]  # the whole checkpoint (config, metrics, ...), weights included
    path: Path
