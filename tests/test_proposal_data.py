"""Proposals are data: attached per stored image before augmentation, moved with the boxes, computed once."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from apps.config import build_experiment
from apps.engine.trainer import train
from detection.models import ExternalProposals
from detection.proposal_data import EXTRA_BOXES, ProposalDataset
from detection.proposals import (
    CachedSource,
    ProposalFile,
    ProposalRecord,
    ProposalSource,
    write_proposal_file,
)
from detection.transform import scale_boxes
from vision.data.coco import CocoDetection
from vision.data.synthetic import make_shapes
from vision.data.transforms import build_transforms

FLIP = [{"name": "HorizontalFlip", "p": 1.0}]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes_props")
    return make_shapes("detection", root, num_images=5, seed=3, image_size=(64, 96), val_fraction=0.2)


def _images(split) -> list[dict]:
    return json.loads((split / "annotations.json").read_text())["images"]


def _file_proposals(split, path, *, by="id"):
    """A proposal file whose boxes differ per image (image i: boxes shifted by i), keyed by id or name."""
    records, rows = {}, []
    for i, img in enumerate(_images(split)):
        w, h = img["width"], img["height"]
        boxes = np.array([[1.0 + i, 2.0, 21.0 + i, 30.0], [w / 2, 0.0, w - 3.0, h / 2], [0, 0, w, h]],
                         np.float32)
        records[img["id"]] = boxes
        # `visiondet proposals` without annotations keys images by their relative path
        key = img["id"] if by == "id" else img["file_name"]
        rows.append(ProposalRecord(key, boxes, file_name="" if by == "id" else img["file_name"]))
    write_proposal_file(path, rows)
    return records


def test_a_flipped_fast_rcnn_epoch_trains_on_the_files_boxes_flipped(shapes, tmp_path, monkeypatch):
    torch.set_num_threads(1)
    split = shapes["train"]
    records = _file_proposals(split, tmp_path / "props.json")
    widths = {img["id"]: img["width"] for img in _images(split)}
    seen: list[torch.Tensor] = []
    forward = ExternalProposals.forward

    def recording(self, batch, features, targets=None, proposals=None):
        # back from the detector's resize to the augmented image's pixels
        for p, size, original in zip(proposals, batch.image_sizes, batch.original_sizes, strict=True):
            seen.append(scale_boxes(p, size, original))
        return forward(self, batch, features, targets, proposals)

    monkeypatch.setattr(ExternalProposals, "forward", recording)
    model = {"arch": "fast_rcnn_r18_fpn", "frozen_bn": False, "min_size": 48, "max_size": 80,
             "fpn_channels": 16, "proposals": {"method": "file", "file": str(tmp_path / "props.json")},
             "roi": {"representation_size": 16, "batch_size_per_image": 8}}
    exp = build_experiment({
        "task": "detection", "model": model, "output_dir": str(tmp_path / "run"), "device": "cpu",
        "data": {"train": {"images": str(split / "images"), "annotations": str(split / "annotations.json"),
                           "transforms": FLIP}, "workers": 0},
        "train": {"epochs": 1, "batch_size": 2, "lr": 0.001, "log_every": 1},
    })
    assert train(exp).status == "completed"
    # 4 training images, batches of 2: every image seen once, with its own boxes mirrored (x -> W - x)
    expected = []
    for image_id, boxes in records.items():
        w = widths[image_id]
        expected.append(np.stack([w - boxes[:, 2], boxes[:, 1], w - boxes[:, 0], boxes[:, 3]], axis=1))
    got = sorted((p.numpy().round(3).tolist() for p in seen), key=str)
    assert len(seen) == 4
    assert got == sorted((e.round(3).tolist() for e in expected), key=str)
    # without the flip the file's boxes arrive as they are: the flip above really moved them
    assert all(not np.allclose(p.numpy(), records[i]) for p, i in zip(seen, records, strict=False))


def test_proposals_are_found_by_file_name(shapes, tmp_path):
    split = shapes["train"]
    records = _file_proposals(split, tmp_path / "props.npz", by="name")
    data = ProposalDataset(CocoDetection(split / "images", split / "annotations.json"),
                           ProposalFile(tmp_path / "props.npz"))
    for i in range(len(data)):
        _, target = data[i]
        assert np.allclose(target["proposals"].numpy(), records[target["image_id"]])
        assert target["crowd_boxes"].shape == (0, 4)


class CountingSource(ProposalSource):
    """Boxes that depend on the pixels (so augmented pixels would give others); counts its calls."""

    def __init__(self):
        self.calls = 0

    def settings(self):
        return {"source": "counting"}

    def propose(self, image, image_id=None):
        self.calls += 1
        h, w = image.shape[:2]
        bright = float(np.asarray(image, np.float32).mean())
        return torch.tensor([[0.0, 0.0, w / 2, h / 2], [w / 4, h / 4, w - 1.0, h - 1.0],
                             [bright % 5, 0.0, bright % 5 + 10, 10.0]])


def test_a_computed_source_runs_once_per_stored_image_and_the_cache_is_bounded(shapes, tmp_path):
    split = shapes["train"]
    counting = CountingSource()
    cached = CachedSource(counting, tmp_path / "cache")
    spec = [*FLIP, {"name": "ColorJitter", "brightness": 0.5, "p": 1.0}]
    transforms = build_transforms(spec, "detection", True, extra_boxes=EXTRA_BOXES)
    data = ProposalDataset(CocoDetection(split / "images", split / "annotations.json"), cached, transforms)
    stored = ProposalDataset(CocoDetection(split / "images", split / "annotations.json"), counting)
    for epoch in range(3):
        for i in range(len(data)):
            torch.manual_seed(epoch * 100 + i)  # a different colour jitter every epoch
            image, target = data[i]
            w = image.shape[-1]
            raw = stored[i][1]["proposals"]  # from the stored pixels, un-augmented
            flipped = torch.stack([w - raw[:, 2], raw[:, 1], w - raw[:, 0], raw[:, 3]], dim=1)
            assert torch.allclose(target["proposals"], flipped, atol=1e-3)
    n = len(data)
    assert cached.misses == n and cached.hits == 2 * n  # computed once per image, whatever the jitter
    assert len(list((tmp_path / "cache").glob("??/*.npy"))) == n
    small = CachedSource(CountingSource(), tmp_path / "small", max_entries=2)
    for i in range(n):
        small.propose(np.full((8, 8, 3), i, np.uint8))
    assert len(list((tmp_path / "small").glob("??/*.npy"))) <= 2


def test_a_missing_image_in_the_file_is_one_clear_error(shapes, tmp_path):
    split = shapes["train"]
    write_proposal_file(tmp_path / "other.json", [ProposalRecord(9999, np.zeros((1, 4), np.float32) + 1)])
    data = ProposalDataset(CocoDetection(split / "images", split / "annotations.json"),
                           ProposalFile(tmp_path / "other.json"))
    with pytest.raises(ValueError, match=r"other.json: no proposals for image id \d+ \(.+\.\w+\)"):
        data[0]
