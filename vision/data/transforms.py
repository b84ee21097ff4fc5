"""Augmentation pipelines (albumentations) from YAML lists, per-task defaults, and the one ``to_tensor``.

A pipeline is written in the experiment config as a list of transforms, each a name from albumentations
and its parameters::

    transforms:
      - {name: LongestMaxSize, max_size: 512}
      - {name: HorizontalFlip, p: 0.5}
      - {name: OneOf, p: 0.8, transforms: [{name: ColorJitter}, {name: ToGray}]}

``build_transforms`` turns it into an ``albumentations.Compose`` that carries boxes (xyxy pixels, the
``labels`` and ``indices`` fields) and masks along with the image. Normalisation is not done here: models
normalise internally, so images stay uint8 until ``to_tensor`` makes them float32 in [0, 1].

Randomness: ``augment`` reseeds the pipeline for every sample from torch's generator, so
``torch.manual_seed(s)`` reproduces the same augmented samples, and DataLoader workers (each with its own
torch seed) do not repeat each other's augmentations.
"""

from __future__ import annotations

import difflib
import inspect
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import albumentations as A
import cv2
import numpy as np
import torch

from .mosaic import find_mosaic

# Box fields every detection pipeline carries: class labels and each box's index in the input list,
# so per-instance masks and crowd flags can follow the boxes that survive a crop.
BOX_LABEL_FIELDS = ("labels", "indices")

# Data key: the "indices" values of the boxes that box-safe crops keep whole (absent: every box).
# CocoDetection names its objects, so crowd regions, which ride in the same box list, never steer the crop.
SAFE_CROP_INDICES = "safe_crop_indices"

IGNORE_INDEX = 255  # segmentation: pixels that count for nothing (crowd regions, padding)
PAD_VALUE = 128  # image padding: the same neutral grey transparent pixels get in images.py

_COMPOSES = {"OneOf": A.OneOf, "SomeOf": A.SomeOf, "Sequential": A.Sequential}
_REFUSED = {
    "Normalize": "models normalise internally (mean/std are part of the model config); remove it",
    "ToTensorV2": "tensor conversion happens once, after the pipeline (to_tensor); remove it",
}



def to_tensor(image: np.ndarray) -> torch.Tensor:
    """``(H, W, 3)`` uint8 RGB -> float32 ``[3, H, W]`` in [0, 1]: the one conversion into model input."""
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        desc = f"{image.dtype} array of shape {image.shape}" if isinstance(image, np.ndarray) else type(image)
        raise TypeError(f"to_tensor expects an (H, W, 3) uint8 RGB array, got {desc}")
    chw = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).contiguous()
    return chw.to(torch.float32).div_(255.0)


