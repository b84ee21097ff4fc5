"""R-CNN's training stages after fine-tuning (section 2.3), each kept on disk so an interrupted run continues.

1. (before this module) fine-tune the CNN on warped regions: the engine's training loop on the detector's
   loss;
2. features: fc7 (and pool5 of the regions used for box regression) of every proposal and ground-truth box
   of every training image, one file per image under ``<stage_dir>/features/`` (a restart skips the files
   that exist);
3. SVMs: one per class with hard negative mining, ``<stage_dir>/svm_<label>.pt`` per class;
4. box regression: one ridge regressor per class, ``<stage_dir>/bbox.pt``.

``run_stages(detector, dataset, stage_dir, svm, bbox)`` runs 2-4 on a fine-tuned R-CNN (a TwoStageDetector
whose roi_heads are RCNNHeads: ``RCNNHeads.train_later_stages`` calls it) and loads the results into its
SVMPredictor. The SVMs (hard negative mining, ``train_svm_hard_negatives``) and the ridge box regressors
(``fit_box_regressor``) are pure functions on feature tensors, with their config sections.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision.ops import box_iou
from tqdm import tqdm

from detection.boxes import BoxCoder, box_iof
from vision.checkpoint import load_checkpoint, save_checkpoint

__all__ = ["SVMConfig", "BoxRegressionConfig", "run_stages", "extract_features", "train_svms",
           "fit_box_regressors", "class_overlaps", "feature_scale", "SVMResult", "train_svm_hard_negatives",
           "fit_box_regressor"]

Log = Callable[[str], None]


@dataclass
class SVMConfig:
    """One-vs-rest linear SVMs on cached features (R-CNN section 2.3 and its released code)."""

    C: float = 0.001  # liblinear's cost
    positive_weight: float = 2.0  # positives are few: their hinge loss counts twice
    negative_iou: float = 0.3  # negatives: proposals below this IoU with every object of the class
    hard_threshold: float = -1.0001  # a negative scoring above this (inside the margin) is "hard"
    easy_threshold: float = -1.2  # after retraining, cached negatives scoring below this are dropped
    retrain_every: int = 2000  # new hard negatives collected before the SVM is retrained
    epochs: int = 1  # passes of hard negative mining over the training images
    feature_norm: float = 20.0  # features are scaled so their mean L2 norm is this


@dataclass
class BoxRegressionConfig:
    """Class-specific ridge regression of box deltas (R-CNN appendix C)."""

    enabled: bool = True
    alpha: float = 1000.0  # ridge penalty (lambda in the paper)
    min_iou: float = 0.6  # proposals overlapping their object by at least this are training pairs
    features: Literal["pool", "fc7"] = "pool"  # the paper regresses from pool5


# ---- the later training stages: pure functions on feature tensors ------------------------------------------


def feature_scale(features: Tensor, target_norm: float) -> float:
    """The factor that makes the mean L2 norm of ``features`` [N, D] equal ``target_norm`` (R-CNN's code
    uses 20): SVM and ridge penalties then mean the same for any CNN."""
    mean_norm = float(features.norm(dim=1).mean()) if len(features) else 0.0
    return target_norm / mean_norm if mean_norm > 0 else 1.0


@dataclass
class SVMResult:
    """A trained one-vs-rest SVM: score = features @ weight + bias; ``negatives`` = (batch, row) pairs in the
    final hard-negative cache; ``history`` = one entry per retraining (cache size, added, evicted)."""

    weight: Tensor
    bias: float
    negatives: set[tuple[int, int]]
    history: list[dict[str, int]]


def train_svm_hard_negatives(positives: Tensor, negative_batches: Sequence[Tensor], cfg: SVMConfig
                             ) -> SVMResult:
    """Train a linear SVM with hard negative mining (Felzenszwalb et al.'s bootstrapping, as in R-CNN).

    Args:
        positives: [N_pos, D] features of the class's ground-truth boxes (already scaled).
        negative_batches: per image, [N_i, D] features of its negatives (IoU < ``cfg.negative_iou``).

    The SVM starts at zero, so every negative of the first images is hard; whenever ``retrain_every`` new
    hard negatives (score > ``hard_threshold``) have been cached the SVM is retrained (scikit-learn's
    LinearSVC: liblinear, L2-regularised hinge loss) and easy ones (score < ``easy_threshold``) are dropped.
    """
    from sklearn.svm import LinearSVC

    dim = positives.shape[1]
    weight, bias = torch.zeros(dim, dtype=torch.float64), 0.0
    cache: dict[tuple[int, int], Tensor] = {}
    history: list[dict[str, int]] = []
    added_since = 0
    if len(positives) == 0:  # a class never seen in training: never fires
        return SVMResult(weight.float(), -10.0, set(), history)

    def retrain(added: int) -> None:
        nonlocal weight, bias
        if not cache:
            return
        negatives = torch.stack(list(cache.values())).double()
        x = torch.cat([positives.double(), negatives]).numpy()
        y = np.r_[np.ones(len(positives)), -np.ones(len(negatives))]
        svm = LinearSVC(C=cfg.C, class_weight={1: cfg.positive_weight, -1: 1.0}, loss="hinge", dual=True,
                        intercept_scaling=10.0, max_iter=100_000, random_state=0)
        svm.fit(x, y)
        weight, bias = torch.from_numpy(svm.coef_[0].copy()), float(svm.intercept_[0])
        scores = negatives @ weight + bias
        easy = [key for key, s in zip(list(cache), scores.tolist(), strict=True) if s < cfg.easy_threshold]
        for key in easy:
            del cache[key]
        history.append({"cached": len(cache) + len(easy), "added": added, "evicted": len(easy)})

    for _ in range(cfg.epochs):
        for b, negatives in enumerate(negative_batches):
            if len(negatives) == 0:
                continue
            scores = negatives.double() @ weight + bias
            for row in torch.where(scores > cfg.hard_threshold)[0].tolist():
                if (b, row) not in cache:
                    cache[(b, row)] = negatives[row].double()
                    added_since += 1
            if added_since >= cfg.retrain_every:
                retrain(added_since)
                added_since = 0
    if added_since or not history:
        retrain(added_since)
    return SVMResult(weight.float(), bias, set(cache), history)


def fit_box_regressor(features: Tensor, targets: Tensor, alpha: float) -> tuple[Tensor, Tensor]:
    """Ridge regression of box deltas (R-CNN appendix C) with scikit-learn's Ridge.

    features [N, D] (scaled), targets [N, 4] deltas from ``BoxCoder((1, 1, 1, 1)).encode``. Targets are
    standardised before fitting, as the released code does, so one ``alpha`` suits all four coordinates; the
    result maps raw features to raw deltas: ``deltas = features @ weight.T + bias``, weight [4, D], bias [4].
    """
    from sklearn.linear_model import Ridge

    if len(features) == 0:
        return torch.zeros(4, features.shape[1]), torch.zeros(4)
    t = targets.double()
    mean = t.mean(dim=0)
    std = t.std(dim=0, unbiased=False).clamp(min=1e-6)
    ridge = Ridge(alpha=alpha).fit(features.double().numpy(), ((t - mean) / std).numpy())
    weight = torch.from_numpy(ridge.coef_) * std[:, None]
    bias = torch.from_numpy(np.asarray(ridge.intercept_)) * std + mean
    return weight.float(), bias.float()


# ---- the stages, on a detector ----------------------------------------------------------------------------


def class_overlaps(boxes: Tensor, gt_boxes: Tensor, gt_labels: Tensor, num_classes: int) -> Tensor:
    """[B, K]: each box's best IoU with the ground truths of each class (0 where a class is absent)."""
    out = torch.zeros(len(boxes), num_classes)
    if len(gt_boxes):
        iou = box_iou(boxes, gt_boxes)
        for c in gt_labels.unique().tolist():
            out[:, c - 1] = iou[:, gt_labels == c].max(dim=1).values
    return out


def _heads(detector: nn.Module) -> nn.Module:
    generation = getattr(detector, "generation", None)
    if generation is None or not generation.later_stages:
        raise TypeError(f"{generation or type(detector).__name__} has no training stages after the training "
                        "loop (R-CNN's SVMs and box regressors)")
    return detector.roi_heads


def _item(items: list[Any]) -> Any:
    return items[0]  # the DataLoader's batches of one, unwrapped (a module function: workers pickle it)


@torch.no_grad()
def extract_features(detector: nn.Module, dataset: Dataset, out_dir: Path, bbox: BoxRegressionConfig,
                     log: Log = print, *, workers: int = 0,
                     worker_init_fn: Callable[[int], None] | None = None) -> list[Path]:
    """Stage 2: one file per training image with, for its ground-truth boxes then its proposals:
    ``fc7`` [B, D] (float16), ``labels`` [B] (class of ground-truth rows, 0 for proposals), ``overlaps``
    [B, K], ``ignored`` [B] (proposals at least ``ignore_iof_thresh`` inside a crowd region: never an SVM
    negative); and for proposals overlapping an object by >= ``bbox.min_iou``: ``reg_features`` (pool5 or
    fc7), ``reg_targets`` [R, 4] deltas to that object and ``reg_labels`` [R].

    ``dataset`` items carry their proposals in ``target["proposals"]`` (image pixels), as fine-tuning read
    them (``detection.proposal_data.ProposalDataset``: a file by image id, or selective search through the
    same disk cache), decoded and looked up in ``workers`` DataLoader processes. Items without proposals get
    the detector's own proposal source, in this process."""
    heads = _heads(detector)
    num_classes = heads.predictor.num_classes
    device = next(detector.parameters()).device
    coder = BoxCoder((1.0, 1.0, 1.0, 1.0))
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{i:06d}.pt" for i in range(len(dataset))]  # type: ignore[arg-type]
    todo = [i for i, p in enumerate(paths) if not p.is_file()]
    if len(todo) < len(paths):
        log(f"rcnn features: {len(paths) - len(todo)} of {len(paths)} images already done, continuing")
    detector.eval()
    items = DataLoader(Subset(dataset, todo), batch_size=1, collate_fn=_item, num_workers=workers,
                       worker_init_fn=worker_init_fn if workers else None)
    for i, (image, target) in zip(todo, tqdm(items, desc="rcnn features", unit="img", dynamic_ncols=True),
                                  strict=True):
        given = [target["proposals"].to(device)] if "proposals" in target else None
        # ground truth, crowd regions and proposals into the detector's pixels alike
        boxes_in = {k: target[k].to(device) for k in ("boxes", "labels", "crowd_boxes") if k in target}
        batch, (scaled,), given = detector.transform([image.to(device)], [boxes_in], given)
        features = detector.backbone(batch.tensors)
        (proposals,), _ = detector.proposal_generator(batch, features, proposals=given)
        proposals = proposals.boxes
        gt_boxes, gt_labels = scaled["boxes"], scaled["labels"]
        boxes = torch.cat([gt_boxes, proposals])
        pool, fc7 = heads.region_features(features, [boxes], batch.image_sizes)
        overlaps = class_overlaps(boxes.cpu(), gt_boxes.cpu(), gt_labels.cpu(), num_classes)
        labels = torch.zeros(len(boxes), dtype=torch.int64)
        labels[: len(gt_boxes)] = gt_labels.cpu()
        ignored = torch.zeros(len(boxes), dtype=torch.bool)
        crowd = scaled.get("crowd_boxes")
        if crowd is not None and len(crowd) and len(proposals):
            iof = box_iof(proposals.cpu(), crowd.to(proposals).cpu()).max(dim=1).values
            ignored[len(gt_boxes):] = iof >= heads.ignore_iof_thresh
        record: dict[str, Any] = {"fc7": fc7.half().cpu(), "labels": labels, "overlaps": overlaps.half(),
                                  "ignored": ignored}
        reg = torch.zeros(0, dtype=torch.int64)
        reg_targets, reg_labels = torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64)
        if len(gt_boxes) and len(proposals):
            iou = box_iou(proposals, gt_boxes)
            best, matched = iou.max(dim=1)
            reg = torch.where(best >= bbox.min_iou)[0]
            reg_targets = coder.encode(gt_boxes[matched[reg]], proposals[reg]).cpu()
            reg_labels = gt_labels[matched[reg]].cpu()
            reg = reg.cpu() + len(gt_boxes)
        reg_feats = pool if bbox.features == "pool" else fc7
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


