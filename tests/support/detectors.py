"""Small random-weight detectors, built the way users' configs build them (DetectorConfig ->
build_detector), at sizes that take milliseconds: the one factory the detection tests share.

``tiny_detector(arch, **fields)``: every DetectorConfig field may be given; ``rpn``, ``roi`` and ``rcnn``
take the section's fields as a dict. Defaults are what makes it tiny (64-96 px inputs, 16 FPN channels, a
32-wide box head, 2 classes, no pretrained weights); everything else is DetectorConfig's own default, so
a test states what it relies on. The RPN and R-CNN sections are left at their defaults unless given:
an architecture without an RPN (or outside R-CNN) refuses a non-default section.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from detection.models import DetectorConfig, RoIConfig, RPNConfig, TwoStageDetector, build_detector
from detection.rcnn import RCNNConfig
from support.checkpoints import write_checkpoint

TINY: dict[str, Any] = {"num_classes": 2, "backbone_weights": None, "min_size": 64, "max_size": 96,
                        "fpn_channels": 16}
TINY_ROI: dict[str, Any] = {"representation_size": 32}


def tiny_detector_config(arch: str = "faster_rcnn_r18_fpn", *, rpn: dict[str, Any] | None = None,
                         roi: dict[str, Any] | None = None, rcnn: dict[str, Any] | None = None,
                         **fields: Any) -> DetectorConfig:
    sections: dict[str, Any] = {"roi": RoIConfig(**{**TINY_ROI, **(roi or {})})}
    if rpn is not None:
        sections["rpn"] = RPNConfig(**rpn)
    if rcnn is not None:
        sections["rcnn"] = RCNNConfig(**rcnn)
    return DetectorConfig(**{**TINY, "arch": arch, **fields}, **sections)


def tiny_detector(arch: str = "faster_rcnn_r18_fpn", *, seed: int | None = 0,
                  **config: Any) -> TwoStageDetector:
    """A detector in training mode (as build_detector returns it), its weights drawn after
    ``torch.manual_seed(seed)`` (``seed=None``: from the generator as it stands)."""
    if seed is not None:
        torch.manual_seed(seed)
    return build_detector(tiny_detector_config(arch, **config), load_pretrained=False)


def tiny_detector_checkpoint(path: Path) -> Path:
    """A tiny Faster R-CNN checkpoint (2 classes, few proposals) at ``path``."""
    cfg = tiny_detector_config("faster_rcnn_r18_fpn", frozen_bn=False, fpn_channels=256,
                               rpn={"pre_nms_top_n_test": 50, "post_nms_top_n_test": 20},
                               roi={"representation_size": 64})
    torch.manual_seed(0)
    return write_checkpoint(path, "detection", cfg, build_detector(cfg, load_pretrained=False), {})
