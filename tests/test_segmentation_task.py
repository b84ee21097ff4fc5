"""The segmentation task in the engine: a tiny train + `visiondet evaluate`, mask folders, config errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from apps.cli import main
from apps.config import ConfigError, build_experiment, load_config
from apps.engine.trainer import train
from apps.tasks import get_task, load_model
from vision.data.synthetic import make_shapes


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    return make_shapes("segmentation", root, num_images=6, seed=0, image_size=(40, 56), val_fraction=0.34)


def experiment(shapes, out, **model):
    return {
        "task": "segmentation",
        "model": {"arch": "fcn_resnet18", "output_stride": 16, "aux_loss": True, **model},
        "data": {
            "train": {"images": str(shapes["train"] / "images"),
                      "annotations": str(shapes["train"] / "annotations.json")},
            "val": {"images": str(shapes["val"] / "images"),
                    "annotations": str(shapes["val"] / "annotations.json")},
            "workers": 0,
            "options": {"crop_size": 32, "scale": [0.8, 1.2]},
        },
        "train": {"epochs": 1, "batch_size": 2, "lr": 0.01, "log_every": 1},
        "output_dir": str(out),
        "device": "cpu",
    }


def test_train_then_evaluate_prints_segmentation_metrics(shapes, tmp_path, capsys):
    result = train(build_experiment(experiment(shapes, tmp_path / "run")))
    assert result.status == "completed"
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in rows if r["kind"] == "val"][-1]
    assert 0.0 <= val["mIoU"] <= 1.0 and "IoU/background" in val and "loss_aux" in rows[0]

    loaded = load_model(tmp_path / "run" / "best.pt")
    assert loaded.task.name == "segmentation" and loaded.model.head.classifier.out_channels == 4
    assert [c["name"] for c in loaded.classes] == ["circle", "square", "triangle"]
    assert loaded.preprocess["size"] is None  # each image at its own size, as validation ran

    out = tmp_path / "eval.json"
    code = main(["evaluate", "--weights", str(tmp_path / "run" / "best.pt"), "--images",
                 str(shapes["val"] / "images"), "--annotations", str(shapes["val"] / "annotations.json"),
                 "--device", "cpu", "--workers", "0", "--batch-size", "2", "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    for text in ("images: 2", "mIoU:", "pixel accuracy:", "frequency-weighted IoU:", "per-class IoU:",
                 "background"):
        assert text in printed
    metrics = json.loads(out.read_text())["metrics"]
    # Evaluation of the same weights on the same split gives the training run's validation figure, at the
    # pixel threshold chosen on that split after training (tests/test_pixel_threshold.py).
    calibration = loaded.preprocess["score_calibration"]
    assert calibration["miou_argmax"] == pytest.approx(val["mIoU"])
    assert metrics["mIoU"] == pytest.approx(calibration["miou"])
    assert metrics["images"] == 2


def test_evaluate_counts_every_pixel_at_its_own_size(shapes):
    # Images of different sizes in one batch: grouped by size, each at full resolution.
    task = get_task("segmentation")
    images = [torch.rand(3, 20, 30), torch.rand(3, 24, 16), torch.rand(3, 20, 30)]
    targets = [torch.zeros(20, 30, dtype=torch.long), torch.ones(24, 16, dtype=torch.long),
               torch.full((20, 30), 255)]

    class Constant(torch.nn.Module):  # predicts class 1 everywhere
        def forward(self, x):
            logits = torch.zeros(x.shape[0], 4, *x.shape[-2:])
            logits[:, 1] = 1
            return logits, {}

    classes = [{"id": 1, "name": "circle"}, {"id": 2, "name": "square"}, {"id": 3, "name": "triangle"}]
    metrics = task.evaluate(Constant(), [task.collate(list(zip(images, targets, strict=True)))],
                            torch.device("cpu"), classes)
    # 600 background pixels predicted 1, 384 class-1 pixels right, 600 ignored.
    assert metrics["images"] == 3
    assert metrics["pixel_acc"] == pytest.approx(384 / 984)
    assert metrics["IoU/background"] == 0.0 and metrics["IoU/circle"] == pytest.approx(384 / 984)
    assert "IoU/square" not in metrics  # never seen nor predicted: no IoU
    assert metrics["mIoU"] == pytest.approx(384 / 984 / 2)


def test_mask_folder_data_with_class_names(tmp_path):
    images, masks = tmp_path / "JPEGImages", tmp_path / "SegmentationClass"
    images.mkdir()
    masks.mkdir()
    for i in range(2):
        Image.fromarray(np.full((32, 32, 3), 90 * i, np.uint8)).save(images / f"{i}.png")
        mask = np.zeros((32, 32), np.uint8)
        mask[8:24, 8:24] = 2
        mask[0] = 255
        Image.fromarray(mask, mode="L").save(masks / f"{i}.png")
    cfg = {"task": "segmentation", "model": {"arch": "fcn_resnet18"},
           "data": {"train": {"images": str(images), "masks": str(masks)}, "options": {"crop_size": 32}}}
    with pytest.raises(ConfigError, match="data.options.classes"):
        load_config(None, [], base=cfg)
    cfg["data"]["options"]["classes"] = ["cat", "dog"]
    exp = load_config(None, [], base=cfg)
    data = get_task("segmentation").build_datasets(exp)
    assert data.classes == [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}]
    image, target = data.train[0]
    assert image.shape == (3, 32, 32) and set(target.unique().tolist()) <= {0, 2, 255}


def test_config_errors_name_the_key(shapes, tmp_path):
    cfg = experiment(shapes, tmp_path / "run")
    cfg["data"]["train"]["masks"] = str(tmp_path)  # both annotations and masks
    with pytest.raises(ConfigError, match="either annotations"):
        load_config(None, [], base=cfg)
    with pytest.raises(ConfigError, match="did you mean 'model.output_stride'"):
        load_config(None, ["model.output_strid=8"], base=experiment(shapes, tmp_path / "run"))
    with pytest.raises(ConfigError, match="model.arch"):
        load_config(None, ["model.arch=unet"], base=experiment(shapes, tmp_path / "run"))
    with pytest.raises(ConfigError, match=r"data.options.object_crops: expected a share in \[0, 1\]"):
        load_config(None, ["data.options.object_crops=1.5"], base=experiment(shapes, tmp_path / "run"))
    exp = load_config(None, ["model.arch=fcn8s_vgg16"], base=experiment(shapes, tmp_path / "run"))
    with pytest.raises(ConfigError, match="auxiliary head"):
        get_task("segmentation").build_model(exp.model, [{"id": 1, "name": "a"}])


@pytest.mark.parametrize(
    "name", ["deeplabv3plus_r18_shapes_cpu", "fcn8s_vgg16_voc", "deeplabv3_r50", "pspnet_r50"]
)
def test_shipped_configs_parse_and_their_pipelines_build(name):
    from pathlib import Path

    from apps.config import load_yaml_with_bases
    from vision.data.transforms import build_transforms

    path = Path(__file__).resolve().parents[1] / "configs" / "segmentation" / f"{name}.yaml"
    exp = build_experiment(load_yaml_with_bases(path))  # every key and type checked (data files are not)
    assert exp.task == "segmentation" and exp.model.arch.split("_")[0] in name
    opts = exp.data.options
    build_transforms(exp.data.train.transforms, "segmentation", True, size=opts.crop_size,
                     scale=tuple(opts.scale), object_crops=opts.object_crops)
