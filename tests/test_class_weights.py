"""Class-weighted segmentation loss: pixel shares, ENet's weights, the loss, ``model.class_weights: auto``."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from apps.config import ConfigError, load_config
from apps.engine.trainer import train
from apps.tasks import get_task, load_model
from vision.data.synthetic import make_shapes
from vision.segmentation import SegmentationConfig, build_segmentation_model, segmentation_loss
from vision.segmentation.class_weights import enet_weights, fit_class_weights, pixel_shares


def test_pixel_shares_count_every_labelled_pixel_and_no_ignored_one():
    first = np.array([[0, 0, 1], [255, 255, 2]], np.uint8)
    second = np.zeros((2, 2), np.uint8)
    shares = pixel_shares([first, second], 4)
    np.testing.assert_allclose(shares, [6 / 8, 1 / 8, 1 / 8, 0])
    with pytest.raises(ValueError, match="label 4 outside 0..3"):
        pixel_shares([np.array([[4]], np.uint8)], 4)
    with pytest.raises(ValueError, match="no labelled pixel"):
        pixel_shares([np.full((2, 2), 255, np.uint8)], 4)


def test_enet_weights_are_bounded_and_favour_rare_classes():
    weights = enet_weights(np.array([0.9, 0.09, 0.01, 0.0]))
    np.testing.assert_allclose(weights, 1 / np.log(1.02 + np.array([0.9, 0.09, 0.01, 0.0])))
    assert list(weights) == sorted(weights)  # the rarer, the heavier
    assert weights[-1] == pytest.approx(1 / math.log(1.02))  # an absent class: about 50, not infinite


def test_weighted_loss_is_the_weighted_mean_over_labelled_pixels():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 5, 6)
    targets = torch.randint(0, 3, (2, 5, 6))
    targets[0, :2] = 255
    weight = torch.tensor([0.5, 2.0, 8.0])
    expected = F.cross_entropy(logits, targets, weight=weight, ignore_index=255)
    assert torch.allclose(segmentation_loss(logits, targets, weight=weight), expected)
    assert torch.allclose(segmentation_loss(logits, targets, weight=torch.ones(3)),
                          segmentation_loss(logits, targets))
    assert not torch.allclose(segmentation_loss(logits, targets, weight=weight),
                              segmentation_loss(logits, targets))
    nothing = segmentation_loss(logits, torch.full_like(targets, 255), weight=weight)
    assert nothing.item() == 0.0


@pytest.mark.parametrize("aux", [False, True])
def test_the_model_weights_its_losses_and_keeps_its_state_dict(aux):
    cfg = dict(arch="fcn_resnet18", num_classes=2, output_stride=16, aux_loss=aux)
    torch.manual_seed(0)
    plain = build_segmentation_model(SegmentationConfig(**cfg)).eval()
    weighted = build_segmentation_model(SegmentationConfig(**cfg, class_weights=(1.0, 4.0, 16.0))).eval()
    weighted.load_state_dict(plain.state_dict())  # the same keys: the weights are not a saved buffer
    images = torch.rand(2, 3, 32, 32)
    targets = torch.randint(0, 3, (2, 32, 32))
    targets[:, 0] = 255
    logits, losses = weighted(images, targets)
    expected = F.cross_entropy(logits, targets, weight=torch.tensor([1.0, 4.0, 16.0]), ignore_index=255)
    assert torch.allclose(losses["loss_seg"], expected)
    assert not torch.allclose(losses["loss_seg"], plain(images, targets)[1]["loss_seg"])
    assert ("loss_aux" in losses) == aux


@pytest.mark.parametrize("weights, error", [("auto", "'auto' are fitted to the training masks"),
                                             ((1.0, 2.0), "expected 3 positive numbers"),
                                             ((1.0, 0.0, 2.0), "expected 3 positive numbers")])
def test_the_builder_refuses_unfitted_or_miscounted_weights(weights, error):
    cfg = SegmentationConfig(arch="fcn_resnet18", num_classes=2, class_weights=weights)
    with pytest.raises(ValueError, match=error):
        build_segmentation_model(cfg)


def mask_folder(root, count=4, size=32):
    """``count`` images with a large class-1 square and a small class-2 square; 255 on the top row."""
    images, masks = root / "images", root / "masks"
    images.mkdir(parents=True)
    masks.mkdir()
    for i in range(count):
        Image.fromarray(np.full((size, size, 3), 40 * i, np.uint8)).save(images / f"{i}.png")
        mask = np.zeros((size, size), np.uint8)
        mask[4:20, 4:20] = 1
        mask[24:28, 24:28] = 2
        mask[0] = 255
        Image.fromarray(mask, mode="L").save(masks / f"{i}.png")
    return images, masks


def experiment(images, masks, out=None):
    cfg = {"task": "segmentation",
           "model": {"arch": "fcn_resnet18", "output_stride": 16, "class_weights": "auto"},
           "data": {"train": {"images": str(images), "masks": str(masks)}, "workers": 0,
                    "options": {"crop_size": 32, "scale": [1.0, 1.0], "classes": ["big", "small"]}},
           "train": {"epochs": 1, "batch_size": 2, "lr": 0.01, "log_every": 1}, "device": "cpu"}
    if out is not None:
        cfg["output_dir"] = str(out)
    return load_config(None, [], base=cfg)


def test_auto_weights_come_from_the_training_masks(tmp_path):
    images, masks = mask_folder(tmp_path)
    (masks / "3.png").write_bytes(b"not a png")  # one unreadable mask: skipped and counted, not fatal
    exp = experiment(images, masks)
    task = get_task("segmentation")
    data = task.build_datasets(exp)
    fitted, lines = task.fit_to_data(exp, data)
    labelled = 31 * 32  # the top row is ignore
    shares = np.array([labelled - 256 - 16, 256, 16]) / labelled
    assert fitted.model.class_weights == pytest.approx(tuple(1 / np.log(1.02 + shares)), abs=1e-4)
    assert "fitted to 3 of 4 training masks" in lines[0] and "1 unreadable masks skipped" in lines[0]
    assert "3.png" in lines[0] and "small" in lines[0]
    plain = replace(exp, model=replace(exp.model, class_weights=None))
    assert task.fit_to_data(plain, data) == (plain, [])


def test_auto_weights_from_coco_polygons(tmp_path):
    shapes = make_shapes("segmentation", tmp_path, num_images=4, seed=0, image_size=(40, 56),
                         val_fraction=0.25)
    task = get_task("segmentation")
    exp = load_config(None, [], base={
        "task": "segmentation", "model": {"arch": "fcn_resnet18", "class_weights": "auto"},
        "data": {"train": {"images": str(shapes["train"] / "images"),
                           "annotations": str(shapes["train"] / "annotations.json")}}})
    data = task.build_datasets(exp)
    fitted, lines = task.fit_to_data(exp, data)
    shares = pixel_shares((data.train.index_map(i) for i in range(len(data.train))), 4)
    assert fitted.model.class_weights == pytest.approx(tuple(enet_weights(shares)), abs=1e-4)
    assert f"fitted to {len(data.train)} of {len(data.train)} training masks" in lines[0]


def test_fit_class_weights_reads_an_even_spread_of_masks():
    class Maps:
        def __init__(self):
            self.read = []

        def __len__(self):
            return 10

        def index_map(self, index):
            self.read.append(index)
            return np.full((2, 2), index % 2, np.uint8)

    maps = Maps()
    weights, line = fit_class_weights(maps, ["background", "thing"], max_masks=4)
    assert maps.read == [0, 3, 6, 9] and "fitted to 4 of 10 training masks" in line
    assert weights == pytest.approx(tuple(1 / np.log(1.02 + np.array([0.5, 0.5]))), abs=1e-4)


def test_a_run_with_auto_weights_saves_the_fitted_numbers(tmp_path):
    images, masks = mask_folder(tmp_path / "data")
    result = train(experiment(images, masks, tmp_path / "run"))
    assert result.status == "completed"
    loaded = load_model(tmp_path / "run" / "last.pt")
    weights = loaded.model.class_weights
    assert weights is not None and weights.shape == (3,) and weights[2] > weights[1] > weights[0]
    with pytest.raises(ConfigError, match="model.class_weights"):
        load_config(None, ["model.class_weights=heavy"], base={"task": "segmentation"})
