"""Classification end to end through the command line: `visiondet train` on a tiny ImageFolder set the test
writes, `visiondet evaluate` on its validation folder (checked against predictions made by hand), and the
two-phase transfer-learning schedule (frozen trunk, then unfrozen on resume with more epochs)."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import yaml

from apps.cli import main
from apps.tasks import load_model
from vision.checkpoint import load_checkpoint
from vision.data.folder import ImageFolderDataset
from vision.data.transforms import build_transforms

COLOURS = {"blue": (40, 60, 220), "green": (40, 200, 60), "red": (220, 50, 40)}


def write_folder(root: Path, per_class: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    for name, colour in COLOURS.items():
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            image = np.clip(np.array(colour) + rng.normal(0, 25, (32, 32, 3)), 0, 255).astype(np.uint8)
            cv2.imwrite(str(root / name / f"{i}.png"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    return root


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("colours")
    write_folder(root / "train", per_class=4, seed=0)
    write_folder(root / "val", per_class=2, seed=1)
    config = {
        "base": str(Path(__file__).resolve().parents[1] / "configs" / "base" / "classification.yaml"),
        "model": {"backbone": "resnet18"},
        "data": {"train": {"root": str(root / "train"), "transforms": [{"name": "HorizontalFlip", "p": 0.5}]},
                 "val": {"root": str(root / "val")}, "workers": 0, "options": {"size": 32}},
        "train": {"epochs": 2, "batch_size": 4, "lr": 0.05, "log_every": 1},
        "device": "cpu",
    }
    (root / "exp.yaml").write_text(yaml.safe_dump(config))
    return root


@pytest.fixture(scope="module")
def trained(data) -> Path:
    run = data / "run"
    assert main(["train", str(data / "exp.yaml"), f"output_dir={run}", "seed=1"]) == 0
    return run


def test_train_then_evaluate_matches_predictions_made_by_hand(data, trained, tmp_path, capsys):
    run = trained
    best = load_checkpoint(run / "best.pt")
    assert best["task"] == "classification" and best["preprocess"] == {"size": 32}
    assert best["classes"] == [{"id": i, "name": name} for i, name in enumerate(["blue", "green", "red"])]
    assert best["model"]["num_classes"] == 3 and best["model"]["backbone"] == "resnet18"
    assert {"top1", "top3", "mean_class_acc", "acc/red"} <= set(best["metrics"])

    out = tmp_path / "metrics.json"
    capsys.readouterr()
    assert main(["evaluate", "--weights", str(run / "best.pt"), "--root", str(data / "val"),
                 "--out", str(out), "--workers", "0", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "per-class accuracy:" in printed and "top1:" in printed
    metrics = json.loads(out.read_text())["metrics"]

    # the same figures from predictions made here, one image at a time
    model = load_model(run / "best.pt", "cpu").model
    evaluation = build_transforms(None, "classification", False, size=32)
    folder = ImageFolderDataset(data / "val", transforms=evaluation)
    hits = {name: 0 for name in COLOURS}
    with torch.inference_mode():
        for i in range(len(folder)):
            image, label = folder[i]
            logits, _ = model(image[None])
            hits[folder.classes[label]["name"]] += int(logits.argmax(1).item() == label)
    assert metrics["images"] == 6
    assert metrics["top1"] == pytest.approx(sum(hits.values()) / 6)
    for name, count in hits.items():
        assert metrics[f"acc/{name}"] == pytest.approx(count / 2)
    assert metrics["top3"] == 1.0  # three classes: the right one is always among the top three
    assert metrics["top1"] == pytest.approx(best["metrics"]["top1"])  # what training measured


def test_evaluate_errors_name_the_problem(data, trained, tmp_path, capsys):
    run = trained
    capsys.readouterr()
    assert main(["evaluate", "--weights", str(run / "last.pt"), "--workers", "0"]) == 2
    assert "--root: required" in capsys.readouterr().err
    odd = write_folder(tmp_path / "odd", per_class=1, seed=2)
    (odd / "red").rename(odd / "purple")
    assert main(["evaluate", "--weights", str(run / "last.pt"), "--root", str(odd), "--workers", "0"]) == 2
    assert "class folders ['purple'] are not among the model's classes" in capsys.readouterr().err
    assert main(["evaluate", "--weights", str(tmp_path / "none.pt"), "--root", str(odd)]) == 2
    assert "no such checkpoint file" in capsys.readouterr().err
    assert main(["train", str(data / "exp.yaml"), "train.epoch=3"]) == 2
    assert "did you mean 'train.epochs'" in capsys.readouterr().err


def test_transfer_learning_trains_the_head_first_then_everything(data, trained, tmp_path):
    first = trained
    start = load_checkpoint(first / "last.pt")["state_dict"]

    run = tmp_path / "transfer"
    settings = [f"weights={first / 'last.pt'}", "model.freeze_at=5", "train.unfreeze_at_epoch=1",
                "train.backbone_lr_mult=0.1", f"output_dir={run}", "train.epochs=1"]
    assert main(["train", str(data / "exp.yaml"), *settings]) == 0
    phase1 = load_checkpoint(run / "last.pt")["state_dict"]
    trunk = [k for k in start if k.startswith("backbone.")]
    assert all(torch.equal(phase1[k], start[k]) for k in trunk)  # weights and BatchNorm statistics
    assert not torch.equal(phase1["head.weight"], start["head.weight"])

    assert main(["train", "--resume", str(run), "--force", "train.epochs=2"]) == 0  # one more epoch: phase 2
    phase2 = load_checkpoint(run / "last.pt")
    assert phase2["train_state"]["epoch"] == 2
    assert not torch.equal(phase2["state_dict"]["backbone.conv1.weight"], start["backbone.conv1.weight"])
    assert "backbone unfrozen" in (run / "train.log").read_text()
