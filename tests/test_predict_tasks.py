"""`visiondet predict` with real segmentation and detection checkpoints (tiny, random weights)."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from support.checkpoints import CLASSES, write_checkpoint

from apps.cli import main
from apps.predict.predictor import Predictor
from vision.data.images import read_image


def noise(h, w, seed):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def write_images(src: Path) -> dict[str, tuple[int, int]]:
    sizes = {"x/a.png": (30, 40), "x/a.jpg": (30, 40), "y/b.png": (24, 24)}
    for i, (name, (h, w)) in enumerate(sizes.items()):
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(noise(h, w, i)).save(src / name)
    return sizes


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.mark.parametrize("size", [None, 32])
def test_segmentation_masks_and_overlays(tmp_path, size):
    from vision.segmentation import SegmentationConfig, build_segmentation_model

    torch.manual_seed(0)
    cfg = SegmentationConfig(arch="fcn_resnet18", num_classes=2)
    model = build_segmentation_model(cfg, load_pretrained=False)
    weights = write_checkpoint(tmp_path / "seg.pt", "segmentation", cfg, model, {"size": size})
    src, out = tmp_path / "src", tmp_path / "out"
    sizes = write_images(src)
    code = main(["predict", "--weights", str(weights), "--source", str(src), "--output", str(out),
                 "--workers", "0", "--batch-size", "3", "--save-images", "--no-progress"])
    assert code == 0
    records = {r["file"]: r for r in lines(out / "predictions.jsonl")}
    # a.png and a.jpg in one folder: their masks keep apart
    assert {n: r["mask"] for n, r in records.items()} == {
        "x/a.jpg": "masks/x/a.jpg.png", "x/a.png": "masks/x/a.png.png", "y/b.png": "masks/y/b.png"}
    predictor = Predictor(weights, "cpu")
    for name, (h, w) in sizes.items():
        mask = np.asarray(Image.open(out / records[name]["mask"]))
        assert mask.shape == (h, w) and mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 1, 2}
        [direct] = predictor.predict([read_image(src / name)])
        np.testing.assert_array_equal(mask, direct.mask)  # batched stream == one image in memory
        pixels = {c["name"]: c["pixels"] for c in records[name]["classes"]}
        assert pixels == {CLASSES[k - 1]["name"]: int((mask == k).sum()) for k in (1, 2) if (mask == k).any()}
        overlay = np.asarray(Image.open(out / "images" / name))
        # the picture in the image's own pixels, the legend in a white strip below it (only if a class shows)
        assert overlay.shape[1:] == (w, 3) and overlay.shape[0] >= h
        assert (overlay.shape[0] > h) == bool(records[name]["classes"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["done"] == 3 and summary["outputs"]["masks"] == "masks/"
    assert sum(summary["images_per_class"].values()) == sum(len(r["classes"]) for r in records.values())


def test_detection_coco_results_score_in_evaluation(tmp_path, tiny_detector_checkpoint):
    from detection.evaluation import evaluate_coco, load_results

    weights = tiny_detector_checkpoint(tmp_path / "det.pt")
    src, out = tmp_path / "src", tmp_path / "out"
    sizes = write_images(src)
    (src / "y" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    # the COCO file names images by base name only, with ids of its own; a.jpg is not in it
    gt_images = [{"id": 101, "file_name": "a.png", "width": 40, "height": 30},
                 {"id": 102, "file_name": "b.png", "width": 24, "height": 24}]
    coco_ids = tmp_path / "instances.json"
    coco_ids.write_text(json.dumps({"images": gt_images, "annotations": [], "categories": CLASSES}))
    code = main(["predict", "--weights", str(weights), "--source", str(src), "--output", str(out),
                 "--workers", "2", "--batch-size", "2", "--score-threshold", "0.2",
                 "--coco-ids", str(coco_ids), "--save-images", "--format", "coco", "csv", "--no-progress"])
    assert code == 0
    records = {r["file"]: r for r in lines(out / "predictions.jsonl")}
    assert set(records) == set(sizes)
    assert {n: r["image_id"] for n, r in records.items()} == {"x/a.png": 101, "x/a.jpg": None, "y/b.png": 102}
    predictor = Predictor(weights, "cpu", score_thresh=0.2)
    total = 0
    for name, (h, w) in sizes.items():
        dets = records[name]["detections"]
        total += len(dets)
        for d in dets:
            x, y, bw, bh = d["bbox"]
            assert 0 <= x <= x + bw <= w + 0.01 and 0 <= y <= y + bh <= h + 0.01  # original pixels
            assert d["score"] >= 0.2 and (d["category_id"], d["name"]) in {(3, "road"), (7, "sky")}
        [direct] = predictor.predict([read_image(src / name)])
        corners = [d["bbox"][:2] for d in dets]
        np.testing.assert_allclose(np.reshape(corners, (-1, 2)), direct.boxes[:, :2], atol=0.01)
    assert total > 0
    assert (out / "images" / "x" / "a.jpg").is_file()

    results = load_results(out / "predictions.json")
    assert {r["image_id"] for r in results} <= {101, 102}
    assert len(results) == len(records["x/a.png"]["detections"]) + len(records["y/b.png"]["detections"])
    # ground truth = the predicted boxes themselves: a correct export scores AP50 = 1
    annotations = [{"id": i, "image_id": r["image_id"], "category_id": r["category_id"], "bbox": r["bbox"],
                    "area": r["bbox"][2] * r["bbox"][3], "iscrowd": 0} for i, r in enumerate(results, 1)]
    gt = tmp_path / "gt.json"
    gt.write_text(json.dumps({"images": gt_images, "annotations": annotations, "categories": CLASSES}))
    assert evaluate_coco(gt, results)["AP50"] == pytest.approx(1.0)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["failed"] == 1 and sum(summary["detections_per_class"].values()) == total
    assert summary["coco_results"] == {"detections": len(results), "images_without_id": 1}
