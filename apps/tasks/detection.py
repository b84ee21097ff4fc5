"""Object detection for the engine: COCO data, the R-CNN family's detectors, COCO box AP.

One task for the three generations (``model.arch``: faster_rcnn_*, fast_rcnn_*, rcnn_*). R-CNN trains in
stages: the engine's loop fine-tunes its CNN, then ``finish_training`` runs the model's later stages
(``RCNNHeads.train_later_stages``: features, SVMs, box regressors, each kept under
``<run>/rcnn/`` so an interrupted run continues) and writes ``<run>/final.pt``, the complete detector.

Data, per split: ``images`` (folder) + ``annotations`` (COCO instances JSON). Images keep their own sizes
(the detector resizes and pads inside), batches group images of similar aspect ratio, and images without
objects stay in both splits (negatives; on validation their false positives count).

Crowd annotations reach the model as ``crowd_boxes`` (ignore regions, moved with every resize, flip and
crop). Detectors with external proposals (Fast R-CNN, R-CNN) get them with the data: each sample's
proposals are found by image (a file by image id or file name; selective search on the stored pixels,
cached on disk) before augmentation and moved with its boxes (detection.proposal_data), in the DataLoader
workers.

Evaluation runs the model over the validation split one image per forward pass (as ``visiondet predict``,
so both find the same boxes), maps every box back to the annotation file's pixels, gathers every rank's
detections on rank 0 and scores them once there against that file (images skipped as unreadable are taken
out of the ground truth and counted): ``AP`` (AP@[.5:.95], the primary metric),
``AP50``, ``AP75``, ``APs/m/l``, ``AR1/10/100``, ``ARs/m/l`` and ``AP/<class>``, ``AP50/<class>``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from apps.engine.checkpointing import make_checkpoint
from apps.engine.distributed import broadcast_object, gather_object, is_main
from apps.engine.loader import eval_loader, parent_bound_init
from apps.experiment import Experiment, SplitConfig
from apps.predict.writers import PREDICTIONS, match_by_file_name
from apps.schema import ConfigError, from_dict
from apps.tasks.base import Datasets, Task
from apps.tasks.inference.detection import DetectionInference
from apps.tasks.loading import model_from_checkpoint, read_checkpoint
from detection.anchor_fit import resolve_auto_anchors
from detection.evaluation import (
    EvaluationError,
    detections_to_coco,
    evaluate_coco,
    format_table,
    load_ground_truth,
    load_results,
)
from detection.generation import generation_of
from detection.models import DetectorConfig, build_detector, check_sections, split_arch
from detection.proposal_data import EXTRA_BOXES, ProposalDataset
from detection.proposals import ProposalConfig, ProposalError, build_proposal_source
from detection.rcnn import RCNNConfig
from detection.score_threshold import LOWEST, RULE, ScoreCalibration, choose_score_threshold
from detection.structures import Detections, Thresholds
from vision.cache import cache_dir
from vision.checkpoint import load_checkpoint, same_weights, save_checkpoint
from vision.data.coco import CocoDetection
from vision.data.collate import detection_collate
from vision.data.samplers import AspectRatioGroupedBatchSampler
from vision.data.transforms import build_transforms

__all__ = ["DetectionOptions", "DetectionTask", "calibrate_checkpoint"]


@dataclass
class DetectionOptions:
    """``data.options`` of the detection task (the default pipelines; a split's explicit ``transforms``
    list replaces its default)."""

    size: int | None = None  # longest side after loading, before the detector's own resize; None: as is
    min_visibility: float = 0.1  # training crops: a box survives if this fraction of it stays visible
    drop_empty: bool = False  # leave training images without objects out (validation keeps them)


def _unwrap(dataset: Any) -> Any:
    while not hasattr(dataset, "file_name_of") and hasattr(dataset, "dataset"):
        dataset = dataset.dataset
    return dataset


class DetectionTask(Task):
    name = "detection"
    inference = DetectionInference
    model_config_type = DetectorConfig
    options_type = DetectionOptions
    primary_metric = "AP"
    split_keys = ("images", "annotations")

    # ---- model -------------------------------------------------------------------------------------------

    def check_config(self, exp: Experiment) -> None:
        """Also: a model section the arch ignores (e.g. an ``rpn:`` inherited by a fast_rcnn_* config) is an
        error before any work."""
        try:
            check_sections(exp.model)
        except ValueError as exc:
            raise ConfigError(f"model: {exc}") from exc
        super().check_config(exp)

    def model_config_for(self, model_cfg: DetectorConfig, classes: list[dict[str, Any]]) -> DetectorConfig:
        return replace(model_cfg, num_classes=len(classes))

    def fit_to_data(self, exp: Experiment, data: Datasets) -> tuple[Experiment, list[str]]:
        """``model.rpn.anchor_sizes`` / ``aspect_ratios`` "auto": fitted to the training boxes as the RPN
        sees them (detection/anchor_fit.py); the run's config and checkpoints keep the numbers. The boxes come
        from the training dataset's arrays (no second reading of the file); rank 0 fits, the other ranks
        receive its answer."""
        rpn = exp.model.rpn
        if rpn is None or "auto" not in (rpn.anchor_sizes, rpn.aspect_ratios):
            return exp, []
        outcome = _fit_anchors(exp, data) if is_main() else None
        model, line = broadcast_object(outcome)  # every rank the same model (or the same error)
        if model is None:
            raise ConfigError(line)
        return replace(exp, model=model), [line]

    def build_model(
        self, model_cfg: DetectorConfig, classes: list[dict[str, Any]], *, load_pretrained: bool = True
    ) -> nn.Module:
        try:
            return build_detector(self.model_config_for(model_cfg, classes), load_pretrained=load_pretrained)
        except ValueError as exc:  # unknown arch, inconsistent anchors, unreadable backbone weights
            raise ConfigError(f"model: {exc}") from exc

    def proposal_config(self, model_cfg: DetectorConfig) -> ProposalConfig | None:
        """Where the model's external proposals come from; None for a detector with an RPN."""
        if _external_proposals(model_cfg):
            if model_cfg.proposals is None:
                raise ConfigError(
                    f"model.proposals: {model_cfg.arch} trains on external proposals; set proposals.method "
                    "(selective_search, or file with proposals.file from `visiondet proposals`)"
                )
            return model_cfg.proposals
        return None

    # ---- data --------------------------------------------------------------------------------------------

    def _proposal_source(self, cfg: ProposalConfig) -> Any:
        if cfg.method == "selective_search" and not cfg.cache_dir:
            # selective search must run once per image, not once per epoch: always through a disk cache
            cfg = replace(cfg, cache_dir=str(cache_dir("proposals")))
        try:
            return build_proposal_source(cfg)
        except (ProposalError, ImportError, ValueError) as exc:
            raise ConfigError(f"model.proposals: {exc}") from exc

    def _with_proposals(self, split: SplitConfig, where: str, spec: list[dict[str, Any]] | None, train: bool,
                        opts: DetectionOptions, cfg: ProposalConfig, max_proposals: int | None,
                        *, drop_empty: bool = False, default: bool = True) -> Any:
        """The split's samples with their proposals attached before augmentation (ProposalDataset)."""
        transforms = (
            self._transforms(spec, train, opts, where, extra_boxes=EXTRA_BOXES)
            if spec is not None or default else None
        )
        stored = self._dataset(split, where, None, drop_empty=drop_empty)
        return ProposalDataset(stored, self._proposal_source(cfg), transforms, max_proposals=max_proposals)

    def _dataset(self, split: SplitConfig, where: str, transforms: Any, *, drop_empty: bool = False) -> Any:
        try:
            return CocoDetection(
                split.images, split.annotations, transforms=transforms, drop_empty=drop_empty
            )
        except (ValueError, OSError) as exc:  # AnnotationError, ImageError, missing files: name the split
            raise ConfigError(f"{where}: {exc}") from exc

    @staticmethod
    def _transforms(
        spec: list[dict[str, Any]] | None, train: bool, opts: DetectionOptions, where: str,
        extra_boxes: tuple[str, ...] = (),
    ) -> Any:
        try:
            return build_transforms(
                spec, "detection", train, extra_boxes=extra_boxes, size=opts.size,
                min_visibility=opts.min_visibility,
            )
        except ValueError as exc:
            raise ConfigError(f"{where}.transforms: {exc}") from exc

    def _max_proposals(self, model_cfg: Any) -> int | None:
        return model_cfg.roi.max_proposals

    def build_datasets(self, exp: Experiment) -> Datasets:
        opts: DetectionOptions = exp.data.options
        proposals = self.proposal_config(exp.model)
        if proposals is not None:
            limit = self._max_proposals(exp.model)
            train = self._with_proposals(exp.data.train, "data.train", exp.data.train.transforms, True, opts,
                                         proposals, limit, drop_empty=opts.drop_empty)
        else:
            train_tf = self._transforms(exp.data.train.transforms, True, opts, "data.train")
            train = self._dataset(exp.data.train, "data.train", train_tf, drop_empty=opts.drop_empty)
        classes = [dict(c) for c in train.classes]
        val = None
        if exp.data.val is not None:
            if proposals is not None:
                val = self._with_proposals(exp.data.val, "data.val", exp.data.val.transforms, False, opts,
                                           proposals, self._max_proposals(exp.model))
            else:
                val_tf = self._transforms(exp.data.val.transforms, False, opts, "data.val")
                val = self._dataset(exp.data.val, "data.val", val_tf)
            _check_classes(val.classes, classes, "data.val.annotations")
        return Datasets(train, val, classes)

    def build_eval_dataset(self, split: SplitConfig, loaded: Any) -> Dataset:
        if split.images is None or split.annotations is None:
            raise ConfigError("--images and --annotations (COCO JSON) are required to evaluate a detector")
        dataset = self._dataset(split, "--annotations", None)
        _check_classes(dataset.classes, loaded.classes, "--annotations")
        model_cfg = from_dict(self.model_config_type, loaded.checkpoint["model"], "model")
        proposals = self.proposal_config(model_cfg) if self._has_proposal_source(model_cfg) else None
        if proposals is None:
            return dataset

        # proposals computed in the loader's workers, from the stored images, as in training
        return ProposalDataset(dataset, self._proposal_source(proposals),
                               max_proposals=self._max_proposals(model_cfg))

    def _has_proposal_source(self, model_cfg: Any) -> bool:
        return _external_proposals(model_cfg) and model_cfg.proposals is not None

    def collate(self, items: list[Any]) -> Any:
        return detection_collate(items)

    def batch_sampler(self, dataset: Dataset, sampler: Any, batch_size: int, *, drop_last: bool) -> Any:
        base = _unwrap(dataset)
        if not hasattr(base, "aspect_ratios"):
            return super().batch_sampler(dataset, sampler, batch_size, drop_last=drop_last)
        return AspectRatioGroupedBatchSampler(sampler, base.aspect_ratios(), batch_size, drop_last)

    def move_batch(self, batch: Any, device: torch.device) -> tuple[list[Tensor], list[dict[str, Tensor]]]:
        images, targets = batch
        non_blocking = device.type == "cuda"
        images = [image.to(device, non_blocking=non_blocking) for image in images]
        # what the detectors read: ground truth, crowd (ignore) regions, and attached proposals
        keys = ("boxes", "labels", "crowd_boxes", "proposals")
        targets = [
            {k: t[k].to(device, non_blocking=non_blocking) for k in keys if k in t} for t in targets
        ]
        return images, targets

    def sample_names(self, dataset: Any, indices: list[int]) -> list[str]:
        base = _unwrap(dataset)
        if hasattr(base, "file_name_of"):
            return [base.file_name_of(base.ids[i]) for i in indices]
        return [str(i) for i in indices]

    # ---- evaluation --------------------------------------------------------------------------------------

    def evaluate(
        self, model: nn.Module, loader: Any, device: torch.device, classes: list[dict[str, Any]],
        preprocess: dict[str, Any] | None = None,
    ) -> dict[str, float]:
        """COCO box AP of ``model`` on the loader's dataset: every rank detects on its shard, rank 0 alone
        gathers the detections and scores them (one ground-truth load, one COCO evaluation), and every rank
        returns rank 0's metrics. Images left out as unreadable (``skip_unreadable``) are removed from the
        ground truth and counted as ``skipped_images``."""
        parts = gather_object(self.detect(model, loader, device))
        outcome = _score(parts, _unwrap(loader.dataset), classes) if parts is not None else None
        outcome = broadcast_object(outcome)  # the other ranks wait here for rank 0's metrics, or its error
        if isinstance(outcome, str):
            raise ConfigError(outcome)
        return outcome

    def detect(self, model: nn.Module, loader: Any, device: torch.device,
               thresholds: Thresholds | None = None) -> list[ImageDetections]:
        """This rank's detections, one image per forward pass as in ``visiondet predict`` (in a batch, an
        image's boxes would depend on its companions through the padding to a common size and batched
        kernels' rounding), in the pixels the annotation file describes; ``thresholds``: the model's
        post-processing cuts for these calls (None: its configured ones)."""
        found: list[ImageDetections] = []
        cuts = {} if thresholds is None else {"thresholds": thresholds}
        for images, targets in loader:
            for image, target in zip(images, targets, strict=True):
                # proposals attached by the data pipeline (Fast R-CNN, R-CNN)
                proposals = [target["proposals"].to(device)] if "proposals" in target else None
                det = model([image.to(device)], proposals=proposals, **cuts)[0][0]
                # boxes back to the pixels the annotation file describes (the eval pipeline may resize)
                orig_h, orig_w = (int(v) for v in target["orig_size"])
                scale = torch.tensor(
                    [orig_w / image.shape[-1], orig_h / image.shape[-2]] * 2, device=det.boxes.device
                )
                boxes = (det.boxes * scale).float().cpu().numpy()
                found.append(ImageDetections(int(target["image_id"]), boxes, det.scores.float().cpu().numpy(),
                                             det.labels.cpu().numpy()))
        return found

    def score_predictions(self, predictions: str, split: SplitConfig) -> dict[str, float]:
        if split.annotations is None:
            raise ConfigError("--annotations (COCO JSON) is required to score detection predictions")
        try:
            gt, results = load_ground_truth(split.annotations), load_results(predictions)
            # predict's folder pairs each image id with its file: where the ids are not the ground truth's
            # (predict run without the split's annotations.json), the same files are matched by name
            matched = match_by_file_name(results, Path(predictions).with_name(PREDICTIONS),
                                         gt.dataset.get("images", []))
            if matched is not None:
                results, line = matched
                print(f"visiondet evaluate: {line}", file=sys.stderr)
            return evaluate_coco(gt, results)
        except EvaluationError as exc:
            hint = ("" if Path(predictions).with_name(PREDICTIONS).is_file() else
                    f"; without the {PREDICTIONS} that `visiondet predict` writes beside its results, image "
                    f"ids cannot be matched by file name: predict again with --coco-ids {split.annotations}")
            raise ConfigError(f"--predictions: {predictions}: {exc}{hint}") from exc

    def format_metrics(self, metrics: dict[str, float]) -> str:
        table = format_table(metrics)
        skipped = int(metrics.get("skipped_images", 0))
        if skipped:  # scored without them: say so beside the numbers
            table += f"\n{skipped} unreadable images skipped and left out of the ground truth"
        return table

    # ---- after training ----------------------------------------------------------------------------------

    def finish_training(self, exp: Experiment, run_dir: Path, device: torch.device,
                        log: Callable[[str], None] = print) -> dict[str, float]:
        """With a validation split, each complete detector of the run (Fast/Faster R-CNN: last.pt and
        best.pt; R-CNN: final.pt) gets the score threshold calibrated on its own detections there
        (:meth:`calibrate_score_threshold`). R-CNN first trains its later stages on the fine-tuned CNN and
        writes ``<run_dir>/final.pt`` (:meth:`_rcnn_later_stages`). Returns R-CNN's final metrics and the
        calibration's figures (best.pt's, else last.pt's) as ``score/<name>``."""
        if generation_of(exp.model.arch).later_stages:  # (the arch was checked when the model was built)
            return self._rcnn_later_stages(exp, run_dir, device, log)
        if exp.data.val is None:
            return {}
        loader_settings = {"batch_size": exp.train.batch_size, "workers": exp.data.workers}
        metrics: dict[str, float] = {}
        done: list[tuple[Path, ScoreCalibration | None]] = []
        for path in (run_dir / "last.pt", run_dir / "best.pt"):
            if not path.is_file():
                continue
            # best.pt written at the run's last evaluation is last.pt's detector: detected once, not twice
            twin = next(((p, f) for p, f in done if same_weights(p, path)), None)
            if twin is None:
                found = self.calibrate_score_threshold(path, exp.data.val, device, log, **loader_settings)
            elif (found := twin[1]) is not None:
                _record_calibration(path, found, exp.data.val, log)
            done.append((path, found))
            if found is not None:
                metrics.update(_score_figures(found))
        return metrics

    def calibrate_score_threshold(self, path: Path, split: SplitConfig, device: str | torch.device,
                                  log: Callable[[str], None] = print, *, batch_size: int = 1, workers: int = 0
                                  ) -> ScoreCalibration | None:
        """Write into the checkpoint ``path`` the score threshold of best F1 on ``split`` (images +
        annotations; detection.score_threshold): ``preprocess["score_threshold"]``, which predict and the
        demo use when no threshold is given, and ``preprocess["score_calibration"]``, its figures. The model
        detects as predict does, with its own score cut lowered to the lowest candidate. Returns the
        figures, or None (the checkpoint unchanged) when no detection there is right at any threshold."""
        path = Path(path)
        loaded = model_from_checkpoint(self, read_checkpoint(path), path, device, ema=True)
        dataset = self.build_eval_dataset(split, loaded)
        loader = eval_loader(dataset, self.collate, batch_size=batch_size, workers=workers)
        found = self._detect_for_calibration(loaded.model.eval(), loader, torch.device(device))
        calibration = self._choose_threshold(path, split, dataset, found, loaded.classes, log)
        if calibration is not None:
            _record_calibration(path, calibration, split, log)
        return calibration

    def _detect_for_calibration(self, model: nn.Module, loader: Any, device: torch.device
                                ) -> list[ImageDetections]:
        """The detections predict would make, with the model's score cut lowered to the lowest candidate
        threshold."""
        lowered = replace(model.thresholds, score_thresh=min(model.thresholds.score_thresh, LOWEST))
        with torch.inference_mode():
            return self.detect(model, loader, device, lowered)

    def _choose_threshold(self, path: Path, split: SplitConfig, dataset: Any, found: list[ImageDetections],
                          classes: list[dict[str, Any]], log: Callable[[str], None]
                          ) -> ScoreCalibration | None:
        seen = {d.image_id for d in found}
        skipped = len(set(_unwrap(dataset).ids) - seen)  # unreadable images the loader left out
        try:
            calibration = choose_score_threshold(split.annotations, _coco_results(found, classes),
                                                 image_ids=seen if skipped else None)
        except EvaluationError as exc:
            raise ConfigError(f"score threshold of {path}: {exc}") from exc
        if calibration is None:
            log(f"score threshold: {path.name} keeps the default (no detection on {split.images} is right "
                "at any threshold)")
        return calibration

    def _rcnn_later_stages(self, exp: Experiment, run_dir: Path, device: torch.device,
                           log: Callable[[str], None]) -> dict[str, float]:
        """R-CNN: the later stages on the fine-tuned CNN, then ``<run_dir>/final.pt``; returns its metrics."""
        finetuned = run_dir / "best.pt" if (run_dir / "best.pt").is_file() else run_dir / "last.pt"
        loaded = model_from_checkpoint(self, read_checkpoint(finetuned), finetuned, device, ema=True)
        model = loaded.model
        log(f"rcnn: training SVMs and box regressors on the features of {finetuned}")
        # the stored training images with the proposals fine-tuning saw: the same lookup (a file by image id
        # or name) or the same selective-search disk cache, in the DataLoader workers, never augmented
        train = self._with_proposals(exp.data.train, "data.train", None, False, exp.data.options,
                                     self.proposal_config(exp.model), self._max_proposals(exp.model),
                                     default=False)
        stages = exp.model.rcnn or RCNNConfig()
        model.roi_heads.train_later_stages(model, train, run_dir / "rcnn", stages, log,
                                           workers=exp.data.workers, worker_init_fn=parent_bound_init())
        metrics: dict[str, float] = {}
        calibration = None
        final = run_dir / "final.pt"
        if exp.data.val is not None:
            # R-CNN's detections are its slowest part (selective search and a CNN pass per region): one pass
            # at the calibration's lowest cut serves both; the metrics keep what the model's own cut keeps
            val = self.build_eval_dataset(exp.data.val, loaded)
            loader = eval_loader(val, self.collate, batch_size=exp.train.batch_size, workers=exp.data.workers)
            found = self._detect_for_calibration(model.eval(), loader, device)
            outcome = _score([_above(found, model.thresholds.score_thresh)], _unwrap(val), loaded.classes)
            if isinstance(outcome, str):
                raise ConfigError(outcome)
            metrics = outcome
            log("rcnn final: " + "  ".join(f"{k} {v:.4f}" for k, v in metrics.items() if "/" not in k))
            calibration = self._choose_threshold(final, exp.data.val, val, found, loaded.classes, log)
        ckpt = make_checkpoint(exp=exp, model_cfg=self.model_config_for(exp.model, loaded.classes),
                               classes=loaded.classes, preprocess=self.preprocess(exp), model=model,
                               ema_state=None, metrics=metrics, train_state=None)
        save_checkpoint(ckpt, final)
        log(f"rcnn: the complete detector is {final}")
        if calibration is not None:
            _record_calibration(final, calibration, exp.data.val, log)
            metrics.update(_score_figures(calibration))
        return metrics


