"""Import torchvision's Faster R-CNN checkpoints (``fasterrcnn_resnet50_fpn`` and ``_v2``) into visiondet.

torchvision's COCO models predict 91 outputs indexed by COCO category id: background, the 80 categories
and 10 ids COCO never used ("N/A"). Ours predict the 80 categories as contiguous labels 1..80 (COCO id
order) and keep the 10 unused logits as ``void_classes``, so the softmax, and hence every score, is the
same as torchvision's.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from detection.models import DetectorConfig, build_detector
from vision.checkpoint import FORMAT, VERSION, CheckpointError, is_visiondet_checkpoint, load_checkpoint

# COCO 2017 detection categories (id, name), in id order.
COCO_CATEGORIES: list[tuple[int, str]] = [
    (1, "person"), (2, "bicycle"), (3, "car"), (4, "motorcycle"), (5, "airplane"), (6, "bus"), (7, "train"),
    (8, "truck"), (9, "boat"), (10, "traffic light"), (11, "fire hydrant"), (13, "stop sign"),
    (14, "parking meter"), (15, "bench"), (16, "bird"), (17, "cat"), (18, "dog"), (19, "horse"),
    (20, "sheep"), (21, "cow"), (22, "elephant"), (23, "bear"), (24, "zebra"), (25, "giraffe"),
    (27, "backpack"), (28, "umbrella"), (31, "handbag"), (32, "tie"), (33, "suitcase"), (34, "frisbee"),
    (35, "skis"), (36, "snowboard"), (37, "sports ball"), (38, "kite"), (39, "baseball bat"),
    (40, "baseball glove"), (41, "skateboard"), (42, "surfboard"), (43, "tennis racket"), (44, "bottle"),
    (46, "wine glass"), (47, "cup"), (48, "fork"), (49, "knife"), (50, "spoon"), (51, "bowl"),
    (52, "banana"), (53, "apple"), (54, "sandwich"), (55, "orange"), (56, "broccoli"), (57, "carrot"),
    (58, "hot dog"), (59, "pizza"), (60, "donut"), (61, "cake"), (62, "chair"), (63, "couch"),
    (64, "potted plant"), (65, "bed"), (67, "dining table"), (70, "toilet"), (72, "tv"), (73, "laptop"),
    (74, "mouse"), (75, "remote"), (76, "keyboard"), (77, "cell phone"), (78, "microwave"), (79, "oven"),
    (80, "toaster"), (81, "sink"), (82, "refrigerator"), (84, "book"), (85, "clock"), (86, "vase"),
    (87, "scissors"), (88, "teddy bear"), (89, "hair drier"), (90, "toothbrush"),
]  # fmt: skip
COCO_CLASSES: list[dict[str, Any]] = [{"id": i, "name": n} for i, n in COCO_CATEGORIES]
TORCHVISION_NUM_OUTPUTS = 91  # background + category ids 1..90

# torchvision key pattern -> ours; applied in order, first match wins.
_KEY_RULES: list[tuple[str, str]] = [
    (r"^backbone\.fpn\.inner_blocks\.", "backbone.fpn.lateral."),
    (r"^backbone\.fpn\.layer_blocks\.", "backbone.fpn.output."),
    (r"^rpn\.head\.conv\.(\d+)\.0\.", r"proposal_generator.head.conv.\1."),
    (r"^rpn\.head\.", "proposal_generator.head."),
    (r"^roi_heads\.box_head\.fc", "roi_heads.box_head.fc"),
    (r"^roi_heads\.box_predictor\.", "roi_heads.box_predictor."),
    (r"^roi_heads\.box_head\.5\.", "roi_heads.box_head.fcs.0."),  # v2: 4 conv blocks, Flatten, Linear
    (r"^backbone\.body\.", "backbone.body."),
]
CONVERTIBLE = {
    "faster_rcnn_r50_fpn": "fasterrcnn_resnet50_fpn",
    "faster_rcnn_r50_fpn_v2": "fasterrcnn_resnet50_fpn_v2",
}


def _map_key(key: str) -> str | None:
    v2_conv = re.match(r"^roi_heads\.box_head\.(\d)\.([01])\.(.+)$", key)
    if v2_conv:  # v2 head block i = (conv, BN) -> our convs.{3i} (conv), convs.{3i+1} (BN)
        block, part, rest = v2_conv.groups()
        return f"roi_heads.box_head.convs.{3 * int(block) + int(part)}.{rest}"
    for pattern, replacement in _KEY_RULES:
        if re.match(pattern, key):
            return re.sub(pattern, replacement, key)
    return None


def torchvision_config(arch: str = "faster_rcnn_r50_fpn", **overrides: Any) -> DetectorConfig:
    """Our config for torchvision's COCO model ``arch`` (80 classes + 10 void, its default sizes)."""
    if arch not in CONVERTIBLE:
        raise ValueError(
            f"cannot import torchvision weights into {arch!r}; supported: {', '.join(CONVERTIBLE)}"
        )
    return DetectorConfig(arch=arch, num_classes=len(COCO_CATEGORIES), void_classes=10, **overrides)