def train_svms(detector: nn.Module, paths: Sequence[Path], stage_dir: Path, svm: SVMConfig, log: Log = print
               ) -> None:
    """Stage 3: one SVM per class (positives: ground-truth boxes; negatives: IoU < ``svm.negative_iou``),
    saved per class so a restart skips the classes already trained; loads them into the detector."""
    predictor = _heads(detector).predictor
    scale_path = stage_dir / "svm_scale.pt"
    if scale_path.is_file():
        scale = float(load_checkpoint(scale_path)["scale"])
    else:
        sample = torch.cat([load_checkpoint(p)["fc7"].float() for p in paths[:50]])
        scale = feature_scale(sample, svm.feature_norm)
        save_checkpoint({"scale": scale}, scale_path)
    weights, biases = [], []
    for label in range(1, predictor.num_classes + 1):
        path = stage_dir / f"svm_{label}.pt"
        if not path.is_file():
            positives = []
            for p in paths:
                record = load_checkpoint(p)
                positives.append(record["fc7"][record["labels"] == label].float() * scale)
            negatives = _Negatives(paths, label, svm.negative_iou, scale)
            result = train_svm_hard_negatives(torch.cat(positives), negatives, svm)
            save_checkpoint({"weight": result.weight, "bias": result.bias, "history": result.history}, path)
            rounds = ", ".join(f"{h['cached']} cached/{h['added']} added/{h['evicted']} evicted"
                               for h in result.history)
            count = sum(len(x) for x in positives)
            log(f"rcnn svm class {label}: {count} positives; mining rounds: {rounds}")
        trained = load_checkpoint(path)
        weights.append(trained["weight"])
        biases.append(float(trained["bias"]))
    predictor.set_svms(torch.stack(weights), torch.tensor(biases), scale)