def _record_calibration(path: Path, calibration: ScoreCalibration, split: SplitConfig,
                        log: Callable[[str], None]) -> None:
    """``calibration`` written into the checkpoint ``path`` (atomically) and said in one line."""
    ckpt = load_checkpoint(path)  # as stored (not migrated): only its preprocess entry changes
    ckpt["preprocess"] = {**ckpt.get("preprocess", {}), "score_threshold": calibration.threshold,
                          "score_calibration": {"rule": RULE, **calibration.as_dict(),
                                                "split": str(split.images)}}
    save_checkpoint(ckpt, path)
    c = calibration
    log(f"score threshold: {path.name} keeps detections scoring {c.threshold:.3f} or more (validation, "
        f"{c.images} images, {c.boxes} boxes, at IoU 0.5: precision {c.precision:.3f}, recall "
        f"{c.recall:.3f}, F1 {c.f1:.3f}, the best F1)")


def calibrate_checkpoint(path: str | Path, images: str | Path, annotations: str | Path,
                         device: str | torch.device = "cpu", log: Callable[[str], None] = print
                         ) -> ScoreCalibration | None:
    """A detector checkpoint already trained (``path``) given the score threshold of best F1 on the images
    of ``images`` with their ``annotations`` (COCO JSON; held out from its training): what
    ``finish_training`` does for a run's checkpoints, written into the file (atomically) the same way.

        calibrate_checkpoint("weights/faster_rcnn_real.pt", "runs/realset_seg/val/images",
                             "runs/realset_seg/val/annotations.json")
    """
    task = str(read_checkpoint(Path(path)).get("task"))
    if task != DetectionTask.name:
        raise ConfigError(f"{path}: a {task} checkpoint; the score threshold is a detector's")
    return DetectionTask().calibrate_score_threshold(
        Path(path), SplitConfig(images=str(images), annotations=str(annotations)), device, log)


