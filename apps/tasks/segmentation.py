"""Semantic segmentation for the engine: COCO or mask-folder data, vision.segmentation models, mIoU.

Data, per split: ``images`` plus either ``annotations`` (COCO instances JSON: polygons and RLE become an
index map, crowd regions are ignored) or ``masks`` (a folder of ``<stem>.png`` index masks, VOC layout,
with the class names in ``data.options.classes``). Validation classes are matched to the training classes
by name, so a validation set may lack a class but may not add one.

Evaluation counts one confusion matrix over the whole split (summed over processes) and reports mIoU (the
primary metric), per-class IoU (``IoU/<name>``, background included), pixel accuracy, mean class accuracy
and frequency-weighted IoU. By default every image is evaluated at its own size; batches group the
images of equal size.

After training with a validation split, each checkpoint gets per-class pixel thresholds of best mIoU there
(vision/segmentation/threshold.py; ``preprocess.class_thresholds``): predict and the demo paint an object
only where the model is that sure of its class, and ``visiondet evaluate`` scores the masks they paint.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from apps.engine.distributed import all_reduce_sum, broadcast_object, is_main
from apps.engine.loader import eval_loader
from apps.experiment import Experiment, SplitConfig
from apps.schema import ConfigError
from apps.tasks.base import Datasets, Relabelled, Task, class_positions
from apps.tasks.inference.segmentation import SegmentationInference
from apps.tasks.loading import model_from_checkpoint, read_checkpoint
from vision.checkpoint import load_checkpoint, same_weights, save_checkpoint
from vision.data.coco import CocoSegmentation, MaskFolderSegmentation
from vision.data.transforms import build_transforms
from vision.segmentation import IGNORE_INDEX, SegmentationConfig, SegmentationMetric, build_segmentation_model
from vision.segmentation.class_weights import fit_class_weights
from vision.segmentation.threshold import RULE, PixelCalibration, ThresholdSweep, paint

__all__ = ["SegmentationOptions", "SegmentationTask", "calibrate_checkpoint", "segmentation_collate"]


@dataclass
class SegmentationOptions:
    """``data.options`` of the segmentation task (the default pipelines; an explicit ``transforms`` list
    of a split replaces its default pipeline)."""

    crop_size: int = 512  # training: random rescale, pad, crop to crop_size x crop_size, horizontal flip
    scale: tuple[float, float] = (0.5, 2.0)  # training: range of the random rescale before the crop
    object_crops: float = 0.0  # training: share of the crops placed around a labelled pixel (rare objects)
    eval_size: int | None = None  # None: evaluate (and predict) at each image's own size; N: longest side N
    classes: list[str] | None = None  # mask folders: names of labels 1..K (COCO files name their categories)


def _align(dataset: Any, classes: list[dict[str, Any]], where: str) -> Dataset:
    """``dataset`` with label maps in the order of ``classes`` (by name); 0 and 255 keep their meaning."""
    positions = class_positions(dataset.classes, classes, where)
    if positions is None:
        return dataset
    lookup = torch.arange(IGNORE_INDEX + 1)
    lookup[1:len(positions) + 1] = torch.tensor(positions) + 1
    return Relabelled(dataset, lookup)


def segmentation_collate(items: list[tuple[Tensor, Tensor]]) -> tuple[list[Tensor], list[Tensor]]:
    """``[(image [3, H_i, W_i], target [H_i, W_i]), ...]`` -> ``([images...], [targets...])``.

    Lists, because evaluation keeps every image at its own size; ``move_batch`` stacks training batches.
    """
    return [image for image, _ in items], [target for _, target in items]


def _metric_summary(metrics: dict[str, Any], classes: list[dict[str, Any]], images: float
                    ) -> dict[str, float]:
    """Metrics as the engine takes them (flat floats): mIoU, pixel_acc, mean_acc, fwIoU, IoU/<name>."""
    out = {"mIoU": metrics["miou"], "pixel_acc": metrics["pixel_accuracy"],
           "mean_acc": metrics["mean_accuracy"], "fwIoU": metrics["fw_iou"]}
    names = ["background"] + [c["name"] for c in classes]
    for name, iou in zip(names, metrics["per_class_iou"], strict=True):
        if iou == iou:  # NaN: the class is in neither the targets nor the predictions; it has no IoU
            out[f"IoU/{name}"] = iou
    out["images"] = images
    return out


def _fit_class_weights(exp: Experiment, data: Datasets) -> tuple[tuple[float, ...] | None, str]:
    """(the fitted class weights, the log line), or (None, the error)."""
    where = exp.data.train.annotations or exp.data.train.masks
    if not hasattr(data.train, "index_map"):
        return None, f"model.class_weights: 'auto' cannot read the masks of {type(data.train).__name__}"
    names = ["background"] + [c["name"] for c in data.classes]
    try:
        return fit_class_weights(data.train, names)
    except ValueError as exc:
        return None, f"model.class_weights: 'auto' ({where}): {exc}"


class SegmentationTask(Task):
    name = "segmentation"
    inference = SegmentationInference
    model_config_type = SegmentationConfig
    options_type = SegmentationOptions
    primary_metric = "mIoU"
    split_keys = ("images",)

    # ---- configuration -----------------------------------------------------------------------------------

    def check_config(self, exp: Experiment) -> None:
        super().check_config(exp)
        for where, split in (("data.train", exp.data.train), ("data.val", exp.data.val)):
            if split is not None and split.masks is not None and not exp.data.options.classes:
                raise ConfigError(f"{where}.masks: mask folders need data.options.classes "
                                  "(the names of labels 1..K)")
        opts = exp.data.options
        if opts.crop_size < 1 or (opts.eval_size is not None and opts.eval_size < 1):
            raise ConfigError("data.options.crop_size and data.options.eval_size must be >= 1")
        if not 0 < opts.scale[0] <= opts.scale[1]:
            raise ConfigError(f"data.options.scale: expected 0 < low <= high, got {list(opts.scale)}")
        if not 0 <= opts.object_crops <= 1:
            raise ConfigError(f"data.options.object_crops: expected a share in [0, 1], got "
                              f"{opts.object_crops}")

    def check_split(self, split: SplitConfig, where: str) -> None:
        super().check_split(split, where)
        if (split.annotations is None) == (split.masks is None):
            raise ConfigError(f"{where}: give either annotations (COCO JSON) or masks "
                              "(a folder of PNG index masks)")

    # ---- model -------------------------------------------------------------------------------------------

    def model_config_for(self, model_cfg: SegmentationConfig, classes: list[dict[str, Any]]
                         ) -> SegmentationConfig:
        return replace(model_cfg, num_classes=len(classes))

    def fit_to_data(self, exp: Experiment, data: Datasets) -> tuple[Experiment, list[str]]:
        """``model.class_weights: auto``: ENet's weights from the training masks' pixel shares
        (vision/segmentation/class_weights.py); the run's config and checkpoints keep the numbers. Rank 0
        counts, the other ranks receive its answer."""
        if exp.model.class_weights != "auto":
            return exp, []
        outcome = _fit_class_weights(exp, data) if is_main() else None
        weights, line = broadcast_object(outcome)  # every rank the same weights (or the same error)
        if weights is None:
            raise ConfigError(line)
        return replace(exp, model=replace(exp.model, class_weights=weights)), [line]

    def build_model(self, model_cfg: SegmentationConfig, classes: list[dict[str, Any]], *,
                    load_pretrained: bool = True) -> nn.Module:
        try:
            return build_segmentation_model(self.model_config_for(model_cfg, classes),
                                            load_pretrained=load_pretrained)
        except ValueError as exc:  # bad combinations (e.g. aux head on VGG), unreadable backbone weights
            raise ConfigError(f"model: {exc}") from exc

    # ---- data --------------------------------------------------------------------------------------------

    def _dataset(self, split: SplitConfig, where: str, transforms: Any, classes: list[Any] | None) -> Any:
        try:
            if split.annotations is not None:
                return CocoSegmentation(split.images, split.annotations, transforms=transforms)
            return MaskFolderSegmentation(split.images, split.masks, classes, transforms)
        except (ValueError, OSError) as exc:  # AnnotationError, ImageError, missing files: name the split
            raise ConfigError(f"{where}: {exc}") from exc

    @staticmethod
    def _eval_transforms(spec: list[dict[str, Any]] | None, size: int | None) -> Any:
        if spec is None and size is None:
            return None  # each image at its own size
        return build_transforms(spec, "segmentation", False, **({"size": size} if size else {}))

    def build_datasets(self, exp: Experiment) -> Datasets:
        opts: SegmentationOptions = exp.data.options
        try:
            train_tf = build_transforms(exp.data.train.transforms, "segmentation", True, size=opts.crop_size,
                                        scale=tuple(opts.scale), object_crops=opts.object_crops)
        except ValueError as exc:
            raise ConfigError(f"data.train.transforms: {exc}") from exc
        train = self._dataset(exp.data.train, "data.train", train_tf, opts.classes)
        classes = [dict(c) for c in train.classes]
        val = None
        if exp.data.val is not None:
            try:
                val_tf = self._eval_transforms(exp.data.val.transforms, opts.eval_size)
            except ValueError as exc:
                raise ConfigError(f"data.val.transforms: {exc}") from exc
            val = _align(self._dataset(exp.data.val, "data.val", val_tf, opts.classes), classes, "data.val")
        return Datasets(train, val, classes)

    def build_eval_dataset(self, split: SplitConfig, loaded: Any) -> Dataset:
        if split.images is None or (split.annotations is None) == (split.masks is None):
            raise ConfigError("--images with either --annotations (COCO JSON) or --masks (PNG index masks) "
                              "are required to evaluate a segmentation model")
        transforms = self._eval_transforms(None, loaded.preprocess.get("size"))
        dataset = self._dataset(split, "--images", transforms, loaded.classes)
        return _align(dataset, loaded.classes, "--annotations" if split.annotations else "--masks")

    def collate(self, items: list[Any]) -> Any:
        return segmentation_collate(items)

    def move_batch(self, batch: Any, device: torch.device) -> tuple[Tensor, Tensor]:
        images, targets = batch
        sizes = {tuple(image.shape[-2:]) for image in images}
        if len(sizes) > 1:
            raise ValueError(f"images of one training batch differ in size {sorted(sizes)}: give data.train "
                             "a transforms list that crops or resizes to one size (the default does)")
        non_blocking = device.type == "cuda"
        return (torch.stack(images).to(device, non_blocking=non_blocking),
                torch.stack(targets).to(device, non_blocking=non_blocking))

    def sample_names(self, dataset: Any, indices: list[int]) -> list[str]:
        base = getattr(dataset, "dataset", dataset)
        if hasattr(base, "file_name_of"):
            return [base.file_name_of(base.ids[i]) for i in indices]
        if hasattr(base, "samples"):
            return [str(base.samples[i][0]) for i in indices]
        return [str(i) for i in indices]

    # ---- evaluation --------------------------------------------------------------------------------------

    def evaluate(self, model: nn.Module, loader: Any, device: torch.device,
                 classes: list[dict[str, Any]], preprocess: dict[str, Any] | None = None) -> dict[str, float]:
        """The metrics of the masks predict paints: at the checkpoint's pixel thresholds (``preprocess``;
        none while training: the argmax, which the thresholds are chosen after)."""
        preprocess = preprocess or {}
        thresholds = preprocess.get("class_thresholds") or float(preprocess.get("score_threshold", 0.0))
        metric = SegmentationMetric(len(classes) + 1, device=device)
        images_seen = torch.zeros((), dtype=torch.float64, device=device)
        for images, targets in loader:
            by_size: dict[tuple[int, int], list[int]] = defaultdict(list)
            for i, image in enumerate(images):
                by_size[tuple(image.shape[-2:])].append(i)
            for group in by_size.values():
                batch = torch.stack([images[i] for i in group]).to(device)
                logits, _ = model(batch)
                painted = paint(logits.float().softmax(1), thresholds) if thresholds else logits.argmax(1)
                metric.update(painted, torch.stack([targets[i] for i in group]).to(device))
            images_seen += len(images)
        metrics = _metric_summary(metric.compute(), classes, float(all_reduce_sum(images_seen)))
        if not thresholds:
            return metrics
        per_class = thresholds if isinstance(thresholds, list) else [thresholds] * len(classes)
        used = {f"threshold/{c['name']}": float(t) for c, t in zip(classes, per_class, strict=True)}
        return {**metrics, **used}

    def format_metrics(self, metrics: dict[str, float]) -> str:
        lines = [f"images: {int(metrics.get('images', 0))}"]
        labels = {"mIoU": "mIoU", "pixel_acc": "pixel accuracy", "mean_acc": "mean class accuracy",
                  "fwIoU": "frequency-weighted IoU"}
        lines += [f"{text}: {metrics[key]:.4f}" for key, text in labels.items() if key in metrics]
        per_class = [(k.split("/", 1)[1], v) for k, v in metrics.items() if k.startswith("IoU/")]
        if per_class:
            width = max(len(name) for name, _ in per_class)
            lines.append("per-class IoU:")
            lines += [f"  {name:<{width}}  {v:.4f}" for name, v in per_class]
        return "\n".join(lines)

    def preprocess(self, exp: Experiment) -> dict[str, Any]:
        # predict runs the model as evaluation does: longest side to ``size``, or each image as it is.
        return {"size": exp.data.options.eval_size}

    # ---- after training: the pixel threshold -------------------------------------------------------------

    def finish_training(self, exp: Experiment, run_dir: Path, device: torch.device,
                        log: Callable[[str], None] = print) -> dict[str, float]:
        """With a validation split, last.pt and best.pt get the pixel thresholds of best mIoU on it
        (:meth:`calibrate_pixel_thresholds`); returns best.pt's figures (else last.pt's), ``pixel/<name>``."""
        if exp.data.val is None:
            return {}
        done: list[tuple[Path, PixelCalibration]] = []
        for path in (run_dir / "last.pt", run_dir / "best.pt"):
            if not path.is_file():
                continue
            # best.pt written at the run's last evaluation holds last.pt's model: segmented once, not twice
            found = next((found for other, found in done if same_weights(other, path)), None)
            if found is None:
                found = self.calibrate_pixel_thresholds(path, exp.data.val, device, log,
                                                       workers=exp.data.workers)
            else:
                _record_calibration(path, found, exp.data.val, log)
            done.append((path, found))
        if not done:
            return {}
        return {f"pixel/{k}": float(v) for k, v in done[-1][1].as_dict().items() if k != "thresholds"}

    def calibrate_pixel_thresholds(self, path: Path, split: SplitConfig, device: str | torch.device,
                                  log: Callable[[str], None] = print, *, workers: int = 0
                                  ) -> PixelCalibration:
        """Write into the checkpoint ``path`` the per-class pixel thresholds of best mIoU on ``split``
        (images with masks or annotations): ``preprocess["class_thresholds"]``, which predict, the demo and
        evaluate use, and ``preprocess["score_calibration"]``, their figures. Returns the figures."""
        path = Path(path)
        loaded = model_from_checkpoint(self, read_checkpoint(path), path, device, ema=True)
        # one image at a time: each at its own size, as evaluation runs
        dataset = self.build_eval_dataset(split, loaded)
        loader = eval_loader(dataset, self.collate, batch_size=1, workers=workers)
        sweep = ThresholdSweep(len(loaded.classes) + 1)
        model = loaded.model.eval()
        with torch.inference_mode():
            for images, targets in loader:
                logits, _ = model(images[0][None].to(device))
                sweep.update(logits.float().softmax(1), targets[0][None])
        try:
            calibration = sweep.choose()
        except ValueError as exc:
            raise ConfigError(f"pixel thresholds of {path}: {split.images}: {exc}") from exc
        _record_calibration(path, calibration, split, log)
        return calibration


def _record_calibration(path: Path, calibration: PixelCalibration, split: SplitConfig,
                        log: Callable[[str], None]) -> None:
    """``calibration`` written into the checkpoint ``path`` (atomically) and said in one line."""
    ckpt = load_checkpoint(path)  # as stored (not migrated): only its preprocess entry changes
    ckpt["preprocess"] = {**ckpt.get("preprocess", {}), "class_thresholds": calibration.thresholds,
                          "score_calibration": {"rule": RULE, **calibration.as_dict(),
                                                "split": str(split.images)}}
    save_checkpoint(ckpt, path)
    c = calibration
    names = [k["name"] for k in ckpt.get("classes", [])] or [str(i) for i in range(1, len(c.thresholds) + 1)]
    each = ", ".join(f"{name} {t:.2f}" for name, t in zip(names, c.thresholds, strict=True))
    log(f"pixel thresholds: {path.name} paints a class where it is this sure or more: {each} (validation, "
        f"{c.images} images: mIoU {c.miou:.4f}, pixel accuracy {c.pixel_accuracy:.4f}; the argmax: "
        f"{c.miou_argmax:.4f}, {c.pixel_accuracy_argmax:.4f})")


def calibrate_checkpoint(path: str | Path, images: str | Path, *, masks: str | Path | None = None,
                         annotations: str | Path | None = None, device: str | torch.device = "cpu",
                         log: Callable[[str], None] = print) -> PixelCalibration:
    """A segmenter checkpoint already trained (``path``) given the pixel thresholds of best mIoU on
    ``images`` with their ``masks`` (PNG index masks) or ``annotations`` (COCO JSON), held out from its
    training: what ``finish_training`` does for a run's checkpoints, written into the file the same way.

        calibrate_checkpoint("weights/deeplabv3plus_real.pt", "runs/realset_seg/val/images",
                             masks="runs/realset_seg/val/masks")
    """
    task = str(read_checkpoint(Path(path)).get("task"))
    if task != SegmentationTask.name:
        raise ConfigError(f"{path}: a {task} checkpoint; pixel thresholds are a segmenter's")
    split = SplitConfig(images=str(images), masks=None if masks is None else str(masks),
                        annotations=None if annotations is None else str(annotations))
    return SegmentationTask().calibrate_pixel_thresholds(Path(path), split, device, log)
