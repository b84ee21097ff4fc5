"""``anchor_sizes: auto`` at scale: the boxes come from the dataset's arrays (the same boxes a second parse of
the JSON gives, without that parse), and under DDP rank 0 fits while the other ranks receive its answer."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from apps.config import build_experiment
from apps.tasks import get_task
from detection.anchor_fit import coco_boxes
from vision.data.coco import CocoDetection


def _coco(path: Path) -> Path:
    """Two images, crowd regions, a box past the border and one under a pixel after clipping."""
    data = {
        "images": [{"id": 7, "file_name": "a.png", "width": 100, "height": 80},
                   {"id": 3, "file_name": "b.png", "width": 60, "height": 120}],
        "categories": [{"id": 5, "name": "thing"}],
        "annotations": [
            {"id": 1, "image_id": 7, "category_id": 5, "bbox": [10, 10, 30, 20], "iscrowd": 0, "area": 600},
            {"id": 2, "image_id": 7, "category_id": 5, "bbox": [0, 0, 50, 50], "iscrowd": 1, "area": 2500},
            {"id": 3, "image_id": 3, "category_id": 5, "bbox": [40, 100, 40, 40], "iscrowd": 0, "area": 1600},
            {"id": 4, "image_id": 3, "category_id": 5, "bbox": [59.5, 5, 10, 10], "iscrowd": 0, "area": 100},
            {"id": 5, "image_id": 7, "category_id": 5, "bbox": [50, 30, 20, 40], "iscrowd": 0, "area": 800},
        ],
    }
    path.write_text(json.dumps(data))
    return path


def test_the_tables_boxes_are_the_files_boxes(tmp_path):
    annotations = _coco(tmp_path / "train.json")
    with pytest.warns(UserWarning, match="dropped 1 boxes"):
        dataset = CocoDetection(tmp_path, annotations, cache=None)
    boxes, hw = dataset.instance_boxes()
    expected, expected_hw = coco_boxes(json.loads(annotations.read_text()))
    order = lambda b, s: np.lexsort(np.concatenate([b, s], 1).T)  # noqa: E731 (any order: compare as sets)
    assert len(boxes) == 3  # no crowd region, nothing under a pixel
    np.testing.assert_allclose(boxes[order(boxes, hw)], expected[order(expected, expected_hw)], atol=1e-4)
    np.testing.assert_array_equal(hw[order(boxes, hw)], expected_hw[order(expected, expected_hw)])


def _experiment(tmp_path: Path):
    annotations = tmp_path / "train.json"
    if not annotations.exists():
        _coco(annotations)
    return build_experiment({
        "task": "detection", "output_dir": str(tmp_path / "run"), "device": "cpu",
        "model": {"arch": "faster_rcnn_r18_fpn", "min_size": 64, "max_size": 96,
                  "rpn": {"anchor_sizes": "auto", "aspect_ratios": "auto"}},
        "data": {"train": {"images": str(tmp_path), "annotations": str(annotations)}, "val": None,
                 "workers": 0}})


def test_fitting_reads_no_file(tmp_path, monkeypatch):
    exp = _experiment(tmp_path)
    task = get_task("detection")
    with pytest.warns(UserWarning, match="dropped 1 boxes"):
        data = task.build_datasets(exp)

    def refuse(*args, **kwargs):
        raise AssertionError("the annotation file was read again")

    monkeypatch.setattr("builtins.open", refuse)
    monkeypatch.setattr(json, "load", refuse)
    fitted, lines = task.fit_to_data(exp, data)
    assert fitted.model.rpn.anchor_sizes != "auto" and "anchors fitted to 3 training boxes" in lines[0]


def _fit_on_rank(rank: int, world: int, root: str) -> None:
    import warnings

    import apps.tasks.detection as detection_task

    warnings.simplefilter("ignore")
    calls: list[int] = []
    fit = detection_task.resolve_auto_anchors

    def counting(cfg, boxes, image_hw):
        calls.append(len(boxes))
        model, report = fit(cfg, boxes, image_hw)
        if rank == 0:  # what only rank 0 can know: the others must have received it
            model.rpn.anchor_sizes = [[1000.0 + i] for i in range(len(model.rpn.anchor_sizes))]
        return model, report

    detection_task.resolve_auto_anchors = counting
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", init_method=f"file://{root}/rendezvous", rank=rank, world_size=world)
    try:
        exp = _experiment(Path(root))
        task = get_task("detection")
        fitted, _ = task.fit_to_data(exp, task.build_datasets(exp))
        dist.barrier()
    finally:
        dist.destroy_process_group()
    Path(root, f"rank{rank}.pkl").write_bytes(pickle.dumps((calls, fitted.model.rpn.anchor_sizes)))


def test_rank_zero_fits_and_the_other_ranks_receive(tmp_path):
    _coco(tmp_path / "train.json")
    mp.spawn(_fit_on_rank, args=(2, str(tmp_path)), nprocs=2, join=True)
    (calls0, sizes0), (calls1, sizes1) = (pickle.loads((tmp_path / f"rank{r}.pkl").read_bytes())
                                          for r in (0, 1))
    assert calls0 == [3] and calls1 == []  # fitted once, on rank 0
    assert sizes0 == sizes1 == [[1000.0 + i] for i in range(len(sizes0))]  # rank 1 holds rank 0's answer
