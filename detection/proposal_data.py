"""External proposals as data: attached to each sample by image before augmentation, moved with its boxes.

R-CNN and Fast R-CNN train on boxes from outside the network (a proposals file, or selective search). They
belong to the picture as it is stored, not to an augmented copy: a file holds boxes for the stored image,
and selective search on a flipped or colour-jittered copy is both another answer every epoch and a cache
that never hits. So ``ProposalDataset`` takes each sample un-augmented from the dataset it wraps, finds its
proposals (a file by image id or file name; selective search on the stored pixels, once per image, through
an on-disk cache keyed by the pixels and the settings), and only then augments: the image, its boxes, its
crowd regions and its proposals go through one albumentations call, so a flip, crop or resize moves all of
them alike. The sample's target gains ``proposals`` [P, 4] (xyxy, augmented image's pixels) and
``crowd_boxes`` [C, 4]; the detector reads them from the targets.

Selective search runs in the DataLoader workers (``data.workers``), or ahead of time with
``visiondet proposals`` (then ``proposals.method: file``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from detection.proposals import ProposalFile, ProposalSource, to_uint8_image
from vision.data.transforms import augment_detection, to_tensor

__all__ = ["ProposalDataset", "EXTRA_BOXES"]

# The box lists that ride along with the ground truth through a ProposalDataset's pipeline
EXTRA_BOXES = ("crowd_boxes", "proposals")


class ProposalDataset(Dataset):
    """``dataset`` (detection samples ``(image [3, H, W] in [0, 1], target)`` with ``boxes``, ``labels``,
    ``image_id`` and optionally ``crowd_boxes``; built WITHOUT transforms) with proposals from ``source``.

    Args:
        dataset: e.g. ``vision.data.coco.CocoDetection(..., transforms=None)``.
        source: where proposals come from; a ``ProposalFile`` is looked up by the sample's image id, then its
            file name, then its pixels; any other source (selective search, usually in a ``CachedSource``)
            runs on the stored pixels.
        transforms: a pipeline from ``build_transforms(..., "detection", ..., extra_boxes=EXTRA_BOXES)``,
            or None.
        max_proposals: keep the first (best-ranked) this many of an image's proposals, before augmenting.
    """

    def __init__(self, dataset: Dataset, source: ProposalSource, transforms: Any = None, *,
                 max_proposals: int | None = None) -> None:
        if getattr(dataset, "transforms", None) is not None:
            raise ValueError("ProposalDataset augments the samples itself: wrap a dataset without transforms")
        self.dataset = dataset
        self.source = source
        self.transforms = transforms  # the engine reseeds it per sample (apps.engine.loader)
        self.max_proposals = max_proposals

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getattr__(self, name: str) -> Any:
        # aspect_ratios, classes, coco, ids...: what the task and the samplers read from the dataset
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def file_name(self, target: dict[str, Any]) -> str | None:
        """The sample's file name relative to the image folder, where the dataset says it."""
        if "file_name" in target:
            return str(target["file_name"])
        lookup = getattr(self.dataset, "file_name_of", None)  # CocoDetection's
        if lookup is not None and "image_id" in target:
            return lookup(target["image_id"])
        coco = getattr(self.dataset, "coco", None)  # a pycocotools-backed dataset
        image = coco.imgs.get(target.get("image_id")) if coco is not None else None
        return str(image["file_name"]) if image else None

    def proposals_for(self, pixels: np.ndarray, target: dict[str, Any]) -> Tensor:
        """[P, 4] proposals of one stored (un-augmented) image, (H, W, 3) uint8."""
        image_id = target.get("image_id")
        if isinstance(self.source, ProposalFile):
            record = self.source.record(pixels, image_id, file_name=self.file_name(target))
            boxes = torch.from_numpy(np.array(record.boxes, np.float32).reshape(-1, 4))
            boxes = boxes[: self.source.max_boxes]
        else:
            boxes = self.source.propose(pixels, image_id)
        return boxes[: self.max_proposals] if self.max_proposals is not None else boxes

    def __getitem__(self, index: int) -> tuple[Tensor, dict[str, Any]]:
        image, target = self.dataset[index]
        pixels = to_uint8_image(image)  # exact: the dataset made the float image from these 8-bit values
        target = dict(target)
        proposals = self.proposals_for(pixels, target)
        crowd = target.get("crowd_boxes", torch.zeros(0, 4))
        if self.transforms is None:
            target.update(proposals=proposals, crowd_boxes=crowd)
            return image, target
        pixels, boxes, labels, extra = augment_detection(
            self.transforms, pixels, target["boxes"].numpy(), target["labels"].numpy(),
            crowd_boxes=crowd.numpy(), proposals=proposals.numpy(),
        )
        target.update(
            boxes=torch.from_numpy(boxes),
            labels=torch.from_numpy(labels),
            crowd_boxes=torch.from_numpy(extra["crowd_boxes"]),
            proposals=torch.from_numpy(extra["proposals"]),
        )
        return to_tensor(pixels), target
