"""Detection evaluation at scale: one image per forward pass (so `evaluate` finds exactly the boxes `predict`
finds, whatever the batch size), every rank's detections scored once on rank 0, and images skipped as
unreadable taken out of the ground truth. The shipped shapes Faster R-CNN on a few synthetic images."""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from apps import WEIGHTS_DIR
from apps.config import SplitConfig
from apps.engine.loader import eval_loader
from apps.predict.predictor import Predictor
from apps.tasks import load_model
from vision.data.synthetic import make_shapes
from vision.layers import prepare_for_inference

WEIGHTS = WEIGHTS_DIR / "faster_rcnn_shapes.pt"


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    """Six validation images of different sizes (a batch of them is padded to a common size)."""
    root = tmp_path_factory.mktemp("shapes")
    splits = make_shapes("detection", root, num_images=12, seed=11, image_size=(96, 200), val_fraction=0.5)
    return splits["val"]


@pytest.fixture(scope="module")
def loaded():
    """The checkpoint as `visiondet evaluate` and `predict` run it (batch norms folded), on one thread (two
    threads on a shared two-core machine run many times slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    model = load_model(WEIGHTS, "cpu")
    yield dataclasses.replace(model, model=prepare_for_inference(model.model))
    torch.set_num_threads(threads)


def _loader(loaded, images: Path, annotations: Path, batch_size: int, **kwargs):
    dataset = loaded.task.build_eval_dataset(SplitConfig(images=str(images), annotations=str(annotations)),
                                             loaded)
    return eval_loader(dataset, loaded.task.collate, batch_size=batch_size, workers=0, **kwargs)


def test_evaluate_finds_what_predict_finds_on_the_same_images(shapes, loaded):
    coco = json.loads((shapes / "annotations.json").read_text())
    id_of = {im["file_name"]: im["id"] for im in coco["images"]}
    with torch.inference_mode():  # batches of 4 images of different sizes
        loader = _loader(loaded, shapes / "images", shapes / "annotations.json", 4)
        found = loaded.task.detect(loaded.model, loader, torch.device("cpu"))
    evaluated = {d.image_id: d for d in found}
    # predict, one image per pass, at the model's own score cut (evaluation keeps every box above it)
    predictor = Predictor(loaded, "cpu", score_thresh=loaded.model.thresholds.score_thresh)
    predicted = {id_of[p.file.name]: p.result
                 for p in predictor.predict_source(shapes / "images", batch_size=4, workers=0)}
    assert sorted(predicted) == sorted(evaluated) and len(evaluated) == 6
    assert sum(len(r.scores) for r in predicted.values()) > 6  # the model does find boxes here
    for image_id, d in evaluated.items():
        result = predicted[image_id]
        assert np.array_equal(result.boxes, d.boxes) and np.array_equal(result.scores, d.scores), image_id
        assert np.array_equal(result.labels, d.labels), image_id


def test_an_unreadable_image_leaves_the_ground_truth_and_is_counted(shapes, loaded, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    coco = json.loads((shapes / "annotations.json").read_text())
    for im in coco["images"]:
        (images / im["file_name"]).write_bytes((shapes / "images" / im["file_name"]).read_bytes())
    bad = coco["images"][0]
    assert any(a["image_id"] == bad["id"] for a in coco["annotations"])  # its objects would count as misses
    (images / bad["file_name"]).write_bytes(b"not an image")
    (tmp_path / "all.json").write_text(json.dumps(coco))
    without = {**coco, "images": coco["images"][1:],
               "annotations": [a for a in coco["annotations"] if a["image_id"] != bad["id"]]}
    (tmp_path / "without.json").write_text(json.dumps(without))

    def run(name: str) -> dict[str, float]:
        loader = _loader(loaded, images, tmp_path / name, 2, skip_unreadable=True)
        with torch.inference_mode():
            return loaded.task.evaluate(loaded.model, loader, torch.device("cpu"), loaded.classes)

    skipped, reference = run("all.json"), run("without.json")
    assert skipped.pop("skipped_images") == 1 and "skipped_images" not in reference
    assert skipped == reference and reference["AP50"] > 0
    assert "1 unreadable images skipped" in loaded.task.format_metrics({**skipped, "skipped_images": 1.0})


# ------------------------------------------------------------------- two ranks: scored once, the same numbers


def _evaluate_rank(rank: int, world: int, root: str, split: str) -> None:
    """One process (spawned): evaluates its shard; writes its metrics and how often it scored."""
    import apps.tasks.detection as detection_task

    torch.set_num_threads(1)
    scored: list[int] = []
    score = detection_task.evaluate_coco

    def counting(*args, **kwargs):
        scored.append(1)
        return score(*args, **kwargs)

    detection_task.evaluate_coco = counting
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", init_method=f"file://{root}/rendezvous", rank=rank, world_size=world)
    try:
        loaded = load_model(WEIGHTS, "cpu")
        loaded = dataclasses.replace(loaded, model=prepare_for_inference(loaded.model))
        dataset = loaded.task.build_eval_dataset(
            SplitConfig(images=f"{split}/images", annotations=f"{split}/annotations.json"), loaded)
        loader = eval_loader(dataset, loaded.task.collate, batch_size=2, workers=0)
        with torch.inference_mode():
            metrics = loaded.task.evaluate(loaded.model, loader, torch.device("cpu"), loaded.classes)
        shard = len(loader.sampler)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    Path(root, f"rank{rank}.pkl").write_bytes(pickle.dumps((metrics, len(scored), shard)))


def test_two_ranks_score_once_on_rank_zero_and_match_one_process(shapes, loaded, tmp_path):
    mp.spawn(_evaluate_rank, args=(2, str(tmp_path), str(shapes)), nprocs=2, join=True)
    (m0, scored0, shard0), (m1, scored1, shard1) = (pickle.loads((tmp_path / f"rank{r}.pkl").read_bytes())
                                                     for r in (0, 1))
    assert (scored0, scored1) == (1, 0)  # one COCO evaluation, on rank 0
    assert (shard0, shard1) == (3, 3)  # each rank detected on half of the images
    assert m0 == m1  # every rank returns rank 0's numbers
    # one process over every image (batches of 4 instead of 2): the same numbers
    with torch.inference_mode():
        single = loaded.task.evaluate(loaded.model, _loader(loaded, shapes / "images",
                                                            shapes / "annotations.json", 4),
                                      torch.device("cpu"), loaded.classes)
    assert m0 == single and single["detections"] > 0 and single["AP50"] > 0
