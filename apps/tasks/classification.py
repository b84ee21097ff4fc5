"""Image classification for the engine: ImageFolder data, vision.classification.Classifier, top-1/top-5.

Data: ``data.train.root`` / ``data.val.root`` are ImageFolder trees (one sub-folder per class; the
sorted folder names are the classes). Validation folders are matched to the training classes by name, so
a validation set may lack a class but may not add one. ``data.options.size`` is the network input side.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from apps.config import ConfigError, Experiment, SplitConfig
from apps.engine.distributed import all_reduce_sum
from apps.tasks.base import Datasets, Relabelled, Task, class_positions
from apps.tasks.inference.classification import ClassificationInference
from vision.classification import Classifier, ClassifierConfig
from vision.data.folder import ImageFolderDataset
from vision.data.transforms import build_transforms

__all__ = ["ClassificationOptions", "ClassificationTask", "classification_metrics"]


@dataclass
class ClassificationOptions:
    size: int = 224  # input side; evaluation resizes the short side to size / 0.875 and centre-crops


def _align(dataset: Any, classes: list[dict[str, Any]], where: str) -> Dataset:
    """``dataset`` with labels in the order of ``classes``; its folders must all be among them."""
    positions = class_positions(dataset.classes, classes, where, "class folders")
    return dataset if positions is None else Relabelled(dataset, positions)


def classification_metrics(correct_top1: torch.Tensor, correct_topk: torch.Tensor, total: torch.Tensor,
                           classes: list[dict[str, Any]], k: int) -> dict[str, float]:
    """Metrics from per-class counts (each ``[K]``): top1, top{k}, mean per-class accuracy, acc/<name>."""
    n = float(total.sum())
    metrics = {"top1": float(correct_top1.sum()) / max(n, 1.0),
               f"top{k}": float(correct_topk.sum()) / max(n, 1.0)}
    present = total > 0
    per_class = correct_top1 / total.clamp(min=1)
    metrics["mean_class_acc"] = float(per_class[present].mean()) if present.any() else 0.0
    for c, acc, seen in zip(classes, per_class.tolist(), present.tolist(), strict=True):
        if seen:
            metrics[f"acc/{c['name']}"] = acc
    metrics["images"] = n
    return metrics


class ClassificationTask(Task):
    name = "classification"
    inference = ClassificationInference
    model_config_type = ClassifierConfig
    options_type = ClassificationOptions
    primary_metric = "top1"
    split_keys = ("root",)

    def build_model(self, model_cfg: ClassifierConfig, classes: list[dict[str, Any]], *,
                    load_pretrained: bool = True) -> nn.Module:
        return Classifier(self.model_config_for(model_cfg, classes), load_pretrained=load_pretrained)

    def model_config_for(self, model_cfg: ClassifierConfig, classes: list[dict[str, Any]]
                         ) -> ClassifierConfig:
        return replace(model_cfg, num_classes=len(classes))

    def _dataset(self, root: str, spec: list[dict[str, Any]] | None, size: int, train: bool, where: str
                 ) -> ImageFolderDataset:
        try:
            transforms = build_transforms(spec, "classification", train, size=size)
        except ValueError as exc:  # unknown transform or parameter: the message suggests the close one
            raise ConfigError(f"{where.rsplit('.', 1)[0]}.transforms: {exc}") from None
        try:
            return ImageFolderDataset(root, transforms=transforms)
        except (FileNotFoundError, ValueError) as exc:
            raise ConfigError(f"{where}: {exc}") from None

    def build_datasets(self, exp: Experiment) -> Datasets:
        size = exp.data.options.size
        train = self._dataset(exp.data.train.root, exp.data.train.transforms, size, True, "data.train.root")
        classes = [dict(c) for c in train.classes]
        if len(classes) < 2:
            raise ConfigError(f"data.train.root: {exp.data.train.root}: {len(classes)} class folder(s); "
                              "classification needs at least 2")
        val = None
        if exp.data.val is not None:
            folder = self._dataset(exp.data.val.root, exp.data.val.transforms, size, False, "data.val.root")
            val = _align(folder, classes, f"data.val.root: {exp.data.val.root}")
        return Datasets(train, val, classes)

    def build_eval_dataset(self, split: SplitConfig, loaded: Any) -> Dataset:
        if split.root is None:
            raise ConfigError("--root: required to evaluate a classification model (an ImageFolder tree)")
        if not Path(split.root).is_dir():
            raise ConfigError(f"--root: {split.root}: no such folder")
        size = int(loaded.preprocess.get("size", 224))
        folder = self._dataset(split.root, None, size, False, "--root")
        return _align(folder, loaded.classes, f"--root: {split.root}")

    def move_batch(self, batch: Any, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = batch
        non_blocking = device.type == "cuda"
        return images.to(device, non_blocking=non_blocking), labels.to(device, non_blocking=non_blocking)

    def sample_names(self, dataset: Any, indices: list[int]) -> list[str]:
        samples = getattr(getattr(dataset, "dataset", dataset), "samples", None)
        if samples is None:
            return [str(i) for i in indices]
        return [str(samples[i][0] if isinstance(samples[i], tuple | list) else samples[i]) for i in indices]

    def evaluate(self, model: nn.Module, loader: Any, device: torch.device,
                 classes: list[dict[str, Any]]) -> dict[str, float]:
        num = len(classes)
        k = min(5, num)
        counts = torch.zeros(3, num, dtype=torch.float64, device=device)  # top-1 right, top-k right, seen
        for batch in loader:
            images, labels = self.move_batch(batch, device)
            logits, _ = model(images)
            topk = logits.topk(k, dim=1).indices
            ones = torch.ones_like(labels, dtype=torch.float64)
            counts[0].index_add_(0, labels, (topk[:, 0] == labels).double())
            counts[1].index_add_(0, labels, (topk == labels[:, None]).any(dim=1).double())
            counts[2].index_add_(0, labels, ones)
        counts = all_reduce_sum(counts).cpu()
        return classification_metrics(counts[0], counts[1], counts[2], classes, k)

    def format_metrics(self, metrics: dict[str, float]) -> str:
        lines = [f"images: {int(metrics.get('images', 0))}"]
        lines += [f"{k}: {v:.4f}" for k, v in metrics.items() if "/" not in k and k != "images"]
        per_class = [(k.split("/", 1)[1], v) for k, v in metrics.items() if k.startswith("acc/")]
        if per_class:
            width = max(len(name) for name, _ in per_class)
            lines.append("per-class accuracy:")
            lines += [f"  {name:<{width}}  {v:.4f}" for name, v in per_class]
        return "\n".join(lines)

    def preprocess(self, exp: Experiment) -> dict[str, Any]:
        return {"size": int(exp.data.options.size)}
