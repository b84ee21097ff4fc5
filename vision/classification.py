"""Image classification: normalise, backbone, global average pooling, dropout, linear head.

Transfer learning in two phases: train a new head on a frozen pretrained trunk (``freeze_at=5``: all five
stages), then ``unfreeze_backbone()`` and fine-tune everything with the trunk at a lower learning rate
(``param_groups(lr, backbone_lr_mult)``). ``freeze_at`` counts stages from the input as everywhere in
visiondet (vision/backbones.py): ResNet [stem, res2..res5], VGG blocks 1..5.

Shapes: N images, K classes, C channels of the trunk's last map.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vision.backbones import build_backbone
from vision.export import GraphSpec, compare_dense, sample_images
from vision.layers import IMAGENET_MEAN, IMAGENET_STD, Normalize
from vision.weights import LoadReport, load_weights

__all__ = ["Classifier", "ClassifierConfig", "ClassifierGraph", "classifier_spec"]


@dataclass
class ClassifierConfig:
    """Everything needed to rebuild a Classifier (saved in checkpoints under ``model``)."""

    backbone: str = "resnet18"  # any of vision.backbones.BACKBONE_NAMES
    num_classes: int = 1000
    backbone_weights: str | None = None  # trunk weights: a named source ("imagenet") or a path; None = random
    dropout: float = 0.0  # before the linear head
    freeze_at: int = 0  # trunk stages frozen from the input; 5 trains only the head (transfer learning)
    mean: tuple[float, float, float] = IMAGENET_MEAN  # input normalisation, RGB, for images in [0, 1]
    std: tuple[float, float, float] = IMAGENET_STD


class Classifier(nn.Module):
    """Backbone (last feature map: ResNet ``c5``, VGG ``pool5``) + global average pooling + dropout + linear.

    Args:
        cfg: the model config.
        load_pretrained: load ``cfg.backbone_weights`` into the trunk. Pass False when the weights will come
            from a checkpoint anyway (rebuilding a trained model must not download anything).
        weights_dir: where named weight sources are looked up and downloaded.
    """

    def __init__(self, cfg: ClassifierConfig, *, load_pretrained: bool = True,
                 weights_dir: str | os.PathLike = "weights") -> None:
        super().__init__()
        if cfg.num_classes < 1:
            raise ValueError(f"ClassifierConfig.num_classes must be at least 1, got {cfg.num_classes}")
        if not 0.0 <= cfg.dropout < 1.0:
            raise ValueError(f"ClassifierConfig.dropout must be in [0, 1), got {cfg.dropout}")
        self.cfg = cfg
        last = "pool5" if cfg.backbone.startswith("vgg") else "c5"
        self.normalize = Normalize(cfg.mean, cfg.std)
        self.backbone = build_backbone(cfg.backbone, out_features=[last])
        if cfg.backbone_weights is not None and load_pretrained:
            self.load_backbone_weights(cfg.backbone_weights, weights_dir=weights_dir)
        self.feature_name = last
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(cfg.dropout)
        self.head = nn.Linear(self.backbone.feature_info[last].channels, cfg.num_classes)
        self.frozen: list[nn.Module] = []  # trunk modules kept frozen (and in eval mode) until unfrozen
        if cfg.freeze_at:
            self.freeze_backbone(cfg.freeze_at)

    def load_backbone_weights(self, source_or_path: str | os.PathLike, *,
                              weights_dir: str | os.PathLike = "weights") -> LoadReport:
        """Load a torchvision ImageNet file (or a named source, or a checkpoint) into the trunk; the head
        is untouched."""
        return load_weights(self.backbone, source_or_path, arch=self.cfg.backbone, weights_dir=weights_dir)

    def freeze_backbone(self, freeze_at: int | None = None) -> None:
        """Stop training the first ``freeze_at`` trunk stages (None: all of them): no gradients, and their
        batch norms stay in eval mode. Reversible (unlike ``Backbone.freeze``, which folds batch norms)."""
        stages = self.backbone.stages()
        freeze_at = len(stages) if freeze_at is None else freeze_at
        if not 0 <= freeze_at <= len(stages):
            raise ValueError(f"ClassifierConfig.freeze_at must be in 0..{len(stages)} (the stages of the "
                             f"{self.cfg.backbone} trunk), got {freeze_at}")
        self.frozen = [getattr(parent, name) for stage in stages[:freeze_at] for parent, name in stage]
        if freeze_at == len(stages):
            self.frozen = [self.backbone]
        for module in self.frozen:
            module.requires_grad_(False)
        self.train(self.training)

    def unfreeze_backbone(self) -> None:
        """Train the trunk again (phase two); pair with ``param_groups`` for a lower trunk learning rate."""
        for module in self.frozen:
            module.requires_grad_(True)
        self.frozen = []
        self.backbone.train(self.training)

    def train(self, mode: bool = True) -> Classifier:
        super().train(mode)
        for module in self.frozen:
            # BN running statistics would drift towards the new data even with frozen weights.
            module.train(False)
        return self

    def param_groups(self, lr: float, backbone_lr_mult: float = 0.1) -> list[dict]:
        """Optimizer groups: the head at ``lr``, the trunk at ``lr * backbone_lr_mult``.

        The trunk's parameters are listed even while frozen: they get no gradients, so the optimizer
        skips them, and after ``unfreeze_backbone()`` the same optimizer starts updating them.
        """
        return [
            {"params": list(self.head.parameters()), "lr": lr, "name": "head"},
            {"params": list(self.backbone.parameters()), "lr": lr * backbone_lr_mult, "name": "backbone"},
        ]

    def forward(self, images: Tensor, targets: Tensor | None = None
                ) -> tuple[Tensor | None, dict[str, Tensor]]:
        """images: [N, 3, H, W] float RGB in [0, 1]; targets: [N] int64 class indices in 0..K-1.

        Returns (logits [N, K], or None while training; {"loss_cls": cross-entropy} if targets else {}).
        """
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"Classifier expects images [N, 3, H, W], got {tuple(images.shape)}")
        features = self.backbone(self.normalize(images))[self.feature_name]
        logits = self.head(self.dropout(torch.flatten(self.pool(features), 1)))
        losses: dict[str, Tensor] = {}
        if targets is not None:
            if targets.shape != (images.shape[0],):
                raise ValueError(f"Classifier expects targets [N] = [{images.shape[0]}], "
                                 f"got {tuple(targets.shape)}")
            losses["loss_cls"] = F.cross_entropy(logits, targets)
        return (None if self.training else logits), losses


# ---- export (vision/export.py traces and checks what these describe) -------------------------------------


class ClassifierGraph(nn.Module):
    """images [N, 3, H, W] in [0, 1] (the preprocessing resizes and centre-crops to the metadata's size; the
    network's global pooling takes any size from 32 px) -> logits [N, K]."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model.eval()

    def forward(self, images: Tensor) -> Tensor:
        return self.model(images)[0]


def classifier_spec(model: nn.Module, size: int, metadata: dict[str, Any]) -> GraphSpec:
    """Classification: dynamic batch and image size; logits compared at three sizes (the preprocessing's
    ``size`` square, a portrait and a landscape one), one of them a batch of three."""
    sizes = [(size, size), (max(32, size * 3 // 4), size), (size + 32, max(32, size * 5 // 4))]
    first, second, third = (sample_images([hw] * 3, seed=1 + i) for i, hw in enumerate(sizes))
    return GraphSpec(
        ClassifierGraph(model), ["images"], ["logits"],
        {"images": {0: "batch", 2: "height", 3: "width"}, "logits": {0: "batch"}},
        [(first[0][None],), (torch.stack(second),), (third[0][None],)], compare_dense(atol=1e-3, rtol=1e-3),
        metadata,
    )