def _fit_anchors(exp: Experiment, data: Datasets) -> tuple[DetectorConfig | None, str]:
    """(the model config with fitted anchors, the log line), or (None, the error)."""
    base = _unwrap(data.train)
    if not hasattr(base, "instance_boxes"):
        return None, f"model.rpn: anchors 'auto' need a COCO training set, got {type(base).__name__}"
    boxes, image_hw = base.instance_boxes()
    try:
        model, report = resolve_auto_anchors(exp.model, boxes, image_hw)
    except ValueError as exc:
        return None, f"model.{exc} ({exp.data.train.annotations})"
    fmt = lambda recall: "/".join(f"{v:.3f}" for v in recall.values())  # noqa: E731
    return model, (f"anchors fitted to {report.num_boxes} training boxes: model.rpn.anchor_sizes="
                   f"{model.rpn.anchor_sizes} model.rpn.aspect_ratios={model.rpn.aspect_ratios}; best "
                   f"possible recall on the RPN's grid at IoU 0.5/0.7: {fmt(report.configured_grid)} before "
                   f"fitting, {fmt(report.fitted_grid)} fitted")


class ImageDetections(NamedTuple):
    """One image's detections as ranks send them to rank 0 (numpy: compact when pickled)."""

    image_id: int
    boxes: np.ndarray  # float32 [D, 4] xyxy, the annotation file's pixels
    scores: np.ndarray  # float32 [D]
    labels: np.ndarray  # int64 [D] in 1..K


