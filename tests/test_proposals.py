"""Proposal sources (selective search, files, cache) and proposal recall."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
import torch
from sklearn.datasets import load_sample_image

from detection.proposals import (
    CachedSource,
    ProposalError,
    ProposalFile,
    ProposalRecord,
    ProposalSource,
    SelectiveSearch,
    image_sha1,
    to_uint8_image,
    write_proposal_file,
)
from detection.recall import format_recall, proposal_recall


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    """A real photograph that ships with scikit-learn, shrunk so selective search takes ~0.1 s."""
    image = load_sample_image("china.jpg")  # (427, 640, 3) uint8 RGB
    return cv2.resize(image, (128, 96), interpolation=cv2.INTER_AREA)


def test_selective_search_runs_on_a_real_photo(photo):
    boxes = SelectiveSearch(mode="fast", max_boxes=None).propose(photo)
    assert boxes.dtype == torch.float32 and boxes.ndim == 2 and boxes.shape[1] == 4
    assert len(boxes) > 50  # OpenCV finds ~180 regions on this picture
    assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
    assert boxes[:, 0::2].min() >= 0 and boxes[:, 0::2].max() <= 128
    assert boxes[:, 1::2].min() >= 0 and boxes[:, 1::2].max() <= 96
    assert len(torch.unique(boxes, dim=0)) == len(boxes)
    # the whole image is the root of the hierarchy, so it is always among the regions
    assert (boxes == torch.tensor([0.0, 0.0, 128.0, 96.0])).all(dim=1).any()


def test_selective_search_modes_and_limits(photo):
    fast = SelectiveSearch(mode="fast", max_boxes=None).propose(photo)
    quality = SelectiveSearch(mode="quality", max_boxes=None).propose(photo)
    assert len(quality) > 2 * len(fast)  # quality runs more strategies and colour spaces
    limited = SelectiveSearch(mode="fast", max_boxes=20, min_size=16).propose(photo)
    assert len(limited) == 20
    assert ((limited[:, 2:] - limited[:, :2]).min(dim=1).values >= 16).all()
    # segmenting a half-size copy still gives boxes in the full image's pixels
    big = cv2.resize(photo, (256, 192), interpolation=cv2.INTER_LINEAR)
    scaled = SelectiveSearch(mode="fast", max_boxes=None, max_side=128).propose(big)
    assert scaled[:, 2].max() == 256 and scaled[:, 3].max() == 192
    with pytest.raises(ValueError, match="mode"):
        SelectiveSearch(mode="slow")


def test_tensor_and_array_inputs_agree(photo):
    tensor = torch.from_numpy(photo).permute(2, 0, 1).float() / 255
    assert np.array_equal(to_uint8_image(tensor), photo)
    assert image_sha1(to_uint8_image(tensor)) == image_sha1(photo)
    assert image_sha1(photo) != image_sha1(photo[:, ::-1])


def test_proposal_file_reads_coco_style_json(tmp_path):
    path = tmp_path / "props.json"
    path.write_text(json.dumps([
        {"image_id": 7, "bbox": [10, 20, 30, 40], "score": 0.2},
        {"image_id": 7, "bbox": [0, 0, 5, 5], "score": 0.9},
        {"image_id": "a.jpg", "bbox": [1, 2, 3, 4]},
    ]))
    source = ProposalFile(path)
    # xywh -> xyxy, and a results-style file is ranked by score
    assert source.propose(None, image_id=7).tolist() == [[0, 0, 5, 5], [10, 20, 40, 60]]
    assert source.propose(None, image_id="7").shape == (2, 4)
    assert source.propose(None, image_id="a.jpg").tolist() == [[1, 2, 4, 6]]
    with pytest.raises(ProposalError, match="props.json.*image id 8"):
        source.propose(None, image_id=8)


@pytest.mark.parametrize("suffix", [".json", ".npz"])
def test_proposal_file_round_trip(tmp_path, photo, suffix):
    boxes = np.array([[1.5, 2, 30, 40], [0, 0, 128, 96]], np.float32)
    records = [
        ProposalRecord(3, boxes, None, "photo.jpg", image_sha1(photo)),
        ProposalRecord(4, np.zeros((0, 4), np.float32), None, "empty.jpg", ""),
    ]
    path = write_proposal_file(tmp_path / f"props{suffix}", records)
    source = ProposalFile(path, max_boxes=1)
    assert torch.equal(source.propose(None, image_id=3), torch.from_numpy(boxes[:1]))
    assert source.propose(None, image_id=4).shape == (0, 4)
    # no id (predict time): found by the sha1 of the pixels
    assert torch.equal(source.propose(photo), torch.from_numpy(boxes[:1]))
    with pytest.raises(ProposalError, match="pixel sha1"):
        source.propose(photo[::-1].copy())


def test_proposal_file_errors_name_the_file(tmp_path):
    with pytest.raises(ProposalError, match="missing.npz: no such"):
        ProposalFile(tmp_path / "missing.npz")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ProposalError, match="bad.json: not a readable proposal file"):
        ProposalFile(bad)
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps([{"image_id": 1, "bbox": [1, 2]}]))
    with pytest.raises(ProposalError, match="wrong.json: proposal 0 needs"):
        ProposalFile(wrong)
    with pytest.raises(ProposalError, match="must end in .json or .npz"):
        write_proposal_file(tmp_path / "p.txt", [])


class CountingSource(ProposalSource):
    def __init__(self, size: int = 3) -> None:
        self.calls = 0
        self.size = size

    def settings(self):
        return {"source": "counting", "size": self.size}

    def propose(self, image, image_id=None):
        self.calls += 1
        return torch.tensor([[0.0, 0.0, self.size, self.size]])


def test_cache_hit_avoids_recompute(tmp_path, photo):
    inner = CountingSource()
    cached = CachedSource(inner, tmp_path / "cache")
    first = cached.propose(photo)
    second = cached.propose(photo.copy())  # another array with the same pixels
    assert inner.calls == 1 and (cached.hits, cached.misses) == (1, 1)
    assert torch.equal(first, second)
    cached.propose(photo[:, ::-1].copy())  # other pixels: computed
    assert inner.calls == 2
    # a second model with the same settings reuses the files; other settings do not
    again = CachedSource(CountingSource(), tmp_path / "cache")
    again.propose(photo)
    assert again.source.calls == 0 and again.hits == 1
    other = CachedSource(CountingSource(size=5), tmp_path / "cache")
    assert other.propose(photo).tolist() == [[0, 0, 5, 5]] and other.source.calls == 1
    # a damaged entry is recomputed instead of failing the run
    cached.path_for(photo).write_bytes(b"garbage")
    assert torch.equal(cached.propose(photo), first) and inner.calls == 3


def test_the_cache_evicts_the_least_recently_used_entries_first(tmp_path):
    # a burst of writes and hits, as fast as a worker goes: entries are ordered by use, not by creation or
    # by the kernel's coarse file times
    image = lambda i: np.full((8, 8, 3), i, np.uint8)  # noqa: E731
    cached = CachedSource(CountingSource(), tmp_path, max_entries=5)
    for i in range(5):  # 0..4: the cache is full
        cached.propose(image(i))
    cached.propose(image(0))  # hits: 0 and 1 used again, after 2, 3 and 4
    cached.propose(image(1))
    cached.propose(image(5))  # a sixth entry: down to 4, the two least recently used (2 and 3) go
    kept = {i for i in range(6) if cached.path_for(image(i)).is_file()}
    assert kept == {0, 1, 4, 5}
    cached.propose(image(4))
    cached.propose(image(2))  # recomputed (a miss) and written: 5 entries, no eviction yet
    cached.propose(image(6))  # 6 again: 0 and 1 are now the least recently used
    assert {i for i in range(7) if cached.path_for(image(i)).is_file()} == {2, 4, 5, 6}
    assert (cached.hits, cached.misses) == (3, 8)


def test_two_processes_sharing_a_cache_folder_keep_it_bounded(tmp_path):
    # each worker has its own CachedSource: the bound holds for the folder, not per worker
    image = lambda i: np.full((8, 8, 3), i, np.uint8)  # noqa: E731
    workers = [CachedSource(CountingSource(), tmp_path, max_entries=4) for _ in range(2)]
    for i in range(12):
        workers[i % 2].propose(image(i))
        assert len(list(tmp_path.glob("??/*.npy"))) <= 4
    # the newest survive, whichever worker wrote them (at 5 entries the oldest two went, down to 3)
    assert cached_ids(workers[0], image, range(12)) == {8, 9, 10, 11}


def cached_ids(cached, image, ids) -> set[int]:
    return {i for i in ids if cached.path_for(image(i)).is_file()}


def test_cached_selective_search_is_repeatable(tmp_path, photo):
    # OpenCV ranks regions randomly; the cache is what makes a second epoch see the same order
    cached = CachedSource(SelectiveSearch(mode="fast", max_boxes=100), tmp_path)
    assert torch.equal(cached.propose(photo), cached.propose(photo))
    assert cached.misses == 1 and cached.hits == 1


def test_recall_hand_computed():
    gts = [torch.tensor([[0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0]]), torch.zeros(0, 4),
           torch.tensor([[0.0, 0.0, 10.0, 10.0]])]
    props = [
        # IoU with gt 0: 0.6 (box 0), 1.0 (box 1); gt 1 never covered
        torch.tensor([[0.0, 0.0, 10.0, 6.0], [0.0, 0.0, 10.0, 10.0]]),
        torch.tensor([[0.0, 0.0, 5.0, 5.0]]),
        torch.zeros(0, 4),  # no proposal at all: its object is missed
    ]
    recall = proposal_recall(props, gts, top_k=(1, 2), iou_thresholds=(0.5, 0.7))
    assert recall == {(1, 0.5): 1 / 3, (1, 0.7): 0.0, (2, 0.5): 1 / 3, (2, 0.7): 1 / 3}
    assert "R@0.50" in format_recall(recall)
    assert np.isnan(proposal_recall([torch.zeros(0, 4)], [torch.zeros(0, 4)])[(300, 0.5)])


def test_proposals_command_writes_resumes_and_reports_recall(tmp_path, photo, capsys):
    from apps.cli import main

    images = tmp_path / "images"
    images.mkdir()
    cv2.imwrite(str(images / "a.png"), photo[:, :, ::-1])
    cv2.imwrite(str(images / "b.png"), photo[::-1, :, ::-1])
    (images / "broken.png").write_bytes(b"not a png")
    coco = {
        "images": [{"id": 1, "file_name": "a.png", "width": 128, "height": 96},
                   {"id": 2, "file_name": "b.png", "width": 128, "height": 96}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 128, 96], "iscrowd": 0}],
        "categories": [{"id": 1, "name": "thing"}],
    }
    (tmp_path / "ann.json").write_text(json.dumps(coco))
    out = tmp_path / "props.npz"
    args = ["proposals", "--images", str(images), "--out", str(out), "--max-boxes", "50",
            "--annotations", str(tmp_path / "ann.json")]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "2 images" in text and "2 computed, 0 from the cache" in text
    assert "1.000" in text  # the whole-image box is always proposed: the one object is found at any IoU
    source = ProposalFile(out)
    assert source.propose(None, image_id=1).shape[0] == 50
    assert torch.equal(source.propose(photo), source.propose(None, image_id=1))  # found by pixels too
    # a second run (or a run resumed after an interruption) takes every image from the cache
    out.unlink()
    assert main(args) == 0
    assert "0 computed, 2 from the cache" in capsys.readouterr().out
    # without annotations: ids are file names; an unreadable image stops the run with one line naming it
    assert main(["proposals", "--images", str(images), "--out", str(tmp_path / "p.json")]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"error: {images / 'broken.png'}: ") and "visiondet data check" in err
    assert not (tmp_path / "p.json").exists()
    # ... or, asked to, is skipped and counted
    assert main(["proposals", "--images", str(images), "--out", str(tmp_path / "p.json"),
                 "--skip-unreadable"]) == 0
    assert "1 unreadable image(s) skipped" in capsys.readouterr().err
    assert ProposalFile(tmp_path / "p.json").propose(None, image_id="b.png").shape[1] == 4


def test_rpn_of_a_faster_rcnn_as_a_proposal_source(tmp_path, photo, tiny_detector):
    from detection.proposals import RPNProposals

    rpn = {"anchor_sizes": [[16], [32], [64], [128], [256]], "post_nms_top_n_test": 30}
    detector = tiny_detector(rpn=rpn)
    source = RPNProposals(detector)
    boxes = source.propose(photo)  # a 128x96 photo, resized to 85x64 inside: boxes come back in 128x96 pixels
    assert detector.training  # the source restores the detector's mode
    assert 0 < len(boxes) <= 30 and boxes.dtype == torch.float32
    assert boxes[:, 2].max() <= 128 and boxes[:, 3].max() <= 96 and boxes[:, 2].max() > 85
    tensor = torch.from_numpy(photo).permute(2, 0, 1).float() / 255
    assert torch.allclose(source.propose(tensor), boxes)
    cached = CachedSource(source, tmp_path)
    assert torch.equal(cached.propose(photo), cached.propose(photo)) and cached.hits == 1
    # other weights, other cache entries
    with torch.no_grad():
        detector.proposal_generator.head.cls_logits.bias.add_(1.0)
    assert RPNProposals(detector).settings() != source.settings()
    with pytest.raises(ValueError, match="RegionProposalNetwork"):
        RPNProposals(torch.nn.Linear(1, 1))
