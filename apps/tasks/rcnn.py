"""The "rcnn" task: R-CNN's multi-stage training from one ``visiondet train configs/detection/rcnn_*.yaml``.

Stages (R-CNN section 2.3), each kept on disk so an interrupted run continues where it stopped:

1. fine-tune the CNN on warped regions: the engine's one training loop on ``RCNN.forward``'s loss
   (``best.pt`` / ``last.pt``, resumable like any run);
2. features: fc7 (and pool5 of the regions used for box regression) of every proposal and ground-truth box
   of every training image, one file per image under ``<run>/rcnn/features/`` (a restart skips the files
   that exist);
3. SVMs: one per class with hard negative mining, ``<run>/rcnn/svm_<label>.pt`` per class;
4. box regression: one ridge regressor per class, ``<run>/rcnn/bbox.pt``;
5. ``<run>/final.pt``: the complete detector (a visiondet checkpoint for evaluate / predict / the demo),
   scored on the validation split.

Stages 2-5 run in ``RCNNTask.finish_training``, which the engine calls after stage 1 (``Task``'s hook);
``run_stages`` runs them on any fine-tuned R-CNN.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.ops import box_iou
from tqdm import tqdm

from apps.tasks.detection import DetectionTask
from detection.boxes import BoxCoder, box_iof
from detection.rcnn import (
    RCNN,
    RCNNConfig,
    build_rcnn,
    feature_scale,
    fit_box_regressor,
    train_svm_hard_negatives,
)
from vision.checkpoint import load_checkpoint, save_checkpoint

__all__ = ["RCNNTask", "run_stages", "extract_features", "train_svms", "fit_box_regressors"]

Log = Callable[[str], None]


def class_overlaps(boxes: Tensor, gt_boxes: Tensor, gt_labels: Tensor, num_classes: int) -> Tensor:
    """[B, K]: each box's best IoU with the ground truths of each class (0 where a class is absent)."""
    out = torch.zeros(len(boxes), num_classes)
    if len(gt_boxes):
        iou = box_iou(boxes, gt_boxes)
        for c in gt_labels.unique().tolist():
            out[:, c - 1] = iou[:, gt_labels == c].max(dim=1).values
    return out


@torch.no_grad()
def extract_features(model: RCNN, dataset: Dataset, out_dir: Path, device: torch.device, log: Log = print
                     ) -> list[Path]:
    """Stage 2: one file per training image with, for its ground-truth boxes then its proposals:
    ``fc7`` [B, D] (float16), ``labels`` [B] (class of ground-truth rows, 0 for proposals), ``overlaps``
    [B, K], ``ignored`` [B] (proposals at least ``ignore_iof_thresh`` inside a crowd region: never an SVM
    negative); and for proposals overlapping an object by >= ``bbox.min_iou``: ``reg_pool`` / ``reg_fc7``
    features, ``reg_targets`` [R, 4] deltas to that object and ``reg_labels`` [R]."""
    cfg = model.cfg
    coder = BoxCoder((1.0, 1.0, 1.0, 1.0))
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{i:06d}.pt" for i in range(len(dataset))]
    todo = [i for i, p in enumerate(paths) if not p.is_file()]
    if len(todo) < len(paths):
        log(f"rcnn features: {len(paths) - len(todo)} of {len(paths)} images already done, continuing")
    model.eval()
    for i in tqdm(todo, desc="rcnn features", unit="img", dynamic_ncols=True):
        image, target = dataset[i]
        image = image.to(device)
        gt_boxes, gt_labels = target["boxes"].to(device), target["labels"].to(device)
        proposals = model.propose(image)
        boxes = torch.cat([gt_boxes, proposals])
        pool, fc7 = model.features(image, boxes)
        overlaps = class_overlaps(boxes.cpu(), gt_boxes.cpu(), gt_labels.cpu(), cfg.num_classes)
        labels = torch.zeros(len(boxes), dtype=torch.int64)
        labels[: len(gt_boxes)] = gt_labels.cpu()
        ignored = torch.zeros(len(boxes), dtype=torch.bool)
        crowd = target.get("crowd_boxes")
        if crowd is not None and len(crowd) and len(proposals):
            iof = box_iof(proposals.cpu(), crowd.to(proposals).cpu()).max(dim=1).values
            ignored[len(gt_boxes):] = iof >= cfg.ignore_iof_thresh
        record: dict[str, Any] = {"fc7": fc7.half().cpu(), "labels": labels, "overlaps": overlaps.half(),
                                  "ignored": ignored}
        reg = torch.zeros(0, dtype=torch.int64)
        reg_targets, reg_labels = torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64)
        if len(gt_boxes) and len(proposals):
            iou = box_iou(proposals, gt_boxes)
            best, matched = iou.max(dim=1)
            reg = torch.where(best >= cfg.bbox.min_iou)[0]
            reg_targets = coder.encode(gt_boxes[matched[reg]], proposals[reg]).cpu()
            reg_labels = gt_labels[matched[reg]].cpu()
            reg = reg.cpu() + len(gt_boxes)
        reg_feats = pool if cfg.bbox.features == "pool" else fc7
        record.update(reg_features=reg_feats.cpu()[reg].half(), reg_targets=reg_targets,
                      reg_labels=reg_labels)
        save_checkpoint(record, paths[i])
    return paths


