"""What older files need to load today, in one place.

- Config keys renamed since a release (``RENAMED_KEYS``): ``migrate_renamed`` puts them under their new names
  silently for what was saved (checkpoints' model configs through ``apps.schema.from_dict``, run folders'
  config.yaml on resume); a config file or override that still spells one is a one-line ConfigError naming
  the new spelling (``apps.schema.check_renamed``), so people learn it.
- Checkpoints of earlier layouts (``upgrade_checkpoint``): files of the former "rcnn" task, detectors with
  config sections their arch ignores. ``apps.tasks.load_model`` and the demo's model list call it on every
  file they read, so the shipped ``weights/*.pt`` and users' older files keep working without being rewritten.

The apps layer holds all of it, the R-CNN rewrite and the unused sections included: the model packages know
only today's layout.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from detection.generation import generation_of
from detection.models import DETECTOR_ARCHS

__all__ = ["RENAMED_KEYS", "Rename", "migrate_renamed", "renamed_keys", "upgrade_checkpoint"]


# ---- renamed config keys ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rename:
    """An old key's replacement: the new key, how an old value becomes a new one, and what to tell people."""

    new: str
    convert: Callable[[Any], Any]
    note: str


def same(value: Any) -> Any:
    return value


def freeze_at_from_trainable(value: Any) -> Any:
    # of the 5 stages, trainable_backbone_layers counted from the top; freeze_at counts from the input
    return 5 - value if isinstance(value, int) and not isinstance(value, bool) else value


def freeze_at_from_flag(value: Any) -> Any:
    # freeze_backbone froze the whole trunk: all 5 stages (ResNet stem + res2..res5, VGG blocks 1..5)
    return (5 if value else 0) if isinstance(value, bool) else value


def weights_from_flag(value: Any) -> Any:
    # pretrained: true (torchvision's flag) meant ImageNet weights; a string was already a source or a path
    return ("imagenet" if value else None) if isinstance(value, bool) else value


WEIGHTS_NOTE = "the one key for backbone weights: a named source such as imagenet, a path, or null"
FREEZE_NOTE = "stages frozen from the input, 0 = train everything"
TRAINABLE_NOTE = f"{FREEZE_NOTE}; freeze_at = 5 - trainable_backbone_layers"
FLAG_NOTE = f"{FREEZE_NOTE}; freeze_backbone: true = freeze_at: 5, false = freeze_at: 0"

# config dataclass name -> old key -> Rename. An entry acts only while the class has the new key and not
# the old one, so it can be written before the field itself is renamed.
RENAMED_KEYS: dict[str, dict[str, Rename]] = {
    "ClassifierConfig": {
        "pretrained": Rename("backbone_weights", weights_from_flag, WEIGHTS_NOTE),
        "freeze_backbone": Rename("freeze_at", freeze_at_from_flag,
                                  FLAG_NOTE),
    },
    "DetectorConfig": {
        "trainable_backbone_layers": Rename("freeze_at", freeze_at_from_trainable, TRAINABLE_NOTE),
    },
}