def build_transforms(
    spec: Sequence[Mapping[str, Any]] | None,
    task: str,
    train: bool,
    *,
    extra_boxes: Sequence[str] = (),
    **defaults: Any,
) -> A.Compose:
    """Build the albumentations pipeline for one task and split.

    Args:
        spec: list of ``{name: <albumentations transform>, <parameter>: <value>, ...}``; ``OneOf``,
            ``SomeOf`` and ``Sequential`` take a nested ``transforms`` list. ``None``: the task's default
            pipeline for ``train`` or evaluation.
        task: "detection", "segmentation" or "classification".
        train: training (random) or evaluation (deterministic) default pipeline.
        extra_boxes: detection only: names of further box lists that follow the image's geometry like the
            boxes but take no part in box-safe crops (e.g. ``crowd_boxes``, ``proposals``). Such a pipeline
            is called through ``augment_detection``, not with label fields.
        **defaults: the task's settings, see ``PIPELINES`` (detection: ``size``, ``min_visibility``;
            segmentation: ``size``, ``scale``, ``object_crops``; classification: ``size``). Unknown names
            are an error.

    Returns:
        ``albumentations.Compose``; for detection it takes ``bboxes`` (pascal_voc = xyxy pixels) with the
        label fields ``labels`` and ``indices``, boxes clipped to the image and dropped below
        ``min_visibility`` or 1 px. With ``extra_boxes`` the labels travel as an extra box column instead
        (albumentations joins label fields to one box list only) and each extra list is a box target of its
        own, clipped and filtered the same way.
    """
    if task not in PIPELINES:
        raise ValueError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
    recipe = PIPELINES[task]
    unknown = sorted(set(defaults) - set(recipe.defaults))
    if unknown:
        hints = _suggest(unknown[0], recipe.defaults)
        raise ValueError(
            f"unknown transform setting {unknown[0]!r} for {task}{hints}; "
            f"accepted: {', '.join(recipe.defaults)}"
        )
    settings = {**recipe.defaults, **defaults}
    if spec is None:
        transforms = recipe.default_pipeline(train, settings)
    else:
        transforms = _from_spec(spec, "transforms")
    if extra_boxes and not recipe.boxes:
        raise ValueError(f"extra_boxes is for detection pipelines, not {task}")
    if find_mosaic(transforms) is not None and (extra_boxes or not recipe.boxes):
        # its other images come from CocoDetection (vision.data.mosaic); nothing else supplies them
        raise ValueError("Mosaic composes COCO detection samples with their boxes; it cannot carry "
                         + (f"{', '.join(extra_boxes)}" if extra_boxes else f"{task} targets"))
    bbox_params = None
    if recipe.boxes:
        bbox_params = A.BboxParams(
            format="pascal_voc",
            label_fields=[] if extra_boxes else list(BOX_LABEL_FIELDS),
            min_visibility=float(settings["min_visibility"]),
            min_width=1.0,
            min_height=1.0,
            clip=True,
            filter_invalid_bboxes=True,
        )
    with warnings.catch_warnings():
        # An evaluation pipeline may have no geometric transform; the box processor is still wanted.
        warnings.filterwarnings("ignore", message="Got processor for bboxes, but no transform to process it")
        return A.Compose(
            transforms,
            bbox_params=bbox_params,
            additional_targets={name: "bboxes" for name in extra_boxes} or None,
        )


def augment_detection(
    transforms: A.Compose, image: np.ndarray, boxes: np.ndarray, labels: np.ndarray, **extra: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """Augment an image with its boxes [M, 4] (xyxy pixels), their labels [M] and the ``extra`` box lists
    [K, 4] named when the pipeline was built (``build_transforms(..., extra_boxes=...)``).

    Every box list is moved, flipped, cropped, clipped and filtered exactly like the boxes; only ``boxes``
    steer box-safe crops. Surviving boxes keep their order. Returns (image, boxes, labels, extra).
    """
    missing = sorted(set(extra) - set(transforms.additional_targets))
    if missing:
        raise ValueError(f"the pipeline was not built with extra_boxes {missing}")
    data: dict[str, Any] = {
        "image": image,
        # the label rides as a fifth column: what survives keeps its label, whatever got dropped
        "bboxes": np.concatenate([_xyxy(boxes), np.asarray(labels, np.float32).reshape(-1, 1)], axis=1),
    }
    for name, value in extra.items():
        data[name] = _xyxy(value)
    out = augment(transforms, **data)
    kept = np.asarray(out["bboxes"], np.float32).reshape(-1, 5)
    moved = {name: np.asarray(out[name], np.float32).reshape(-1, 4)[:, :4] for name in extra}
    return out["image"], kept[:, :4].copy(), kept[:, 4].round().astype(np.int64), moved


def _xyxy(boxes: Any) -> np.ndarray:
    return np.asarray(boxes, np.float32).reshape(-1, 4)


def augment(transforms: Any, **data: Any) -> dict[str, Any]:
    """Apply ``transforms`` (albumentations call style) with randomness drawn from torch's generator."""
    if isinstance(transforms, A.BaseCompose):
        transforms.set_random_seed(int(torch.randint(0, 2**62, ()).item()))
    return transforms(**data)


def _detection_pipeline(train: bool, s: dict[str, Any]) -> list[A.BasicTransform]:
    resize = [A.LongestMaxSize(max_size=int(s["size"]))] if s["size"] else []
    if not train:
        return resize
    return resize + [
        # Crops that keep every box whole; after the detector's resize this is a random zoom-in.
        BBoxSafeRandomCrop(erosion_rate=0.0, p=0.5),
        A.HorizontalFlip(p=0.5),
        A.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.02, p=0.8),
    ]


