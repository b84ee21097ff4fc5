"""Augmentation pipelines: YAML lists, defaults per task, box handling, seeding; and to_tensor."""

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from vision.data.folder import ImageFolderDataset
from vision.data.transforms import augment, build_transforms, to_tensor


def _image(h=32, w=48, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _names(compose):
    return [type(t).__name__ for t in compose.transforms]


def test_to_tensor_scales_to_unit_range_channels_first():
    image = np.array([[[0, 128, 255], [10, 20, 30]]], np.uint8)  # 1 x 2 pixels
    tensor = to_tensor(image)
    assert tensor.shape == (3, 1, 2) and tensor.dtype == torch.float32 and tensor.is_contiguous()
    torch.testing.assert_close(tensor[:, 0, 0], torch.tensor([0.0, 128 / 255, 1.0]))
    torch.testing.assert_close(tensor[:, 0, 1], torch.tensor([10 / 255, 20 / 255, 30 / 255]))


@pytest.mark.parametrize("bad", [np.zeros((4, 4), np.uint8), np.zeros((4, 4, 3), np.float32), [[0]]])
def test_to_tensor_refuses_anything_but_uint8_rgb(bad):
    with pytest.raises(TypeError, match=r"expects an \(H, W, 3\) uint8 RGB array"):
        to_tensor(bad)


def test_default_pipelines_per_task():
    assert _names(build_transforms(None, "detection", True)) == [
        "BBoxSafeRandomCrop", "HorizontalFlip", "ColorJitter"]
    assert _names(build_transforms(None, "detection", True, size=512))[0] == "LongestMaxSize"
    assert _names(build_transforms(None, "detection", False)) == []
    assert _names(build_transforms(None, "segmentation", True)) == [
        "RandomScale", "PadIfNeeded", "RandomCrop", "HorizontalFlip"]
    assert _names(build_transforms(None, "classification", True)) == [
        "RandomResizedCrop", "HorizontalFlip", "ColorJitter"]
    assert _names(build_transforms(None, "classification", False)) == ["SmallestMaxSize", "CenterCrop"]


def test_default_outputs_have_the_promised_sizes():
    image = _image(100, 60)
    cls = build_transforms(None, "classification", True, size=40)
    assert augment(cls, image=image)["image"].shape == (40, 40, 3)
    cls_eval = build_transforms(None, "classification", False, size=40)
    assert augment(cls_eval, image=image)["image"].shape == (40, 40, 3)
    seg = build_transforms(None, "segmentation", True, size=64)
    out = augment(seg, image=image, mask=np.ones((100, 60), np.uint8))
    assert out["image"].shape == (64, 64, 3) and out["mask"].shape == (64, 64)
    det = build_transforms(None, "detection", False, size=50)
    boxes = np.array([[0, 0, 30, 50.0]])
    out = augment(det, image=image, bboxes=boxes, labels=np.array([1]), indices=np.array([0]))
    assert out["image"].shape == (50, 30, 3)  # longest side 100 -> 50, aspect ratio kept
    np.testing.assert_allclose(out["bboxes"], [[0, 0, 15, 25]], atol=1e-4)


def test_spec_from_yaml_list_with_nested_compose():
    spec = [
        {"name": "LongestMaxSize", "max_size": 24},
        {"name": "OneOf", "p": 1.0, "transforms": [{"name": "HorizontalFlip", "p": 1.0}]},
    ]
    pipeline = build_transforms(spec, "detection", train=True)
    image = _image(16, 32)
    out = augment(pipeline, image=image, bboxes=np.array([[0, 0, 8, 8.0]]), labels=np.array([3]),
                  indices=np.array([0]))
    assert out["image"].shape == (12, 24, 3)
    np.testing.assert_allclose(out["bboxes"], [[18, 0, 24, 6]], atol=1e-4)  # scaled by 0.75, then mirrored
    assert np.asarray(out["labels"]).tolist() == [3]


@pytest.mark.parametrize("spec,message", [
    ([{"name": "HorizontalFlp"}],
     r"transforms\[0\]: unknown transform 'HorizontalFlp' \(did you mean 'HorizontalFlip'\?\)"),
    ([{"name": "horizontalflip"}], r"did you mean 'HorizontalFlip'"),
    ([{"name": "HorizontalFlip"}, {"name": "Blur", "blur_lmit": 3}],
     r"transforms\[1\]: Blur has no parameter 'blur_lmit' \(did you mean 'blur_limit'\?\)"),
    ([{"name": "OneOf", "transforms": [{"name": "Nope"}]}],
     r"transforms\[0\]\.transforms\[0\]: unknown transform 'Nope'"),
    ([{"name": "Normalize"}], "models normalise internally"),
    ([{"p": 0.5}], "expected a mapping with a 'name' key"),
    ("HorizontalFlip", "expected a list of transforms"),
    ([{"name": "ColorJitter", "brightness": "x"}], r"transforms\[0\]: ColorJitter: "),
])
def test_bad_specs_give_clear_errors(spec, message):
    with pytest.raises(ValueError, match=message):
        build_transforms(spec, "detection", train=True)


def test_unknown_task_and_setting():
    with pytest.raises(ValueError, match="unknown task 'detect'"):
        build_transforms(None, "detect", True)
    with pytest.raises(ValueError, match=r"setting 'sise' for detection \(did you mean 'size'"):
        build_transforms(None, "detection", True, sise=3)


def test_boxes_are_clipped_and_dropped_below_min_visibility():
    image = _image(20, 20)
    boxes = np.array([[0, 0, 10, 10], [0, 12, 20.5, 18]])  # the second pokes 0.5 px past the border
    data = dict(image=image, bboxes=boxes, labels=np.array([1, 2]), indices=np.array([0, 1]))
    keep = build_transforms([{"name": "Crop", "x_min": 8, "x_max": 20, "y_max": 20}], "detection", True)
    out = augment(keep, **data)  # box 0 keeps 2/10 of its area: above min_visibility 0.1
    np.testing.assert_allclose(out["bboxes"], [[0, 0, 2, 10], [0, 12, 12, 18]], atol=1e-4)
    drop = build_transforms([{"name": "Crop", "x_min": 9, "x_max": 20, "y_max": 20}], "detection", True,
                            min_visibility=0.15)
    out = augment(drop, **data)  # box 0 keeps 1/10: dropped, and its index tells which one went
    assert np.asarray(out["indices"]).astype(int).tolist() == [1]


def test_same_torch_seed_same_sample_different_seed_different_sample():
    pipeline = build_transforms(None, "classification", True, size=24)
    image = _image()

    def sample(seed):
        torch.manual_seed(seed)
        return augment(pipeline, image=image)["image"]

    np.testing.assert_array_equal(sample(3), sample(3))
    assert any(not np.array_equal(sample(3), sample(s)) for s in (4, 5))


class _SameImage(Dataset):
    def __init__(self, image, pipeline):
        self.image, self.transforms = image, pipeline

    def __len__(self):
        return 4

    def __getitem__(self, index):
        return torch.from_numpy(augment(self.transforms, image=self.image)["image"])


def test_dataloader_workers_do_not_repeat_each_other():
    dataset = _SameImage(_image(), build_transforms(None, "classification", True, size=24))

    def run():
        loader = DataLoader(dataset, batch_size=1, num_workers=2, generator=torch.Generator().manual_seed(0))
        return [batch[0] for batch in loader]

    first = run()
    # index 0 goes to worker 0 and index 1 to worker 1: forked copies of one pipeline must still differ
    assert not torch.equal(first[0], first[1])
    assert all(torch.equal(a, b) for a, b in zip(first, run(), strict=True))  # and the run is reproducible


def test_dataset_items_are_reproducible_under_a_seed(tmp_path):
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        Image.fromarray(_image(seed=ord(name))).save(tmp_path / name / "x.png")
    ds = ImageFolderDataset(tmp_path, transforms=build_transforms(None, "classification", True, size=16))
    torch.manual_seed(7)
    first = ds[1][0]
    torch.manual_seed(7)
    assert torch.equal(first, ds[1][0])


@pytest.mark.parametrize("share", [0.0, 0.5, 1.0])
def test_object_crops_place_that_share_of_the_crops_around_a_labelled_pixel(share):
    # one 8 x 8 object in a 400 x 400 scene, 255 (ignore) along the border: a random 64 px crop holds it
    # about 2% of the time; a crop around a labelled pixel always does (255 never counts as one)
    torch.manual_seed(0)
    image, mask = _image(400, 400), np.zeros((400, 400), np.uint8)
    mask[300:308, 40:48] = 3
    mask[:4], mask[-4:] = 255, 255
    pipeline = build_transforms(None, "segmentation", True, size=64, scale=(1.0, 1.0), object_crops=share)
    crops = [augment(pipeline, image=image, mask=mask)["mask"] for _ in range(200)]
    assert {crop.shape for crop in crops} == {(64, 64)}
    hits = sum(bool((crop == 3).any()) for crop in crops)
    if share == 0:
        assert hits < 20
    elif share == 1:
        assert hits == 200
    else:
        assert 70 <= hits <= 130