class _Negatives(Sequence):
    """Per image, the scaled fc7 features of the boxes that overlap every object of ``label`` by less than
    ``max_iou`` and do not lie in a crowd region; read from the feature files on demand so the whole set
    never sits in memory."""

    def __init__(self, paths: Sequence[Path], label: int, max_iou: float, scale: float) -> None:
        self.paths, self.label, self.max_iou, self.scale = list(paths), label, max_iou, scale

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> Tensor:  # type: ignore[override]
        record = load_checkpoint(self.paths[i])
        rows = record["overlaps"][:, self.label - 1].float() < self.max_iou
        if "ignored" in record:  # feature files of older runs have no crowd flags
            rows &= ~record["ignored"]
        return record["fc7"][rows].float() * self.scale


def train_svms(model: RCNN, paths: Sequence[Path], stage_dir: Path, log: Log = print) -> None:
    """Stage 3: one SVM per class (positives: ground-truth boxes; negatives: IoU < ``svm.negative_iou``),
    saved per class so a restart skips the classes already trained; loads them into ``model``."""
    cfg = model.cfg.svm
    scale_path = stage_dir / "svm_scale.pt"
    if scale_path.is_file():
        scale = float(load_checkpoint(scale_path)["scale"])
    else:
        sample = torch.cat([load_checkpoint(p)["fc7"].float() for p in paths[:50]])
        scale = feature_scale(sample, cfg.feature_norm)
        save_checkpoint({"scale": scale}, scale_path)
    for label in range(1, model.cfg.num_classes + 1):
        path = stage_dir / f"svm_{label}.pt"
        if not path.is_file():
            positives = []
            for p in paths:
                record = load_checkpoint(p)
                positives.append(record["fc7"][record["labels"] == label].float() * scale)
            result = train_svm_hard_negatives(torch.cat(positives), _Negatives(paths, label, cfg.negative_iou,
                                                                                scale), cfg)
            save_checkpoint({"weight": result.weight, "bias": result.bias, "history": result.history}, path)
            rounds = ", ".join(f"{h['cached']} cached/{h['added']} added/{h['evicted']} evicted"
                               for h in result.history)
            count = sum(len(x) for x in positives)
            log(f"rcnn svm class {label}: {count} positives; mining rounds: {rounds}")
        svm = load_checkpoint(path)
        model.svm_weight[label - 1] = svm["weight"].to(model.svm_weight)
        model.svm_bias[label - 1] = float(svm["bias"])
    model.svm_scale.fill_(scale)
    model.svm_trained.fill_(True)


