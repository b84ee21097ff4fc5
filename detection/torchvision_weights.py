"""Import torchvision's Faster R-CNN checkpoints (``fasterrcnn_resnet50_fpn`` and ``_v2``) into visiondet.

torchvision's COCO models predict 91 outputs indexed by COCO category id: background, the 80 categories
and 10 ids COCO never used ("N/A"). Ours predict the 80 categories as contiguous labels 1..80 (COCO id
order) and keep the 10 unused logits as ``void_classes``, so the softmax, and hence every score, is the
same as torchvision's.
"""

from __future__ import annotations

import os
import re
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from detection.models import DetectorConfig, build_detector
from vision.cache import cache_dir
from vision.checkpoint import (
    FORMAT,
    VERSION,
    CheckpointError,
    is_visiondet_checkpoint,
    load_checkpoint,
    save_checkpoint,
)

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
COCO_TRAINED_ON = "COCO 2017 (real photographs; torchvision's published weights)"
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
        "trained_on": COCO_TRAINED_ON,
        "metrics": {},
    }
    return save_checkpoint(checkpoint, dst)


# ---- torchvision's published COCO files, found where torch.hub keeps them --------------------------------

# File name (as torch.hub saves it) -> (our architecture, what the demo's picker calls it).
TORCHVISION_COCO_FILES: dict[str, tuple[str, str]] = {
    "fasterrcnn_resnet50_fpn_coco-258fb6c6.pth": (
        "faster_rcnn_r50_fpn", "Faster R-CNN R50-FPN, COCO, 80 classes"),
    "fasterrcnn_resnet50_fpn_v2_coco-dd69338a.pth": (
        "faster_rcnn_r50_fpn_v2", "Faster R-CNN R50-FPN v2, COCO, 80 classes"),
}


def hub_checkpoint_dir() -> Path:
    """Where torch.hub keeps weights: ``$TORCH_HOME/hub/checkpoints`` (default ``~/.cache/torch``)."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def find_torchvision_coco(folders: Sequence[str | os.PathLike] = ()) -> list[Path]:
    """torchvision COCO detector files present in ``folders`` or torch's hub cache (nothing is downloaded)."""
    found: dict[str, Path] = {}
    for folder in [*map(Path, folders), hub_checkpoint_dir()]:
        for name in TORCHVISION_COCO_FILES:
            if name not in found and (folder / name).is_file():
                found[name] = folder / name
    return [found[name] for name in TORCHVISION_COCO_FILES if name in found]


def torchvision_coco_title(path: str | os.PathLike) -> str | None:
    """The picker's name for a torchvision COCO file, or None for any other file."""
    entry = TORCHVISION_COCO_FILES.get(Path(path).name)
    return entry[1] if entry else None


def conversion_fallback_dir() -> Path:
    """Where conversions go when torch's hub folder cannot be written (a read-only ``$TORCH_HOME``, e.g. a
    shared or mounted model store): the cache's ``torchvision/`` folder (vision/cache.py)."""
    return cache_dir("torchvision")


def _writable(folder: Path) -> bool:
    """Whether files can be created in ``folder`` (made if missing): tried, since permission bits say nothing
    on a read-only mount or to root."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-"):
            pass
    except OSError:
        return False
    return True


def resolve_torchvision_coco(path: str | os.PathLike,
                             folders: Sequence[str | os.PathLike] = ()) -> Path | None:
    """A visiondet checkpoint for torchvision COCO file ``path``, converted on first use; None if ``path`` is
    not one of :data:`TORCHVISION_COCO_FILES`.

    A bare file name is looked up in ``folders`` and the hub cache. The conversion is cached next to the hub's
    files (``visiondet/<name>.pt``), or in :func:`conversion_fallback_dir` when that folder cannot be written
    (a warning says where), and redone only when the source file is newer than it.
    """
    path = Path(path)
    if path.name not in TORCHVISION_COCO_FILES:
        return None
    if not path.is_file():
        candidates = [p for p in find_torchvision_coco(folders) if p.name == path.name]
        if not candidates:
            raise CheckpointError(
                f"{path}: not found; put torchvision's file in {hub_checkpoint_dir()} or weights/ "
                "(visiondet downloads nothing)")
        path = candidates[0]
    beside_hub, fallback = hub_checkpoint_dir() / "visiondet", conversion_fallback_dir()
    for folder in (beside_hub, fallback):  # an up-to-date conversion wherever an earlier run put it
        cached = folder / f"{path.stem}.pt"
        if cached.is_file() and cached.stat().st_mtime >= path.stat().st_mtime:
            return cached
    folder = beside_hub if _writable(beside_hub) else fallback
    if folder == fallback:
        if not _writable(fallback):
            raise CheckpointError(f"{path}: cannot write its conversion to {beside_hub} or {fallback}; "
                                  "make one of them writable (or set VISIONDET_CACHE)")
        warnings.warn(f"{beside_hub} cannot be written ($TORCH_HOME read-only?); converting {path.name} "
                      f"into {fallback} instead", stacklevel=2)
    cached = folder / f"{path.stem}.pt"
    convert_checkpoint(path, cached, TORCHVISION_COCO_FILES[path.name][0])
    return cached
