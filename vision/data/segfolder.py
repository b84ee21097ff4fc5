"""Semantic segmentation from a folder of images and a folder of PNG index masks (the Pascal VOC layout).

``JPEGImages/2007_000032.jpg`` pairs with ``SegmentationClass/2007_000032.png``: same file stem. A mask
pixel holds the label itself: 0 background, 1..K classes, 255 ignore (VOC's object borders). VOC masks are
palette PNGs; their palette indices are the labels, so they are read as indices, never converted to RGB.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from .images import IMAGE_EXTENSIONS, ImageError, ImageHeader, apply_orientation, exif_for_size, read_raw
from .transforms import IGNORE_INDEX, augment, to_tensor

__all__ = ["MaskFolderSegmentation", "check_mask_values", "read_mask"]


def read_mask(path: str | os.PathLike) -> np.ndarray:
    """A single-channel index PNG (palette, 8-bit or 16-bit grey) -> ``[H, W]`` int64 label map."""
    path = Path(path)
    if not path.is_file():
        raise ImageError(path, "no such mask file")
    try:
        with Image.open(path) as image:
            image.load()
            mode = image.mode
            if mode not in ("P", "L", "1", "I", "I;16", "I;16B", "I;16L"):
                raise ImageError(
                    path,
                    f"mask has {mode} pixels; save masks as single-channel PNGs whose values are class "
                    f"indices (palette or grayscale), not colours",
                )
            values = np.asarray(image.convert("L") if mode == "1" else image)
    except ImageError:
        raise
    except Exception as exc:  # Pillow: UnidentifiedImageError, OSError (truncated), ...
        raise ImageError(path, f"cannot read the mask ({exc})") from None
    return values.astype(np.int64)


def check_mask_values(mask: np.ndarray, num_classes: int, path: str | os.PathLike) -> None:
    """Every value must be 0..K or 255, checked on the CPU so a bad mask never reaches the loss."""
    values = np.unique(mask)
    bad = values[((values < 0) | (values > num_classes)) & (values != IGNORE_INDEX)]
    if bad.size:
        raise ImageError(
            path,
            f"mask values {bad[:10].tolist()} are outside 0..{num_classes} (background + {num_classes} "
            f"classes) and not {IGNORE_INDEX} (ignore)",
        )


class MaskFolderSegmentation(Dataset):
    """Images + PNG index masks paired by file stem.

    ``dataset[i] -> (image, target)``: image float32 ``[3, H, W]`` in [0, 1]; target int64 ``[H, W]``
    (0 background, 1..K, 255 ignore).

    Args:
        images_dir: folder of images (any of ``IMAGE_EXTENSIONS``).
        masks_dir: folder of ``<stem>.png`` masks.
        classes: the K class names of labels 1..K (no background entry), or ``[{"id", "name"}, ...]``.
        transforms: albumentations pipeline from ``build_transforms(..., "segmentation", ...)``.
        split_file: optional text file of stems to use, one per line (VOC ``ImageSets/Segmentation``).
    """

    def __init__(
        self,
        images_dir: str | os.PathLike,
        masks_dir: str | os.PathLike,
        classes: Sequence[str | dict[str, Any]],
        transforms: Any = None,
        *,
        split_file: str | os.PathLike | None = None,
    ):
        self.images_dir, self.masks_dir = Path(images_dir), Path(masks_dir)
        self.transforms = transforms
        self.classes = [
            c if isinstance(c, dict) else {"id": i + 1, "name": str(c)} for i, c in enumerate(classes)
        ]
        self.num_classes = len(self.classes)
        if not self.classes:
            raise ValueError("MaskFolderSegmentation: classes is empty; give the names of labels 1..K")
        for folder in (self.images_dir, self.masks_dir):
            if not folder.is_dir():
                raise FileNotFoundError(f"{folder}: no such folder")
        images = {
            p.stem: p
            for p in sorted(self.images_dir.iterdir())
            if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")
        }
        if split_file is not None:
            stems = [s.strip() for s in Path(split_file).read_text().splitlines() if s.strip()]
            missing = [s for s in stems if s not in images]
            if missing:
                where = f"{split_file}: no image in {self.images_dir}"
                raise FileNotFoundError(f"{where} for {_listing(missing)}")
        else:
            stems = sorted(images)
        no_mask = [s for s in stems if not (self.masks_dir / f"{s}.png").is_file()]
        if no_mask:
            raise FileNotFoundError(f"{self.masks_dir}: no <stem>.png mask for images {_listing(no_mask)}")
        if not stems:
            raise FileNotFoundError(f"{self.images_dir}: no images ({', '.join(IMAGE_EXTENSIONS)})")
        self.samples = [(images[s], self.masks_dir / f"{s}.png") for s in stems]

    def __len__(self) -> int:
        return len(self.samples)

    def index_map(self, index: int) -> np.ndarray:
        """uint8 ``[H, W]`` label map of sample ``index`` as its mask file holds it, before transforms."""
        mask_path = self.samples[index][1]
        mask = read_mask(mask_path)
        check_mask_values(mask, self.num_classes, mask_path)
        return mask.astype(np.uint8)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image_path, mask_path = self.samples[index]
        target = self.index_map(index)
        raw, orientation = read_raw(image_path)
        # The mask was drawn on one orientation of the photo; its size says which.
        header = ImageHeader(raw.shape[1], raw.shape[0], orientation, "")
        use_exif = exif_for_size(header, target.shape[1], target.shape[0])
        if use_exif is None:
            w, h = header.oriented_size
            mh, mw = target.shape
            raise ImageError(image_path, f"image is {w}x{h} but its mask {mask_path.name} is {mw}x{mh}")
        image = apply_orientation(raw, orientation) if use_exif else raw
        if self.transforms is not None:
            out = augment(self.transforms, image=image, mask=target)
            image, target = out["image"], out["mask"]
        return to_tensor(image), torch.from_numpy(np.ascontiguousarray(target)).to(torch.int64)


def _listing(items: Sequence[str], limit: int = 10) -> str:
    text = ", ".join(items[:limit])
    return f"{text}, ... ({len(items)} in all)" if len(items) > limit else text
