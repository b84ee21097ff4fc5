"""torchvision's COCO Faster R-CNN files, when a user already has them, are offered by the demo and taken by
`visiondet predict --weights`, converted once into a cached visiondet checkpoint. The file here is a
random-init torchvision model saved under the real file name in a temporary TORCH_HOME: nothing is
downloaded."""

import json
import warnings

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from apps.cli import main
from apps.demo.models import find_checkpoints
from apps.tasks import load_model
from detection.torchvision_weights import COCO_CATEGORIES, hub_checkpoint_dir, resolve_torchvision_coco
from vision.checkpoint import CheckpointError

NAME = "fasterrcnn_resnet50_fpn_coco-258fb6c6.pth"


@pytest.fixture(scope="module")
def torchvision_state():
    torch.manual_seed(0)
    model = torchvision.models.detection.fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None)
    return model.state_dict()


@pytest.fixture
def torch_home(tmp_path, monkeypatch, torchvision_state):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    hub_checkpoint_dir().mkdir(parents=True)
    torch.save(torchvision_state, hub_checkpoint_dir() / NAME)
    return tmp_path / "torch"


def test_the_demo_offers_the_file_found_in_the_hub_cache_without_reading_it(torch_home, tmp_path):
    (tmp_path / "empty").mkdir()
    found, problems = find_checkpoints([tmp_path / "empty"])
    assert problems == []
    assert [c.label for c in found] == ["Faster R-CNN R50-FPN, COCO, 80 classes"]
    entry = found[0]
    assert entry.task == "detection" and entry.arch == "faster_rcnn_r50_fpn"
    assert [c["name"] for c in entry.classes][:3] == ["person", "bicycle", "car"] and len(entry.classes) == 80
    assert not (hub_checkpoint_dir() / "visiondet").exists()  # listing converts nothing


def test_a_bare_file_name_loads_converted_once_with_coco_ids_and_names(torch_home, torchvision_state):
    loaded = load_model(NAME)
    cached = hub_checkpoint_dir() / "visiondet" / "fasterrcnn_resnet50_fpn_coco-258fb6c6.pt"
    assert loaded.path == cached and cached.is_file()
    assert [(c["id"], c["name"]) for c in loaded.classes] == COCO_CATEGORIES
    ours = loaded.model.state_dict()
    assert torch.equal(ours["backbone.body.conv1.weight"], torchvision_state["backbone.body.conv1.weight"])
    assert "COCO" in loaded.checkpoint["trained_on"]
    stamp = cached.stat().st_mtime_ns
    assert resolve_torchvision_coco(NAME) == cached
    assert cached.stat().st_mtime_ns == stamp  # not converted again


def test_predict_takes_the_torchvision_file(torch_home, tmp_path):
    (tmp_path / "photos").mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (96, 128, 3), np.uint8)).save(
        tmp_path / "photos" / "a.jpg")
    out = tmp_path / "out"
    code = main(["predict", "--weights", str(hub_checkpoint_dir() / NAME), "--source",
                 str(tmp_path / "photos"), "--output", str(out), "--score-threshold", "0.0",
                 "--device", "cpu"])
    assert code == 0
    record = json.loads((out / "predictions.jsonl").read_text().splitlines()[0])
    names = {d["name"] for d in record["detections"]}
    assert names and names <= {n for _, n in COCO_CATEGORIES}


def test_a_missing_file_says_where_to_put_it(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "nothing-here"))
    with pytest.raises(CheckpointError, match="put torchvision's file in .*nothing-here.*downloads nothing"):
        load_model(NAME)


def test_a_read_only_torch_home_converts_into_visiondets_cache_and_says_where(torch_home, tmp_path,
                                                                             monkeypatch):
    # hub/checkpoints/visiondet cannot be made (a file stands in its place: unwritable even to root, as a
    # read-only mount is); the conversion goes to the cache's torchvision/ folder instead
    (hub_checkpoint_dir() / "visiondet").write_text("not a folder")
    monkeypatch.delenv("VISIONDET_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    fallback = tmp_path / "cache" / "visiondet" / "torchvision"
    with pytest.warns(UserWarning, match=f"cannot be written.*into {fallback}"):
        cached = resolve_torchvision_coco(NAME)
    assert cached == fallback / "fasterrcnn_resnet50_fpn_coco-258fb6c6.pt" and cached.is_file()
    stamp = cached.stat().st_mtime_ns
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # found there next time: no second conversion, no warning
        assert load_model(NAME).path == cached
    assert cached.stat().st_mtime_ns == stamp
