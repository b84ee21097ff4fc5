"""Image classification for the engine: ImageFolder data, vision.classification.Classifier, top-1/top-5.

Data: ``data.train.root`` / ``data.val.root`` are ImageFolder trees (one sub-folder per class; the
sorted folder names are the classes). Validation folders are matched to the training classes by name, so
a validation set may lack a class but may not add one. ``data.options.size`` is the network input side.

"None of these": ``data.options.none_class`` names the class whose images show none of the others (a
``background`` folder). Predict and the demo then answer "none of these" when that class is the most likely
one, or when the most likely class scores under a threshold calibrated after training on the validation
split (held out from training): the lowest threshold under which at most ``data.options.false_accept`` of
the validation images of the none class get a label of another class (:func:`choose_none_threshold`).
The threshold and its figures are written into the run's checkpoints (``preprocess``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from apps.engine.distributed import all_reduce_sum
from apps.engine.loader import eval_loader
from apps.experiment import Experiment, SplitConfig
from apps.schema import ConfigError
from apps.tasks.base import Datasets, Relabelled, Task, class_positions
from apps.tasks.inference.classification import ClassificationInference
from apps.tasks.loading import model_from_checkpoint, read_checkpoint
from vision.checkpoint import load_checkpoint, save_checkpoint
from vision.classification import Classifier, ClassifierConfig
from vision.data.folder import ImageFolderDataset
from vision.data.transforms import build_transforms

__all__ = ["ClassificationOptions", "ClassificationTask", "choose_none_threshold", "classification_metrics"]


@dataclass
class ClassificationOptions:
    size: int = 224  # input side; evaluation resizes the short side to size / 0.875 and centre-crops
    none_class: str | None = None  # the class folder meaning "none of these" (e.g. background)
    false_accept: float = 0.05  # the share of the none class's validation images allowed another label


def choose_none_threshold(probs: Tensor, labels: Tensor, none_label: int, false_accept: float
                          ) -> dict[str, float]:
    """The lowest top-probability threshold under which at most ``false_accept`` of the images labelled
    ``none_label`` get another class's label, and what it does on these images.

    An image gets the label of its most likely class when that is not ``none_label`` and scores at least
    the threshold; otherwise "none of these". probs: [N, K] softmax; labels: [N] true labels.

    Returns ``threshold``, ``false_accept`` (the share of none images labelled at it), ``known_kept`` (the
    share of the other images that keep a label), ``known_right`` (... and the right one) and the counts.
    """
    top, guess = probs.max(dim=1)
    none, known = labels == none_label, labels != none_label
    # a none image's score: the top probability when it names another class (it is "none" otherwise)
    scores = torch.where(guess != none_label, top, torch.zeros_like(top))[none].sort(descending=True).values
    allowed = int(false_accept * len(scores))
    threshold = 0.0
    if allowed < len(scores) and scores[allowed] > 0:
        # just above the first score that must not pass (above 1 when that score is 1: nothing passes)
        threshold = float(torch.nextafter(scores[allowed], torch.tensor(float("inf"))))
    answered = (guess != none_label) & (top >= threshold)
    return {
        "threshold": threshold,
        "false_accept": float(answered[none].float().mean()) if none.any() else 0.0,
        "known_kept": float(answered[known].float().mean()) if known.any() else 0.0,
        "known_right": float((answered & (guess == labels))[known].float().mean()) if known.any() else 0.0,
        "none_images": int(none.sum()),
        "known_images": int(known.sum()),
    }


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

    def check_config(self, exp: Experiment) -> None:
        super().check_config(exp)
        if not 0.0 <= exp.data.options.false_accept < 1.0:
            raise ConfigError(f"data.options.false_accept: {exp.data.options.false_accept} is not in [0, 1)")

    def build_datasets(self, exp: Experiment) -> Datasets:
        size = exp.data.options.size
        train = self._dataset(exp.data.train.root, exp.data.train.transforms, size, True, "data.train.root")
        classes = [dict(c) for c in train.classes]
        if len(classes) < 2:
            raise ConfigError(f"data.train.root: {exp.data.train.root}: {len(classes)} class folder(s); "
                              "classification needs at least 2")
        none_class = exp.data.options.none_class
        if none_class is not None and none_class not in [c["name"] for c in classes]:
            raise ConfigError(f"data.options.none_class: {none_class!r} is not one of the class folders of "
                              f"{exp.data.train.root} ({', '.join(c['name'] for c in classes)})")
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
                 classes: list[dict[str, Any]], preprocess: dict[str, Any] | None = None) -> dict[str, float]:
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
        none_class = exp.data.options.none_class
        return {"size": int(exp.data.options.size), **({"none_class": none_class} if none_class else {})}

    # ---- after training: the "none of these" threshold -------------------------------------------------

    def finish_training(self, exp: Experiment, run_dir: Path, device: torch.device,
                        log: Callable[[str], None] = print) -> dict[str, float]:
        """With ``data.options.none_class`` and a validation split: each of the run's checkpoints gets the
        threshold calibrated on its own model's validation probabilities (``preprocess.reject_below``)."""
        none_class = exp.data.options.none_class
        if none_class is None or exp.data.val is None:
            return {}
        found: dict[str, float] = {}
        for name in ("last.pt", "best.pt"):  # best.pt's figures are the run's (last.pt's when it has none)
            path = run_dir / name
            if not path.is_file():
                continue
            loaded = model_from_checkpoint(self, read_checkpoint(path), path, device)
            probs, labels = self.probabilities(loaded.model, exp.data.val, loaded, exp.train.batch_size,
                                               exp.data.workers, device)
            none_label = [c["name"] for c in loaded.classes].index(none_class)
            found = choose_none_threshold(probs, labels, none_label, exp.data.options.false_accept)
            ckpt = load_checkpoint(path)
            calibration = {**found, "target_false_accept": exp.data.options.false_accept,
                           "split": str(exp.data.val.root)}
            ckpt["preprocess"] = {**ckpt.get("preprocess", {}), "reject_below": found["threshold"],
                                  "calibration": calibration}
            save_checkpoint(ckpt, path)
            log(f"none of these: {path.name} answers under top probability {found['threshold']:.3f} "
                f"(validation: {found['false_accept']:.1%} of {found['none_images']} {none_class} images "
                f"labelled, {found['known_kept']:.1%} of {found['known_images']} others keep a label, "
                f"{found['known_right']:.1%} the right one)")
        return {f"none/{k}": float(v) for k, v in found.items()}

    def probabilities(self, model: nn.Module, split: SplitConfig, loaded: Any, batch_size: int, workers: int,
                      device: torch.device) -> tuple[Tensor, Tensor]:
        """Softmax probabilities [N, K] of ``model`` over ``split`` and the true labels [N]."""
        loader = eval_loader(self.build_eval_dataset(split, loaded), self.collate, batch_size=batch_size,
                             workers=workers)
        probs, labels = [], []
        model.eval()
        with torch.inference_mode():
            for batch in loader:
                images, truth = self.move_batch(batch, device)
                logits, _ = model(images)
                probs.append(logits.float().softmax(1).cpu())
                labels.append(truth.cpu())
        return torch.cat(probs), torch.cat(labels)
