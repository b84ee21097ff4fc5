"""One vocabulary (issue 18): one key for backbone weights, one freezing convention (``freeze_at``, stages
frozen from the input), renamed keys refused in configs but migrated in checkpoints, the ImageNet
statistics written once, and every config on the runtime base."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import yaml

from apps.config import ConfigError, build_experiment, from_dict, load_config, load_yaml_with_bases
from apps.tasks import load_model
from detection.models import DetectorConfig, build_detector
from vision.backbones import build_backbone, build_network
from vision.checkpoint import load_checkpoint, save_checkpoint
from vision.classification import Classifier, ClassifierConfig
from vision.layers import IMAGENET_MEAN, IMAGENET_STD, FrozenBatchNorm2d
from vision.segmentation import SegmentationConfig
from vision.weights import WeightsError

ROOT = Path(__file__).resolve().parents[1]
CLASSES = [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}, {"id": 3, "name": "c"}]


def _experiment(task: str, model: dict) -> dict:
    return {"task": task, "model": model, "data": {"train": {"root": "x", "images": "x", "annotations": "x"}}}


@pytest.mark.parametrize("task, old, new, hint", [
    ("classification", "pretrained", "backbone_weights: imagenet", "backbone weights"),
    ("classification", "freeze_backbone", "freeze_at: 5", "freeze_backbone: true = freeze_at: 5"),
    ("detection", "trainable_backbone_layers", "freeze_at: 2", "freeze_at = 5 - trainable_backbone_layers"),
])
def test_a_renamed_key_in_a_config_names_the_new_one(task, old, new, hint):
    with pytest.raises(ConfigError) as caught:
        build_experiment(_experiment(task, {old: 3 if "layers" in old else True}))
    message = str(caught.value)  # the new key with the old value translated
    assert message.startswith(f"model.{old} was renamed: use model.{new} (") and hint in message
    assert "\n" not in message


def test_a_renamed_key_given_as_an_override_is_blamed_on_the_override(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(_experiment("classification", {"backbone": "resnet18"})))
    with pytest.raises(ConfigError, match=r"^override: model\.pretrained was renamed: use model\.backbone_w"):
        load_config(path, ["model.pretrained=imagenet"])
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}: model\.freeze_backbone was renamed"):
        path.write_text(yaml.safe_dump(_experiment("classification", {"freeze_backbone": True})))
        load_config(path)


def test_old_model_dicts_migrate_silently():
    cfg = from_dict(DetectorConfig, {"arch": "faster_rcnn_r18_fpn", "trainable_backbone_layers": 5})
    assert cfg.freeze_at == 0
    assert from_dict(DetectorConfig, {"trainable_backbone_layers": 3}).freeze_at == 2
    assert DetectorConfig().freeze_at == 2  # the old default of 3 trainable stages
    cfg = from_dict(ClassifierConfig, {"pretrained": "imagenet", "freeze_backbone": True})
    assert (cfg.backbone_weights, cfg.freeze_at) == ("imagenet", 5)
    assert from_dict(ClassifierConfig, {"freeze_backbone": False}).freeze_at == 0
    # both spellings: the new one wins
    assert from_dict(ClassifierConfig, {"freeze_backbone": True, "freeze_at": 2}).freeze_at == 2


def test_an_old_classifier_checkpoint_loads_with_its_keys_migrated(tmp_path):
    torch.manual_seed(0)
    model = Classifier(ClassifierConfig(num_classes=3))
    old_keys = {"backbone": "resnet18", "num_classes": 3, "pretrained": None, "dropout": 0.0,
                "freeze_backbone": True, "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}
    path = save_checkpoint({"format": "visiondet", "version": 1, "task": "classification", "model": old_keys,
                            "classes": CLASSES, "preprocess": {"size": 32}, "state_dict": model.state_dict()},
                           tmp_path / "old.pt")
    loaded = load_model(path)
    assert loaded.model.cfg.freeze_at == 5 and loaded.model.cfg.backbone_weights is None
    x = torch.rand(2, 3, 32, 32)
    with torch.inference_mode():
        assert torch.equal(loaded.model(x)[0], model.eval()(x)[0])


@pytest.mark.parametrize("name, freeze_at", [
    ("classifier_shapes.pt", 0), ("faster_rcnn_shapes.pt", 0), ("fast_rcnn_shapes.pt", 0),
])
def test_shipped_checkpoints_read_with_the_new_keys(name, freeze_at):
    ckpt = load_checkpoint(ROOT / "weights" / name)
    # written before the renames (trainable_backbone_layers: 5, freeze_backbone: false) unless re-exported
    cfg = from_dict(ClassifierConfig if ckpt["task"] == "classification" else DetectorConfig, ckpt["model"])
    assert cfg.freeze_at == freeze_at


def test_shipped_classifier_and_detector_still_load_and_run():
    classifier = load_model(ROOT / "weights" / "classifier_shapes.pt")
    with torch.inference_mode():
        logits, _ = classifier.model(torch.rand(1, 3, 64, 64))
    assert logits.shape == (1, len(classifier.classes))
    detector = load_model(ROOT / "weights" / "faster_rcnn_shapes.pt")
    with torch.inference_mode():
        detections, _ = detector.model([torch.rand(3, 128, 160)])
    assert len(detections) == 1


def _frozen(module: torch.nn.Module) -> bool:
    return not any(p.requires_grad for p in module.parameters())


def test_freeze_at_counts_stages_from_the_input_for_every_backbone():
    resnet = build_backbone("resnet18", freeze_at=2)
    assert _frozen(resnet.conv1) and _frozen(resnet.layer1) and not _frozen(resnet.layer2)
    assert isinstance(resnet.bn1, FrozenBatchNorm2d)
    vgg = build_backbone("vgg11", out_features=["conv5"], freeze_at=2)
    convs = [m for m in vgg.features if isinstance(m, torch.nn.Conv2d)]  # vgg11: 1 + 1 convs in blocks 1-2
    assert [_frozen(c) for c in convs[:3]] == [True, True, False]


def test_detector_freeze_at():
    def trainable(freeze_at: int) -> set[str]:
        cfg = DetectorConfig(arch="faster_rcnn_r18_fpn", num_classes=2, freeze_at=freeze_at, fpn_channels=16)
        trunk = build_detector(cfg, load_pretrained=False).backbone.body
        return {name for name in ("conv1", "layer1", "layer2", "layer3", "layer4")
                if not _frozen(getattr(trunk, name))}

    assert trainable(0) == {"conv1", "layer1", "layer2", "layer3", "layer4"}
    assert trainable(2) == {"layer2", "layer3", "layer4"}
    assert trainable(5) == set()


def test_classifier_freeze_at_freezes_the_first_stages_until_unfrozen():
    model = Classifier(ClassifierConfig(num_classes=3, freeze_at=2)).train()
    trunk = model.backbone
    assert _frozen(trunk.conv1) and _frozen(trunk.layer1) and not _frozen(trunk.layer2)
    assert not trunk.bn1.training and not trunk.layer1.training and trunk.layer2.training
    model.unfreeze_backbone()
    model.train()
    assert not _frozen(trunk.conv1) and trunk.bn1.training and trunk.layer1.training
    with pytest.raises(ValueError, match=r"freeze_at must be in 0\.\.5"):
        Classifier(ClassifierConfig(num_classes=3, freeze_at=6))


def test_imagenet_statistics_are_written_once():
    assert ClassifierConfig().mean == SegmentationConfig().mean == IMAGENET_MEAN
    assert tuple(DetectorConfig().std) == SegmentationConfig().std == IMAGENET_STD
    files = [p for package in ("vision", "detection", "apps") for p in (ROOT / package).rglob("*.py")]
    writers = {str(p.relative_to(ROOT)) for p in files if any(v in p.read_text() for v in ("0.485", "0.229"))}
    assert writers == {"vision/layers.py"}


def _bases(path: Path) -> list[Path]:
    data = yaml.safe_load(path.read_text()) or {}
    bases = data.get("base") or []
    chain = []
    for base in [bases] if isinstance(bases, str) else bases:
        chain += [(path.parent / base).resolve(), *_bases((path.parent / base).resolve())]
    return chain


def test_every_config_extends_the_runtime_base():
    runtime = (ROOT / "configs" / "base" / "runtime.yaml").resolve()
    missing = {str(p.relative_to(ROOT / "configs")) for p in (ROOT / "configs").rglob("*.yaml")
               if p != runtime and runtime not in _bases(p)}
    assert missing == set()
    merged = load_yaml_with_bases(ROOT / "configs" / "segmentation" / "deeplabv3plus_r18_shapes_cpu.yaml")
    assert merged["train"]["checkpoint_minutes"] == 10  # from the runtime base


def test_a_config_naming_the_retired_rcnn_task_gets_the_new_spelling(tmp_path):
    config = tmp_path / "old_rcnn.yaml"
    config.write_text("task: rcnn\nmodel: {backbone: resnet18}\n")
    with pytest.raises(ConfigError, match=r"task: rcnn was merged into the detection task.*arch: rcnn_"):
        load_config(config, [])


def test_a_detector_starts_from_the_trunk_of_a_visiondet_classifier():
    # The shipped shapes classifier has no `fc` (its head is its own): a detector never uses one, so the
    # trunk loads (the README tour fine-tunes from it).
    path = ROOT / "weights" / "classifier_shapes.pt"
    trunk = load_checkpoint(path)["state_dict"]
    cfg = DetectorConfig(arch="faster_rcnn_r18_fpn", num_classes=3, backbone_weights=str(path), freeze_at=0)
    loaded = dict(build_detector(cfg).backbone.named_parameters())
    for key in ("conv1.weight", "layer4.1.conv2.weight"):
        assert torch.equal(loaded[f"body.{key}"], trunk[f"backbone.{key}"])
    with pytest.raises(WeightsError, match="missing: fc.weight"):  # a whole classifier still needs its head
        build_network("resnet18", weights=path)
