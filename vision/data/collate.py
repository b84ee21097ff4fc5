"""Batch collation. Classification and segmentation items have one size per batch and use torch's default
collate (stacked tensors); detection images keep their own sizes, so a batch stays a list."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["detection_collate"]


def detection_collate(
    batch: Sequence[tuple[torch.Tensor, dict[str, Any]]],
) -> tuple[list[torch.Tensor], list[dict[str, Any]]]:
    """``[(image [3, H_i, W_i], target), ...]`` -> ``([images...], [targets...])``; nothing is copied."""
    images = [image for image, _ in batch]
    targets = [target for _, target in batch]
    return images, targets
