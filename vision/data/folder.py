"""Classification from the ImageFolder layout: ``root/<class name>/<image>``, one sub-folder per class.

Classes are the sub-folders in sorted name order (label 0..K-1), as torchvision's ImageFolder does, so a
model trained there and here agrees on the labels. Hidden folders (``.ipynb_checkpoints``, ``.git``) and
hidden files are not data.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from .images import IMAGE_EXTENSIONS, read_image
from .transforms import augment, to_tensor

__all__ = ["ImageFolderDataset"]


class ImageFolderDataset(Dataset):
    """``dataset[i] -> (image float32 [3, H, W] in [0, 1], label int in 0..K-1)``.

    Attributes:
        classes: ``[{"id": label, "name": folder name}, ...]`` in label order (stored in checkpoints).
        samples: ``[(path, label), ...]``; ``targets``: the labels alone (for samplers and class counts).
    """

    def __init__(self, root: str | os.PathLike, *, transforms: Any = None):
        self.root = Path(root)
        self.transforms = transforms
        if not self.root.is_dir():
            raise FileNotFoundError(f"{self.root}: no such folder")
        folders = sorted(p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not folders:
            raise FileNotFoundError(f"{self.root}: no class folders (expected <root>/<class name>/<image>)")
        self.classes = [{"id": i, "name": p.name} for i, p in enumerate(folders)]
        self.samples: list[tuple[Path, int]] = []
        empty = []
        for label, folder in enumerate(folders):
            files = sorted(
                p
                for p in folder.rglob("*")
                if p.suffix.lower() in IMAGE_EXTENSIONS
                and p.is_file()
                and not any(part.startswith(".") for part in p.relative_to(folder).parts)
            )
            if not files:
                empty.append(folder.name)
            self.samples.extend((p, label) for p in files)
        if not self.samples:
            kinds = ", ".join(IMAGE_EXTENSIONS)
            raise FileNotFoundError(f"{self.root}: no images ({kinds}) in the class folders")
        if empty:
            warnings.warn(f"{self.root}: class folders without images: {', '.join(empty)}", stacklevel=2)
        self.targets = [label for _, label in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        image = read_image(path)  # EXIF applied: there are no annotations to match, only what people see
        if self.transforms is not None:
            image = augment(self.transforms, image=image)["image"]
        return to_tensor(image), label