def _coco_results(found: list[ImageDetections], classes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    as_torch = lambda d: Detections(*(torch.from_numpy(a) for a in (d.boxes, d.scores, d.labels)))  # noqa: E731
    return [r for d in found for r in detections_to_coco(d.image_id, as_torch(d), classes)]


def _above(found: list[ImageDetections], cut: float) -> list[ImageDetections]:
    """The detections a model whose score cut is ``cut`` makes (its post-processing keeps scores > cut)."""
    return [d._replace(boxes=d.boxes[keep], scores=d.scores[keep], labels=d.labels[keep])
            for d in found for keep in [d.scores > cut]]


def _score_figures(calibration: ScoreCalibration) -> dict[str, float]:
    return {f"score/{k}": float(v) for k, v in calibration.as_dict().items()}


def _score(parts: list[list[ImageDetections]], dataset: Any, classes: list[dict[str, Any]]
           ) -> dict[str, float] | str:
    """Rank 0: the metrics of every rank's detections, or the error message every rank raises."""
    found = [d for part in parts for d in part]
    seen = {d.image_id for d in found}
    skipped = len(set(dataset.ids) - seen)  # unreadable images the loader left out
    results = _coco_results(found, classes)
    try:
        metrics = evaluate_coco(dataset.annotations_path, results, classes=classes,
                                image_ids=seen if skipped else None)
    except EvaluationError as exc:
        return f"evaluation: {exc}"
    metrics["detections"] = float(len(results))
    if skipped:
        metrics["skipped_images"] = float(skipped)
    return metrics


def _external_proposals(model_cfg: DetectorConfig) -> bool:
    """Fast R-CNN and R-CNN classify proposals from outside the network."""
    try:
        return not split_arch(model_cfg.arch)[0].learned_proposals
    except ValueError as exc:  # an unknown arch
        raise ConfigError(f"model: {exc}") from exc


def _check_classes(found: list[dict[str, Any]], expected: list[dict[str, Any]], where: str) -> None:
    """Evaluation maps labels to category ids, so the category lists must be the same."""
    pairs = lambda cs: [(int(c["id"]), str(c["name"])) for c in cs]  # noqa: E731
    if pairs(found) != pairs(expected):
        raise ConfigError(
            f"{where}: categories {pairs(found)} differ from the model's {pairs(expected)} "
            "(detection evaluation needs the same category ids and names)"
        )
