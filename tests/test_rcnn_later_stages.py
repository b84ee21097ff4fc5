"""R-CNN's later stages read proposals as fine-tuning does: by image id from a file (a COCO-results list with
nothing but ids, boxes and scores), or selective search through the same disk cache, in loader workers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from apps.config import load_config
from apps.engine.checkpointing import make_checkpoint
from apps.tasks import get_task
from detection.proposals import SelectiveSearch
from vision.checkpoint import load_checkpoint, save_checkpoint
from vision.data.synthetic import make_shapes

TINY = ["model.rcnn.input_size=32", "model.rcnn.context_padding=2", "model.roi.output_size=2",
        "model.roi.representation_size=16", "model.rcnn.batch_size=16", "model.rcnn.svm.retrain_every=20",
        "model.rcnn.region_batch=64", "data.workers=1", "train.batch_size=2"]


@pytest.fixture
def shapes(tmp_path) -> Path:
    make_shapes("detection", tmp_path / "data", num_images=6, seed=3, image_size=(64, 80), val_fraction=0.34)
    # COCO's ids are unique over train and val; the synthetic splits both count from 1
    val = tmp_path / "data" / "val" / "annotations.json"
    coco = json.loads(val.read_text())
    for item in coco["images"]:
        item["id"] += 100
    for item in coco["annotations"]:
        item["image_id"] += 100
    val.write_text(json.dumps(coco))
    return tmp_path / "data"


def _experiment(shapes: Path, tmp_path: Path, proposals: list[str]):
    splits = [f"data.{s}.{k}={shapes}/{s}/{'images' if k == 'images' else 'annotations.json'}"
              for s in ("train", "val") for k in ("images", "annotations")]
    return load_config("configs/detection/rcnn_r18_shapes.yaml",
                       [*splits, *TINY, *proposals, f"output_dir={tmp_path}/run"])


def _fine_tuned(exp, run: Path) -> None:
    """``run/last.pt`` as the training loop leaves it (untrained weights: the stages don't mind)."""
    task = get_task("detection")
    classes = [dict(c) for c in task.build_datasets(exp).classes]
    model = task.build_model(exp.model, classes, load_pretrained=False)
    run.mkdir(parents=True)
    model_cfg = task.model_config_for(exp.model, classes)
    ckpt = make_checkpoint(exp=exp, model_cfg=model_cfg, classes=classes, preprocess=task.preprocess(exp),
                           model=model, ema_state=None, metrics={}, train_state=None)
    save_checkpoint(ckpt, run / "last.pt")


def test_a_proposals_file_keyed_by_image_id_only_works_end_to_end(shapes, tmp_path):
    # COCO results with ids only: no file names, no pixel hashes (a third party's or COCO's own proposals)
    rng = np.random.default_rng(0)
    entries, per_image = [], {}
    for split in ("train", "val"):
        for im in json.loads((shapes / split / "annotations.json").read_text())["images"]:
            n = int(rng.integers(5, 12))
            per_image[im["id"]] = n
            for _ in range(n):
                x, y = rng.uniform(0, im["width"] / 2), rng.uniform(0, im["height"] / 2)
                entries.append({"image_id": im["id"], "bbox": [x, y, rng.uniform(8, im["width"] / 2),
                                                               rng.uniform(8, im["height"] / 2)],
                                "score": float(rng.uniform())})
    (tmp_path / "proposals.json").write_text(json.dumps(entries))
    exp = _experiment(shapes, tmp_path, ["model.proposals.method=file",
                                         f"model.proposals.file={tmp_path}/proposals.json"])
    run = tmp_path / "run"
    _fine_tuned(exp, run)
    lines: list[str] = []
    metrics = get_task("detection").finish_training(exp, run, torch.device("cpu"), lines.append)
    assert "AP50" in metrics and (run / "final.pt").is_file()
    train = json.loads((shapes / "train" / "annotations.json").read_text())
    gt = {im["id"]: sum(a["image_id"] == im["id"] for a in train["annotations"]) for im in train["images"]}
    features = sorted((run / "rcnn" / "features").glob("*.pt"))
    assert len(features) == len(gt) == 4
    # each image's rows: its objects, then exactly the file's boxes for its id
    for path, image_id in zip(features, sorted(gt), strict=True):
        assert len(load_checkpoint(path)["labels"]) == gt[image_id] + per_image[image_id], image_id


def test_selective_search_runs_once_per_image_over_fine_tuning_and_the_later_stages(shapes, tmp_path,
                                                                                     monkeypatch):
    exp = _experiment(shapes, tmp_path, [f"model.proposals.cache_dir={tmp_path}/cache",
                                         "model.proposals.max_boxes=30", "data.workers=0"])
    task = get_task("detection")
    train = task.build_datasets(exp).train
    for i in range(len(train)):  # what fine-tuning's loader does for every image: fills the cache
        train[i]
    cached = sorted(p.name for p in (tmp_path / "cache").rglob("*") if p.is_file())
    assert len(cached) == 4

    def refuse(*args, **kwargs):
        raise AssertionError("selective search ran again")

    monkeypatch.setattr(SelectiveSearch, "propose", refuse)
    run = tmp_path / "run"
    _fine_tuned(exp, run)
    exp = _experiment(shapes, tmp_path, [f"model.proposals.cache_dir={tmp_path}/cache",
                                         "model.proposals.max_boxes=30", "data.workers=0",
                                         "data.val=null"])
    task.finish_training(exp, run, torch.device("cpu"), lambda line: None)
    assert len(list((run / "rcnn" / "features").glob("*.pt"))) == 4
    assert sorted(p.name for p in (tmp_path / "cache").rglob("*") if p.is_file()) == cached


def test_final_detector_is_detected_once_for_its_metrics_and_its_threshold(shapes, tmp_path, monkeypatch):
    """final.pt's metrics and its calibrated threshold come from one pass over the validation images (R-CNN's
    slowest part), at the calibration's lowest cut; the metrics keep only what the model's own cut keeps, so
    they equal a separate evaluation of final.pt."""
    from apps.engine.loader import eval_loader
    from apps.tasks.loading import model_from_checkpoint, read_checkpoint

    exp = _experiment(shapes, tmp_path, [f"model.proposals.cache_dir={tmp_path}/cache",
                                         "model.proposals.max_boxes=30", "data.workers=0",
                                         "model.roi.score_thresh=0.3"])
    run = tmp_path / "run"
    _fine_tuned(exp, run)
    task = get_task("detection")
    passes: list[float] = []
    detect = task.detect
    monkeypatch.setattr(task, "detect", lambda model, loader, device, thresholds=None: passes.append(
        thresholds.score_thresh) or detect(model, loader, device, thresholds))
    metrics = task.finish_training(exp, run, torch.device("cpu"), lambda line: None)
    assert passes == [0.05]  # one pass, at the lowest candidate threshold, not at the model's 0.3
    monkeypatch.setattr(task, "detect", detect)
    loaded = model_from_checkpoint(task, read_checkpoint(run / "final.pt"), run / "final.pt", "cpu")
    assert loaded.model.thresholds.score_thresh == 0.3
    loader = eval_loader(task.build_eval_dataset(exp.data.val, loaded), task.collate, batch_size=1, workers=0)
    with torch.inference_mode():
        alone = task.evaluate(loaded.model.eval(), loader, torch.device("cpu"), loaded.classes)
    assert {k: metrics[k] for k in alone} == alone
    assert load_checkpoint(run / "final.pt")["metrics"] == alone