def _segmentation_pipeline(train: bool, s: dict[str, Any]) -> list[A.BasicTransform]:
    size = int(s["size"])
    pad = A.PadIfNeeded(
        min_height=size,
        min_width=size,
        border_mode=cv2.BORDER_CONSTANT,
        fill=PAD_VALUE,
        fill_mask=IGNORE_INDEX,
    )
    if not train:
        # Fixed-size outputs so validation batches stack; the padding is ignored by the metrics.
        return [A.LongestMaxSize(max_size=size), pad]
    low, high = s["scale"]
    crop: A.BasicTransform = A.RandomCrop(height=size, width=size)
    share = float(s["object_crops"])
    if share > 0:
        # Where objects cover a few percent of the pixels, many random crops can hold none of them; this
        # share of the crops is placed around a random labelled pixel instead (the mask's 0 and 255 never
        # count as one), as nnU-Net's foreground oversampling does. (On the real-imagery set 79% of
        # random crops already held an object and 0.5 gained nothing: README, real_segmentation.py.)
        around = A.CropNonEmptyMaskIfExists(height=size, width=size, ignore_values=[IGNORE_INDEX], p=share)
        crop = around if share >= 1 else A.OneOf([around, A.RandomCrop(height=size, width=size, p=1 - share)],
                                                 p=1.0)
    return [
        A.RandomScale(scale_limit=(low - 1.0, high - 1.0), p=1.0),
        pad,
        crop,
        A.HorizontalFlip(p=0.5),
    ]


def _classification_pipeline(train: bool, s: dict[str, Any]) -> list[A.BasicTransform]:
    size = int(s["size"])
    if not train:
        return [A.SmallestMaxSize(max_size=round(size / 0.875)), A.CenterCrop(height=size, width=size)]
    return [
        A.RandomResizedCrop(size=(size, size), scale=(0.08, 1.0)),
        A.HorizontalFlip(p=0.5),
        A.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1, p=0.8),
    ]


@dataclass(frozen=True)
class TaskPipeline:
    """What a task's pipeline does: its keyword settings (name -> default), its default transforms for
    training or evaluation, and whether boxes travel with the image. Named by the targets it carries
    (detection, segmentation, classification), chosen by the caller."""

    defaults: dict[str, Any]
    default_pipeline: Callable[[bool, dict[str, Any]], list[A.BasicTransform]]
    boxes: bool = False


PIPELINES: dict[str, TaskPipeline] = {
    # size: longest image side (None keeps the size; the detector resizes anyway).
    # min_visibility: a box keeps its label only if this fraction of its area survives a crop.
    "detection": TaskPipeline({"size": None, "min_visibility": 0.1}, _detection_pipeline, boxes=True),
    # size: training crop side and evaluation longest side (padded to a square of this size).
    # scale: range of the random rescale applied before cropping.
    # object_crops: share of training crops placed around a labelled pixel (the rest are random).
    "segmentation": TaskPipeline({"size": 512, "scale": (0.5, 2.0), "object_crops": 0.0},
                                 _segmentation_pipeline),
    # size: network input side; evaluation resizes the short side to size / 0.875, then centre-crops.
    "classification": TaskPipeline({"size": 224}, _classification_pipeline),
}
TASKS = tuple(PIPELINES)  # what ``build_transforms``'s ``task`` argument accepts