def renamed_keys(cls: type) -> dict[str, Rename]:
    """The old keys of dataclass ``cls`` that RENAMED_KEYS maps to one of its fields (while the old key is not
    a field of its own)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {old: rename for old, rename in RENAMED_KEYS.get(cls.__name__, {}).items()
            if old not in names and rename.new in names}


def migrate_renamed(cls: type, data: dict[str, Any]) -> dict[str, Any]:
    """``data`` with the keys ``cls`` has renamed under their new names and values (checkpoints, saved run
    configs); where both spellings are present the new one is kept."""
    renames = renamed_keys(cls)
    if not any(old in data for old in renames):
        return data
    out = {k: v for k, v in data.items() if k not in renames}
    for old, rename in renames.items():
        if old in data and rename.new not in data:
            out[rename.new] = rename.convert(data[old])
    return out


# ---- checkpoint layouts ----------------------------------------------------------------------------------


def upgrade_checkpoint(ckpt: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint dict in today's layout: files of the former "rcnn" task (R-CNN, now a detector of the
    detection task with ``arch: rcnn_<network>``) get the detection task, a DetectorConfig model dict and
    the new parameter names; detectors lose the config sections their arch ignores (``rpn`` of
    fast_rcnn_* files); anything else is returned as it is. For readers of raw checkpoints (the
    demo's model list) as much as for ``load_model``."""
    if ckpt.get("task") == "detection" and isinstance(ckpt.get("model"), dict):
        return {**ckpt, "model": without_unused_sections(ckpt["model"])}
    if ckpt.get("task") != "rcnn":
        return ckpt
    states = [ckpt.get("state_dict") or {}, ckpt.get("ema_state_dict") or {}]
    model, (state, ema) = _upgrade_rcnn(dict(ckpt["model"]), states)
    return {**ckpt, "task": "detection", "model": model, "state_dict": state, "ema_state_dict": ema or None}


def without_unused_sections(model: dict[str, Any]) -> dict[str, Any]:
    """A stored DetectorConfig dict without the sections its arch ignores: checkpoints saved before an
    unused section became an error carry an ``rpn`` section whatever their arch; their arch never read
    it, so dropping it changes nothing."""
    arch = model.get("arch")
    if not isinstance(arch, str) or arch not in DETECTOR_ARCHS:
        return model
    generation = generation_of(arch)
    drop = {"proposals"} if generation.learned_proposals else {"rpn"}
    if not generation.features_per_region:
        drop.add("rcnn")
    return {key: value for key, value in model.items() if key not in drop}


# state-dict prefixes of the former detection.rcnn.RCNN module -> the TwoStageDetector's parts
_OLD_PREFIXES = (("backbone.", "roi_heads.cnn.backbone."), ("box_head.", "roi_heads.cnn.head."),
                 ("cls_score.", "roi_heads.predictor.cls_score."), ("svm_", "roi_heads.predictor.svm_"),
                 ("bbox_", "roi_heads.predictor.bbox_"))


def _upgrade_rcnn(model: dict[str, Any], states: Sequence[dict[str, Any]]
                            ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """A checkpoint of task "rcnn" (the former R-CNN module and its flat RCNNConfig) -> the model config
    dict of a DetectorConfig with ``arch: rcnn_<body>`` and its state dicts with the new parameter names,
    so old files load as detectors of task "detection" with the same weights and the same answers."""
    backbone = str(model.get("backbone", "vgg16"))
    body = {"vgg16": "vgg16", **{f"resnet{d}": f"r{d}" for d in (18, 34, 50, 101)}}.get(backbone, backbone)
    rcnn = {key: model[key] for key in ("input_size", "context_padding", "feature_map", "head", "batch_size",
                                        "region_batch", "svm", "bbox") if key in model}
    roi = {"output_size": model.get("pool_size", 7),
           "representation_size": model.get("representation_size", 1024),
           **{key: model[key] for key in ("fg_iou_thresh", "positive_fraction", "ignore_iof_thresh",
                                          "score_thresh", "detections_per_img") if key in model},
           "nms_thresh": model.get("nms_thresh", 0.3)}
    upgraded: dict[str, Any] = {"arch": f"rcnn_{body}", "num_classes": model.get("num_classes", 0),
                                "backbone_weights": model.get("weights"), "frozen_bn": False,
                                "freeze_at": model.get("freeze_at", 0), "roi": roi, "rcnn": rcnn,
                                "proposals": model.get("proposals")}
    for key in ("mean", "std"):
        if key in model:
            upgraded[key] = list(model[key])
    renamed = []
    for state in states:
        new = {}
        for key, value in state.items():
            for old, now in _OLD_PREFIXES:
                if key.startswith(old):
                    key = now + key[len(old):]
                    break
            new[key] = value
        renamed.append(new)
    return upgraded, renamed
