"""Import torchvision's segmentation models: ``fcn_resnet50/101`` and ``deeplabv3_resnet50/101``.

Their backbone keys (``backbone.conv1``, ``backbone.layer1.0...``) are ours already (vision.backbones keeps
torchvision's child names); only the heads are renamed, by the table below. torchvision models do not
normalise their input, ours do: feed ours images in ``[0, 1]`` and theirs the same images normalised with
the mean/std given here (torchvision's reference transforms use the ImageNet values, our defaults).
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from pathlib import Path

from torch import Tensor

from vision.checkpoint import FORMAT, VERSION, load_checkpoint, save_checkpoint
from vision.layers import IMAGENET_MEAN, IMAGENET_STD
from vision.segmentation.model import SegmentationConfig, SegmentationModel, build_segmentation_model

TORCHVISION_ARCHS = ("fcn_resnet50", "fcn_resnet101", "deeplabv3_resnet50", "deeplabv3_resnet101")

# torchvision's published weights (COCO_WITH_VOC_LABELS) predict background + these 20 classes.
VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
    "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)

# torchvision key prefix (regex) -> ours. Its FCNHead is Sequential(conv, bn, relu, dropout, conv); its
# DeepLabHead is Sequential(ASPP, conv, bn, relu, conv) with ASPP.convs = [1x1, 3 atrous, pooling].
_FCN_HEAD = [
    (r"0\.", "conv.conv."), (r"1\.", "conv.bn."), (r"4\.", "classifier."),
]
_DEEPLAB_HEAD = [
    (r"0\.convs\.4\.1\.", "aspp.image_pool.conv."), (r"0\.convs\.4\.2\.", "aspp.image_pool.bn."),
    (r"0\.convs\.([0-3])\.0\.", r"aspp.branches.\1.conv."),
    (r"0\.convs\.([0-3])\.1\.", r"aspp.branches.\1.bn."),
    (r"0\.project\.0\.", "aspp.project.conv."), (r"0\.project\.1\.", "aspp.project.bn."),
    (r"1\.", "conv.conv."), (r"2\.", "conv.bn."), (r"4\.", "classifier."),
]


def _rename(key: str, head_rules: list[tuple[str, str]]) -> str | None:
    if key.startswith("backbone."):
        return key
    heads = (("classifier.", "head.", head_rules), ("aux_classifier.", "aux_head.", _FCN_HEAD))
    for prefix, ours_prefix, rules in heads:
        if key.startswith(prefix):
            rest = key[len(prefix):]
            for pattern, replacement in rules:
                renamed, hits = re.subn(f"^{pattern}", replacement, rest)
                if hits:
                    return ours_prefix + renamed
    return None


def convert_torchvision_state_dict(state_dict: Mapping[str, Tensor], arch: str) -> dict[str, Tensor]:
    """torchvision ``arch`` state dict -> our state dict for the same arch (same tensors, renamed keys)."""
    if arch not in TORCHVISION_ARCHS:
        raise ValueError(f"no torchvision import for {arch!r}; supported: {', '.join(TORCHVISION_ARCHS)}")
    rules = _DEEPLAB_HEAD if arch.startswith("deeplabv3") else _FCN_HEAD
    converted, unknown = {}, []
    for key, value in state_dict.items():
        ours = _rename(key, rules)
        if ours is None:
            unknown.append(key)
        else:
            converted[ours] = value
    if unknown:
        raise ValueError(f"keys that are not part of torchvision's {arch}: {', '.join(unknown[:8])}"
                         + (" ..." if len(unknown) > 8 else ""))
    return converted


def load_torchvision_segmentation(
    source: str | os.PathLike | Mapping[str, Tensor], arch: str, *,
    mean: tuple[float, float, float] = IMAGENET_MEAN, std: tuple[float, float, float] = IMAGENET_STD,
) -> tuple[SegmentationModel, SegmentationConfig]:
    """Our model holding the weights of a torchvision segmentation model, and the config that rebuilds it.

    ``source``: a state dict, or a file with one (``torch.save(model.state_dict())``, or a torchvision
    reference-script checkpoint whose ``"model"`` entry is the state dict); read with ``weights_only``.
    The class count (``classifier`` output channels, background included) and the auxiliary head are read
    from the weights; torchvision's models run at output stride 8 with ASPP rates (12, 24, 36).
    """
    where = "state dict"
    if not isinstance(source, Mapping):
        where = str(source)
        source = load_checkpoint(source)
        if isinstance(source, Mapping) and isinstance(source.get("model"), Mapping):
            source = source["model"]
    try:
        state = convert_torchvision_state_dict(source, arch)
        num_outputs = state["head.classifier.weight"].shape[0]
    except (ValueError, KeyError, AttributeError) as exc:
        raise ValueError(f"{where}: not a torchvision {arch} state dict: {exc}") from None
    cfg = SegmentationConfig(
        arch=arch, num_classes=num_outputs - 1, output_stride=8,
        aux_loss=any(k.startswith("aux_head.") for k in state), aux_weight=0.5,
        aspp_rates=(12, 24, 36) if arch.startswith("deeplabv3") else None, mean=mean, std=std,
    )
    model = build_segmentation_model(cfg, load_pretrained=False)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise ValueError(f"{where}: weights do not fit {arch}: {exc}") from None
    return model, cfg


def save_torchvision_segmentation(
    source: str | os.PathLike | Mapping[str, Tensor], arch: str, out: str | os.PathLike,
    classes: list[dict] | None = None,
) -> Path:
    """Write a visiondet segmentation checkpoint (ready for predict, evaluate and the demo) from torchvision
    weights. ``classes`` (``[{"id", "name"}, ...]`` of labels 1..K) defaults to the 20 VOC classes of
    torchvision's published weights when the class count is 20."""
    model, cfg = load_torchvision_segmentation(source, arch)
    if classes is None:
        if cfg.num_classes != len(VOC_CLASSES):
            raise ValueError(f"{cfg.num_classes} classes in the weights: give their names (classes=...)")
        classes = [{"id": i + 1, "name": name} for i, name in enumerate(VOC_CLASSES)]
    if len(classes) != cfg.num_classes:
        raise ValueError(f"{len(classes)} class names for {cfg.num_classes} classes in the weights")
    checkpoint = {
        "format": FORMAT, "version": VERSION, "task": "segmentation",
        "model": {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()},
        "classes": [dict(c) for c in classes], "preprocess": {"size": None},
        "state_dict": model.state_dict(), "metrics": {}, "config": {"source": f"torchvision {arch}"},
    }
    return save_checkpoint(checkpoint, out)
