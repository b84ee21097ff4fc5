"""Image classification: normalise, backbone, global average pooling, dropout, linear head.

Transfer learning in two phases: train a new head on a frozen pretrained trunk
(``freeze_backbone=True``), then ``unfreeze_backbone()`` and fine-tune everything with the trunk at a
lower learning rate (``param_groups(lr, backbone_lr_mult)``).

Shapes: N images, K classes, C channels of the trunk's last map.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vision.backbones import build_backbone
from vision.layers import Normalize
from vision.weights import LoadReport, load_weights

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "Classifier", "ClassifierConfig"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class ClassifierConfig:
    """Everything needed to rebuild a Classifier (saved in checkpoints under ``model``)."""

    backbone: str = "resnet18"  # any of vision.backbones.BACKBONE_NAMES
    num_classes: int = 1000
    pretrained: str | None = None  # trunk weights: a named source ("imagenet") or a path; None = random
    dropout: float = 0.0  # before the linear head
    freeze_backbone: bool = False  # train only the head (phase one of transfer learning)
    mean: tuple[float, float, float] = IMAGENET_MEAN  # input normalisation, RGB, for images in [0, 1]
    std: tuple[float, float, float] = IMAGENET_STD


class Classifier(nn.Module):
    """Backbone (last feature map: ResNet ``c5``, VGG ``pool5``) + global average pooling + dropout + linear.

    Args:
        cfg: the model config.
        load_pretrained: load ``cfg.pretrained`` into the trunk. Pass False when the weights will come
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
        if cfg.pretrained is not None and load_pretrained:
            self.load_backbone_weights(cfg.pretrained, weights_dir=weights_dir)
        self.feature_name = last
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(cfg.dropout)
        self.head = nn.Linear(self.backbone.feature_info[last].channels, cfg.num_classes)
        self.backbone_frozen = False
        if cfg.freeze_backbone:
            self.freeze_backbone()

    def load_backbone_weights(self, source_or_path: str | os.PathLike, *,
                              weights_dir: str | os.PathLike = "weights") -> LoadReport:
        """Load a torchvision ImageNet file (or a named source, or a checkpoint) into the trunk; the head
        is untouched."""
        return load_weights(self.backbone, source_or_path, arch=self.cfg.backbone, weights_dir=weights_dir)

    def freeze_backbone(self) -> None:
        """Stop training the trunk: no gradients, and its batch norms stay in eval mode."""
        self.backbone_frozen = True
        self.backbone.requires_grad_(False)
        self.backbone.train(False)

    def unfreeze_backbone(self) -> None:
        """Train the trunk again (phase two); pair with ``param_groups`` for a lower trunk learning rate."""
        self.backbone_frozen = False
        self.backbone.requires_grad_(True)
        self.backbone.train(self.training)

    def train(self, mode: bool = True) -> Classifier:
        super().train(mode)
        if self.backbone_frozen:
            # BN running statistics would drift towards the new data even with frozen weights.
            self.backbone.train(False)
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