class _ObjectsOnly:
    """A box-safe crop that keeps whole only the boxes whose index is in ``data[SAFE_CROP_INDICES]``.

    albumentations chooses such a crop from every box of ``bboxes``; the objects are told apart by the
    ``indices`` label field (a column after the four coordinates: label fields are appended in order and
    numeric values are kept as they are)."""

    _column = 4 + BOX_LABEL_FIELDS.index("indices")

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        keep, boxes = data.get(SAFE_CROP_INDICES), data.get("bboxes")
        if keep is not None and boxes is not None and len(boxes) and boxes.shape[1] > self._column:
            data = {**data, "bboxes": boxes[np.isin(boxes[:, self._column], keep)]}
        return super().get_params_dependent_on_data(params, data)  # type: ignore[misc]


class BBoxSafeRandomCrop(_ObjectsOnly, A.BBoxSafeRandomCrop):
    """albumentations' BBoxSafeRandomCrop, steered by the objects alone (see ``_ObjectsOnly``)."""


class RandomSizedBBoxSafeCrop(_ObjectsOnly, A.RandomSizedBBoxSafeCrop):
    """albumentations' RandomSizedBBoxSafeCrop, steered by the objects alone (see ``_ObjectsOnly``)."""


# names in a config that build the steered crops above instead of albumentations' own
_STEERED = {"BBoxSafeRandomCrop": BBoxSafeRandomCrop, "RandomSizedBBoxSafeCrop": RandomSizedBBoxSafeCrop}


def _from_spec(spec: Sequence[Mapping[str, Any]], where: str) -> list[A.BasicTransform | A.BaseCompose]:
    if isinstance(spec, (str, bytes)) or not isinstance(spec, Sequence):
        raise ValueError(f"{where}: expected a list of transforms, got {type(spec).__name__}")
    return [_one_transform(item, f"{where}[{i}]") for i, item in enumerate(spec)]


def _one_transform(item: Mapping[str, Any], where: str) -> A.BasicTransform | A.BaseCompose:
    if not isinstance(item, Mapping) or "name" not in item:
        raise ValueError(f"{where}: expected a mapping with a 'name' key, e.g. {{name: HorizontalFlip}}")
    name = item["name"]
    if name in _REFUSED:
        raise ValueError(f"{where}: {name}: {_REFUSED[name]}")
    params = {k: v for k, v in item.items() if k != "name"}
    if name in _COMPOSES:
        children = _from_spec(params.pop("transforms", None) or [], f"{where}.transforms")
        cls = _COMPOSES[name]
        _check_params(cls, params, name, where, skip=("transforms",))
        return cls(children, **params)
    cls = _STEERED.get(str(name)) or getattr(A, str(name), None)
    if not (inspect.isclass(cls) and issubclass(cls, A.BasicTransform)):
        raise ValueError(f"{where}: unknown transform {name!r}{_suggest(str(name), _transform_names())}")
    _check_params(cls, params, name, where)
    try:
        return cls(**params)
    except (TypeError, ValueError) as exc:  # albumentations validates values with pydantic (a ValueError)
        raise ValueError(f"{where}: {name}: {exc}") from None


def _check_params(cls: type, params: Mapping[str, Any], name: str, where: str, skip: Sequence[str] = ()):
    # albumentations only warns about unknown parameters; a typo in a config must not be silently ignored.
    ignored = ("self", "args", "kwargs", *skip)
    accepted = [p for p in inspect.signature(cls.__init__).parameters if p not in ignored]
    for key in params:
        if key not in accepted:
            raise ValueError(
                f"{where}: {name} has no parameter {key!r}{_suggest(key, accepted)}; "
                f"accepted: {', '.join(accepted)}"
            )


def _transform_names() -> list[str]:
    names = [n for n, c in vars(A).items() if inspect.isclass(c) and issubclass(c, A.BasicTransform)]
    return names + list(_COMPOSES)


def _suggest(word: str, choices: Sequence[str]) -> str:
    by_lower = {c.lower(): c for c in choices}
    close = difflib.get_close_matches(word.lower(), list(by_lower), n=1, cutoff=0.6)
    return f" (did you mean {by_lower[close[0]]!r}?)" if close else ""