def fit_box_regressors(detector: nn.Module, paths: Sequence[Path], stage_dir: Path, svm: SVMConfig,
                       bbox: BoxRegressionConfig, log: Log = print) -> None:
    """Stage 4: ridge regression per class on the pairs stage 2 kept; loads the result into the detector."""
    predictor = _heads(detector).predictor
    path = stage_dir / "bbox.pt"
    if not path.is_file():
        records = [load_checkpoint(p) for p in paths]
        feats = torch.cat([r["reg_features"].float() for r in records])
        targets = torch.cat([r["reg_targets"] for r in records])
        labels = torch.cat([r["reg_labels"] for r in records])
        scale = feature_scale(feats, svm.feature_norm)
        weights, biases, counts = [], [], []
        for label in range(1, predictor.num_classes + 1):
            rows = labels == label
            w, b = fit_box_regressor(feats[rows] * scale, targets[rows], bbox.alpha)
            weights.append(w)
            biases.append(b)
            counts.append(int(rows.sum()))
        save_checkpoint({"weight": torch.stack(weights), "bias": torch.stack(biases), "scale": scale}, path)
        log(f"rcnn box regression: training pairs per class {counts}")
    fitted = load_checkpoint(path)
    predictor.set_box_regressors(fitted["weight"], fitted["bias"], float(fitted["scale"]))


def run_stages(detector: nn.Module, dataset: Dataset, stage_dir: Path, svm: SVMConfig,
               bbox: BoxRegressionConfig, log: Log = print, *, workers: int = 0,
               worker_init_fn: Callable[[int], None] | None = None) -> nn.Module:
    """Stages 2-4 on a fine-tuned R-CNN over ``dataset`` (items ``(image, target)``, no augmentation, with
    ``proposals`` in the targets; see :func:`extract_features`)."""
    paths = extract_features(detector, dataset, stage_dir / "features", bbox, log, workers=workers,
                             worker_init_fn=worker_init_fn)
    train_svms(detector, paths, stage_dir, svm, log)
    if bbox.enabled:
        fit_box_regressors(detector, paths, stage_dir, svm, bbox, log)
    return detector
