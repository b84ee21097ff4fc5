"""ImageFolder classification and PNG-mask segmentation folders, built in tmp_path."""

import numpy as np
import pytest
import torch
from PIL import Image

from vision.data.folder import ImageFolderDataset
from vision.data.images import ImageError
from vision.data.segfolder import MaskFolderSegmentation
from vision.data.transforms import build_transforms


def _png(path, value, size=(6, 4)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size[1], size[0], 3), value, np.uint8)).save(path)


def test_image_folder_classes_sorted_hidden_skipped(tmp_path):
    _png(tmp_path / "zebra" / "1.png", 10)
    _png(tmp_path / "ant" / "2.jpg", 20)
    _png(tmp_path / "ant" / "nested" / "3.png", 30)  # sub-folders of a class belong to it
    _png(tmp_path / "ant" / ".hidden.png", 40)
    _png(tmp_path / ".ipynb_checkpoints" / "4.png", 50)
    (tmp_path / "zebra" / "notes.txt").write_text("not an image")
    ds = ImageFolderDataset(tmp_path)
    assert ds.classes == [{"id": 0, "name": "ant"}, {"id": 1, "name": "zebra"}]
    assert [p.name for p, _ in ds.samples] == ["2.jpg", "3.png", "1.png"]
    assert ds.targets == [0, 0, 1]
    image, label = ds[2]
    assert label == 1 and image.shape == (3, 4, 6)
    torch.testing.assert_close(image, torch.full((3, 4, 6), 10 / 255))


def test_image_folder_with_transforms_and_errors(tmp_path):
    _png(tmp_path / "a" / "1.png", 10, size=(40, 30))
    (tmp_path / "b").mkdir()
    with pytest.warns(UserWarning, match="class folders without images: b"):
        ds = ImageFolderDataset(tmp_path, transforms=build_transforms(None, "classification", False, size=16))
    assert ds[0][0].shape == (3, 16, 16)
    with pytest.raises(FileNotFoundError, match="no class folders"):
        ImageFolderDataset(tmp_path / "a")
    with pytest.raises(FileNotFoundError, match="no such folder"):
        ImageFolderDataset(tmp_path / "missing")


def test_image_folder_bad_file_names_the_file(tmp_path):
    _png(tmp_path / "a" / "ok.png", 1)
    (tmp_path / "a" / "broken.jpg").write_bytes(b"")
    ds = ImageFolderDataset(tmp_path)
    with pytest.raises(ImageError, match=r"broken\.jpg: empty file"):
        ds[0]


def _voc(tmp_path, mask, *, mode="P", stem="2007_000032"):
    images, masks = tmp_path / "JPEGImages", tmp_path / "SegmentationClass"
    _png(images / f"{stem}.png", 90, size=(mask.shape[1], mask.shape[0]))
    masks.mkdir(exist_ok=True)
    if mode == "P":
        out = Image.fromarray(mask.astype(np.uint8), "P")
        out.putpalette([0, 0, 0, 128, 0, 0, 0, 128, 0] + [200] * (256 * 3 - 9))
    else:
        out = Image.fromarray(np.stack([mask.astype(np.uint8)] * 3, axis=2))
    out.save(masks / f"{stem}.png")
    return images, masks


def test_palette_masks_read_as_indices(tmp_path):
    mask = np.array([[0, 1, 2], [255, 1, 0]])
    images, masks = _voc(tmp_path, mask)
    ds = MaskFolderSegmentation(images, masks, ["aeroplane", "bicycle"])
    assert ds.classes == [{"id": 1, "name": "aeroplane"}, {"id": 2, "name": "bicycle"}]
    image, target = ds[0]
    assert image.shape == (3, 2, 3) and target.dtype == torch.int64
    np.testing.assert_array_equal(target.numpy(), mask)


def test_mask_values_out_of_range_name_the_file(tmp_path):
    images, masks = _voc(tmp_path, np.array([[0, 1, 5]]))
    ds = MaskFolderSegmentation(images, masks, ["a", "b"])
    with pytest.raises(ImageError, match=r"2007_000032\.png: mask values \[5\] are outside 0..2"):
        ds[0]


def test_colour_masks_are_refused(tmp_path):
    images, masks = _voc(tmp_path, np.array([[0, 1]]), mode="RGB")
    with pytest.raises(ImageError, match="mask has RGB pixels; save masks as single-channel PNGs"):
        MaskFolderSegmentation(images, masks, ["a"])[0]


def test_missing_masks_and_split_files(tmp_path):
    images, masks = _voc(tmp_path, np.array([[0, 1]]))
    _png(images / "extra.png", 5, size=(2, 1))
    with pytest.raises(FileNotFoundError, match="no <stem>.png mask for images extra"):
        MaskFolderSegmentation(images, masks, ["a"])
    split = tmp_path / "train.txt"
    split.write_text("2007_000032\n")
    assert len(MaskFolderSegmentation(images, masks, ["a"], split_file=split)) == 1
    split.write_text("2007_000032\nnope\n")
    with pytest.raises(FileNotFoundError, match="for nope"):
        MaskFolderSegmentation(images, masks, ["a"], split_file=split)


def test_mask_folder_with_transforms(tmp_path):
    mask = np.zeros((8, 8), np.uint8)
    mask[:, :4] = 1
    images, masks = _voc(tmp_path, mask)
    flip = build_transforms([{"name": "HorizontalFlip", "p": 1.0}], "segmentation", train=True)
    _, target = MaskFolderSegmentation(images, masks, ["a"], transforms=flip)[0]
    assert (target[:, 4:] == 1).all() and (target[:, :4] == 0).all()