def convert_torchvision_state_dict(
    state: dict[str, Tensor], arch: str = "faster_rcnn_r50_fpn"
) -> dict[str, Tensor]:
    """torchvision ``fasterrcnn_resnet50_fpn(_v2)`` state dict (91 COCO outputs) -> ours (see module doc).

    Raises ValueError naming the keys that fit nowhere or the class count that does not match.
    """
    out: dict[str, Tensor] = {}
    unknown = []
    for key, value in state.items():
        new = _map_key(key)
        if new is None:
            unknown.append(key)
        else:
            out[new] = value
    if unknown:
        raise ValueError(
            f"not a torchvision Faster R-CNN state dict for {arch}: unexpected keys {unknown[:5]}"
        )
    cls_key, box_key = "roi_heads.box_predictor.cls_score", "roi_heads.box_predictor.bbox_pred"
    if out[f"{cls_key}.weight"].shape[0] != TORCHVISION_NUM_OUTPUTS:
        raise ValueError(
            f"expected torchvision's 91 COCO outputs, got {out[f'{cls_key}.weight'].shape[0]} classes; "
            "only the COCO models are supported"
        )
    used = [0] + [i for i, _ in COCO_CATEGORIES]
    void = sorted(set(range(TORCHVISION_NUM_OUTPUTS)) - set(used))
    order = torch.tensor(used + void)
    box_rows = torch.tensor([4 * i + k for i in used for k in range(4)])
    for suffix in ("weight", "bias"):
        out[f"{cls_key}.{suffix}"] = out[f"{cls_key}.{suffix}"][order]
        out[f"{box_key}.{suffix}"] = out[f"{box_key}.{suffix}"][box_rows]
    return out


def load_torchvision_detector(path: str | os.PathLike, arch: str = "faster_rcnn_r50_fpn", **overrides: Any):
    """Our detector with the weights of torchvision checkpoint ``path`` (a state dict ``.pth``)."""
    state = load_checkpoint(path)
    if is_visiondet_checkpoint(state) or not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a torchvision state dict (a .pth of tensors)")
    if "model" in state and isinstance(
        state["model"], dict
    ):  # torchvision's training scripts save {"model": ...}
        state = state["model"]
    cfg = torchvision_config(arch, **overrides)
    model = build_detector(cfg, load_pretrained=False)
    try:
        model.load_state_dict(convert_torchvision_state_dict(state, arch))
    except (ValueError, RuntimeError, KeyError) as exc:
        raise CheckpointError(f"{path}: cannot import into {arch}: {exc}") from None
    return model, cfg


def convert_checkpoint(
    src: str | os.PathLike, dst: str | os.PathLike, arch: str = "faster_rcnn_r50_fpn"
) -> Path:
    """Write ``src`` (torchvision state dict) as a visiondet detection checkpoint at ``dst``."""
    from dataclasses import asdict

    from vision.checkpoint import save_checkpoint

    model, cfg = load_torchvision_detector(src, arch)
    checkpoint = {
        "format": FORMAT,
        "version": VERSION,
        "task": "detection",
        "model": asdict(cfg),
        "classes": COCO_CLASSES,
        "preprocess": {},
        "state_dict": model.state_dict(),
        "config": {"converted_from": f"torchvision {CONVERTIBLE[arch]}", "source_file": Path(src).name},
        "metrics": {},
    }
    return save_checkpoint(checkpoint, dst)