def fit_box_regressors(model: RCNN, paths: Sequence[Path], stage_dir: Path, log: Log = print) -> None:
    """Stage 4: ridge regression per class on the pairs stage 2 kept; loads the result into ``model``."""
    path = stage_dir / "bbox.pt"
    if not path.is_file():
        records = [load_checkpoint(p) for p in paths]
        feats = torch.cat([r["reg_features"].float() for r in records])
        targets = torch.cat([r["reg_targets"] for r in records])
        labels = torch.cat([r["reg_labels"] for r in records])
        scale = feature_scale(feats, model.cfg.svm.feature_norm)
        weights, biases, counts = [], [], []
        for label in range(1, model.cfg.num_classes + 1):
            rows = labels == label
            w, b = fit_box_regressor(feats[rows] * scale, targets[rows], model.cfg.bbox.alpha)
            weights.append(w)
            biases.append(b)
            counts.append(int(rows.sum()))
        save_checkpoint({"weight": torch.stack(weights), "bias": torch.stack(biases), "scale": scale}, path)
        log(f"rcnn box regression: training pairs per class {counts}")
    fitted = load_checkpoint(path)
    model.bbox_weight.copy_(fitted["weight"])
    model.bbox_bias.copy_(fitted["bias"])
    model.bbox_scale.fill_(float(fitted["scale"]))
    model.bbox_trained.fill_(True)


def run_stages(model: RCNN, dataset: Dataset, stage_dir: Path, device: torch.device, log: Log = print
               ) -> RCNN:
    """Stages 2-4 on a fine-tuned ``model`` over ``dataset`` (items ``(image, target)``, no augmentation)."""
    paths = extract_features(model, dataset, stage_dir / "features", device, log)
    train_svms(model, paths, stage_dir, log)
    if model.cfg.bbox.enabled:
        fit_box_regressors(model, paths, stage_dir, log)
    return model


class RCNNTask(DetectionTask):
    """Detection data and COCO evaluation as for every detector; the model is an R-CNN."""

    name = "rcnn"
    model_config_type = RCNNConfig

    def model_config_for(self, model_cfg: RCNNConfig, classes: list[dict[str, Any]]) -> RCNNConfig:
        return dataclasses.replace(model_cfg, num_classes=len(classes))

    def fit_to_data(self, exp: Any, data: Any) -> tuple[Any, list[str]]:
        return exp, []  # no anchors to fit: R-CNN's regions come from its proposals

    def proposal_config(self, model_cfg: RCNNConfig) -> Any:
        return model_cfg.proposals  # R-CNN always classifies external proposals

    def _has_proposal_source(self, model_cfg: RCNNConfig) -> bool:
        return True

    def _max_proposals(self, model_cfg: RCNNConfig) -> int | None:
        return None  # the source's own max_boxes

    def build_model(self, model_cfg: RCNNConfig, classes: list[dict[str, Any]], *,
                    load_pretrained: bool = True) -> RCNN:
        return build_rcnn(self.model_config_for(model_cfg, classes), load_pretrained=load_pretrained)

    def finish_training(self, exp: Any, run_dir: Path, device: torch.device, log: Log = print
                        ) -> dict[str, float]:
        """Stages 2-5 after the engine's fine-tuning: writes ``<run_dir>/final.pt``; returns its metrics."""
        from apps.engine.checkpointing import make_checkpoint
        from apps.engine.loader import eval_loader
        from apps.tasks import load_model
        from vision.data.coco import CocoDetection

        finetuned = run_dir / "best.pt" if (run_dir / "best.pt").is_file() else run_dir / "last.pt"
        loaded = load_model(finetuned, device, ema=True)
        model: RCNN = loaded.model
        log(f"rcnn: training SVMs and box regressors on the features of {finetuned}")
        train = CocoDetection(exp.data.train.images, exp.data.train.annotations,
                              num_classes=len(loaded.classes))
        run_stages(model, train, run_dir / "rcnn", device, log)
        metrics: dict[str, float] = {}
        if exp.data.val is not None:
            val = self.build_eval_dataset(exp.data.val, loaded)
            loader = eval_loader(val, self.collate, batch_size=exp.train.batch_size, workers=exp.data.workers)
            model.eval()
            with torch.inference_mode():
                metrics = self.evaluate(model, loader, device, loaded.classes)
            log("rcnn final: " + "  ".join(f"{k} {v:.4f}" for k, v in metrics.items() if "/" not in k))
        ckpt = make_checkpoint(exp=exp, model_cfg=model.cfg, classes=loaded.classes,
                               preprocess=self.preprocess(exp), model=model, ema_state=None, metrics=metrics,
                               train_state=None)
        save_checkpoint(ckpt, run_dir / "final.pt")
        log(f"rcnn: the complete detector is {run_dir / 'final.pt'}")
        return metrics
