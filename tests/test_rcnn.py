"""R-CNN: region warping, SVMs with hard negative mining, ridge box regression, the detector's forward (a
TwoStageDetector with R-CNN's parts), its staged training, and checkpoints of the former R-CNN module."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from detection.boxes import BoxCoder
from detection.generation import RCNN
from detection.models import DetectorConfig, TwoStageDetector, build_detector
from detection.proposals import ProposalSource
from detection.rcnn import RCNNConfig, RCNNHeads
from detection.rcnn_stages import SVMConfig, feature_scale, fit_box_regressor, train_svm_hard_negatives
from detection.structures import Thresholds
from detection.warp import context_boxes, warp_regions

# ---------------------------------------------------------------- warping


def test_context_boxes_hand_computed():
    # S = 20, p = 5: the box must fill the inner 10 px, so each side doubles around the centre
    out = context_boxes(torch.tensor([[10.0, 10.0, 20.0, 30.0]]), out_size=20, padding=5)
    assert out.tolist() == [[5.0, 0.0, 25.0, 40.0]]
    # the paper's 227 / 16: factor 227 / 195
    out = context_boxes(torch.tensor([[0.0, 0.0, 195.0, 39.0]]), out_size=227, padding=16)
    assert torch.allclose(out, torch.tensor([[-16.0, -3.2, 211.0, 42.2]]), atol=1e-4)
    assert context_boxes(torch.tensor([[1.0, 2.0, 3.0, 4.0]]), 20, 0).tolist() == [[1.0, 2.0, 3.0, 4.0]]
    with pytest.raises(ValueError, match="padding"):
        context_boxes(torch.zeros(1, 4), 20, 10)


def test_warp_puts_the_box_inside_its_context():
    # a 40x40 image: 2 in a ring [5, 35), 1 in the box [10, 30), 0 (the mean) elsewhere
    image = torch.zeros(1, 40, 40)
    image[:, 5:35, 5:35] = 2.0
    image[:, 10:30, 10:30] = 1.0
    out = warp_regions(image, torch.tensor([[10.0, 10.0, 30.0, 30.0]]), out_size=20, padding=5)[0, 0]
    # grown box = the whole image at half scale: output pixel u averages image pixels 2u and 2u + 1
    assert out.shape == (20, 20)
    assert torch.equal(out[5:15, 5:15], torch.ones(10, 10))  # the box fills the inner 20 - 2 * 5 pixels
    assert torch.equal(out[3:5, 5:15], torch.full((2, 10), 2.0))  # context: image rows 6..9 are the ring
    assert torch.equal(out[:2], torch.zeros(2, 20))  # image rows 0..3
    assert out[2, 5] == 1.0  # rows 4 (0) and 5 (2) averaged


def test_warp_fills_context_outside_the_image_with_the_mean():
    image = torch.ones(3, 30, 30)  # mean-subtracted image that is 1 everywhere
    out = warp_regions(image, torch.tensor([[0.0, 0.0, 10.0, 10.0]]), out_size=20, padding=5)
    # the grown box is [-5, 15]: its first quarter lies outside, where roi_align reads 0 = the mean
    assert out.shape == (1, 3, 20, 20)
    assert torch.equal(out[0, :, 10:, 10:], torch.ones(3, 10, 10))
    assert out[0, :, :4, :].abs().max() == 0
    assert warp_regions(image, torch.zeros(0, 4), 20).shape == (0, 3, 20, 20)


# ---------------------------------------------------------------- SVMs


def _toy_svm_data():
    """Positives at x in [2, 3]; image 0 holds only easy negatives (x in [-4, -3]); images 1 and 2 each
    hold 5 hard negatives at x = 0.8, which an SVM fitted on image 0 alone puts on the positive side."""
    g = torch.Generator().manual_seed(0)
    positives = torch.stack([2 + torch.rand(10, generator=g), torch.rand(10, generator=g) * 4 - 2], 1)
    easy = torch.stack([-4 + torch.rand(30, generator=g), torch.rand(30, generator=g) * 4 - 2], 1)
    hard = [torch.stack([torch.full((5,), 0.8), torch.linspace(-2, 2, 5)], 1) for _ in range(2)]
    far = torch.tensor([[-3.5, 0.0]])
    return positives, [easy, torch.cat([hard[0], far]), torch.cat([far, hard[1]])]


def test_hard_negative_mining_finds_the_hard_negatives():
    positives, batches = _toy_svm_data()
    cfg = SVMConfig(C=1.0, retrain_every=10)
    # without mining beyond image 0, the hard negatives score as positives
    naive = train_svm_hard_negatives(positives, batches[:1], cfg)
    assert (batches[1][:5] @ naive.weight + naive.bias > 0).all()

    mined = train_svm_hard_negatives(positives, batches, cfg)
    hard_keys = {(1, r) for r in range(5)} | {(2, r) for r in range(1, 6)}
    assert hard_keys <= mined.negatives  # every hard negative was mined and kept
    # image 0's negatives all went in first (the SVM starts at zero, so all are hard); the ones far outside
    # the margin were evicted as easy after the first fit
    assert mined.history[0]["added"] == 30 and mined.history[0]["evicted"] > 0
    assert len(mined.history) == 2 and mined.history[1]["added"] == 10
    assert not {(0, r) for r in range(30)} <= mined.negatives
    scores = lambda x: x @ mined.weight + mined.bias  # noqa: E731
    assert (scores(positives) > 0).all()
    assert (scores(torch.cat(batches)) < 0).all()


def test_svm_without_positives_never_fires():
    result = train_svm_hard_negatives(torch.zeros(0, 3), [torch.randn(4, 3)], SVMConfig())
    assert result.bias < 0 and torch.equal(result.weight, torch.zeros(3))


def test_feature_scale_sets_the_mean_norm():
    feats = torch.tensor([[3.0, 4.0], [0.0, 10.0]])  # norms 5 and 10, mean 7.5
    assert feature_scale(feats, 20.0) == pytest.approx(20 / 7.5)
    assert feature_scale(torch.zeros(0, 2), 20.0) == 1.0


# ---------------------------------------------------------------- box regression


def test_ridge_box_regression_recovers_the_ground_truth():
    g = torch.Generator().manual_seed(1)
    xy = torch.rand(40, 2, generator=g) * 50
    proposals = torch.cat([xy, xy + 10 + torch.rand(40, 2, generator=g) * 20], 1)
    gt = proposals + torch.randn(40, 4, generator=g) * 2
    coder = BoxCoder((1.0, 1.0, 1.0, 1.0))
    targets = coder.encode(gt, proposals)
    # features that carry the targets linearly (plus a constant and a noise column)
    feats = torch.cat([targets * 3 - 1, torch.rand(40, 1, generator=g)], 1)
    weight, bias = fit_box_regressor(feats, targets, alpha=1e-6)
    assert weight.shape == (4, 5) and bias.shape == (4,)
    predicted = coder.decode(feats @ weight.T + bias, proposals)
    assert torch.allclose(predicted, gt, atol=1e-3)
    # a huge penalty leaves only the mean delta
    weight, bias = fit_box_regressor(feats, targets, alpha=1e9)
    assert weight.abs().max() < 1e-5 and torch.allclose(bias, targets.mean(0), atol=1e-5)


# ---------------------------------------------------------------- the detector


class FixedProposals(ProposalSource):
    def __init__(self, boxes):
        self.boxes = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)

    def settings(self):
        return {"source": "fixed"}

    def propose(self, image, image_id=None):
        return self.boxes.clone()


@pytest.fixture
def tiny_rcnn(tiny_detector):
    """The factory ``tiny_rcnn(num_classes, batch_size, positive_fraction)``: an R-CNN on 32 px warps of c4,
    its proposals four fixed boxes."""

    def build(num_classes=2, batch_size=128, positive_fraction=0.25):
        roi = {"output_size": 2, "representation_size": 16, "nms_thresh": 0.3,
               "positive_fraction": positive_fraction}
        rcnn = {"feature_map": "c4", "input_size": 32, "context_padding": 4, "region_batch": 3,
                "batch_size": batch_size}
        model = tiny_detector("rcnn_r18", num_classes=num_classes, frozen_bn=False, freeze_at=0, roi=roi,
                              rcnn=rcnn)
        model.proposal_generator.source = FixedProposals(
            [[0, 0, 20, 20], [30, 30, 60, 60], [2, 2, 21, 22], [0, 0, 64, 48]])
        return model

    return build


def test_rcnn_is_a_two_stage_detector_with_its_own_parts(tiny_rcnn):
    model = tiny_rcnn()
    assert isinstance(model, TwoStageDetector) and isinstance(model.roi_heads, RCNNHeads)
    assert model.generation is RCNN and model.generation.later_stages
    assert model.thresholds == Thresholds(0.05, 0.3, 100)
    # the later stages are the R-CNN heads', run on the detector they belong to
    with pytest.raises(ValueError, match="the detector these heads belong to"):
        model.roi_heads.train_later_stages(tiny_rcnn(), [], Path("unused"), RCNNConfig())
    # nothing is computed over the whole image: the "backbone" passes the normalised pixels through
    assert list(model.backbone.parameters()) == []
    # the image keeps its size (no resize), so boxes need no mapping back
    batch, _, _ = model.transform([torch.rand(3, 48, 64)])
    assert batch.image_sizes == [(48, 64)]
    with pytest.raises(ValueError, match="ignores model.rcnn"):
        build_detector(DetectorConfig(arch="fast_rcnn_r18_fpn", rcnn=RCNNConfig()), load_pretrained=False)


def test_finetune_batch_samples_foreground_and_background(tiny_rcnn):
    model = tiny_rcnn(batch_size=8, positive_fraction=0.25).train()
    seen = []
    model.roi_heads.cnn.head.register_forward_hook(lambda m, i, o: seen.append(len(o)))
    images = [torch.rand(3, 48, 64), torch.rand(3, 48, 64)]
    targets = [{"boxes": torch.tensor([[0.0, 0.0, 20.0, 20.0]]), "labels": torch.tensor([2])},
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}]
    with pytest.raises(ValueError, match="needs them with the data"):  # never from augmented pixels
        model(images, targets)
    for target in targets:
        target["proposals"] = model.proposal_generator.source.propose(None)
    outputs, losses = model(images, targets)
    assert outputs is None and set(losses) == {"loss_classifier"}
    # 2 images x (4 proposals + gt): 3 foreground (gt, [0,0,20,20], [2,2,21,22]: IoU 0.88) -> 2 sampled,
    # then 6 of the 6 background regions
    assert seen == [8]
    losses["loss_classifier"].backward()
    assert model.roi_heads.predictor.cls_score.weight.grad.abs().sum() > 0


def test_detect_uses_svms_and_box_regressors(tiny_rcnn):
    model = tiny_rcnn().eval()
    image = torch.rand(3, 48, 64)
    dets, losses = model([image])
    assert losses == {} and len(dets) == 1  # fine-tuned softmax before the SVMs exist
    predictor = model.roi_heads.predictor
    # SVM for class 1 always fires (margin +5), class 2 never (-5)
    predictor.set_svms(torch.zeros(2, 16), torch.tensor([5.0, -5.0]), 1.0)
    # regression moves every class-1 box right by 10% of its width
    bias = torch.zeros(2, 4)
    bias[0, 0] = 0.1
    predictor.set_box_regressors(torch.zeros_like(predictor.bbox_weight), bias, 1.0)
    (det,), _ = model([image])
    assert det.labels.tolist() == [1, 1, 1]  # [2,2,21,22] overlaps [0,0,20,20] by 0.88: NMS at 0.3 drops it
    assert torch.allclose(det.scores, torch.sigmoid(torch.tensor(5.0)).expand(3))
    expected = {(2.0, 0.0, 22.0, 20.0), (33.0, 30.0, 63.0, 48.0), (6.4, 0.0, 64.0, 48.0)}  # clipped
    assert {tuple(round(v, 3) for v in box) for box in det.boxes.tolist()} == expected
    # the same NMS as every detector, driven by the call's thresholds: a loose one keeps [2,2,21,22]
    (loose,), _ = model([image], thresholds=Thresholds(0.05, 0.9, 100))
    assert len(loose) == 4 and model.thresholds.nms_thresh == 0.3


# ---------------------------------------------------------------- the staged pipeline, end to end


def test_rcnn_stages_train_resume_and_load(tmp_path):
    from apps.config import load_config
    from apps.engine.trainer import train
    from apps.tasks import get_task, load_model
    from vision.data.synthetic import make_shapes

    make_shapes("detection", tmp_path / "data", num_images=8, seed=0, image_size=(64, 80), val_fraction=0.25)
    data = tmp_path / "data"
    overrides = [
        f"data.train.images={data}/train/images", f"data.train.annotations={data}/train/annotations.json",
        f"data.val.images={data}/val/images", f"data.val.annotations={data}/val/annotations.json",
        "data.workers=0", "train.epochs=1", "train.batch_size=3", "train.warmup_iters=0",
        "model.rcnn.input_size=32", "model.rcnn.context_padding=2", "model.roi.output_size=2",
        "model.roi.representation_size=16", "model.rcnn.batch_size=16", "model.rcnn.svm.retrain_every=20",
        "model.rcnn.region_batch=64",
        f"model.proposals.cache_dir={tmp_path}/cache", "model.proposals.max_boxes=40",
        f"output_dir={tmp_path}/run",
    ]
    exp = load_config("configs/detection/rcnn_r18_shapes.yaml", overrides)
    # stage 1 in the engine's loop, then its finish_training hook runs stages 2-5
    result = train(exp)
    assert "AP50" in result.metrics and (result.run_dir / "final.pt").is_file()
    stage = result.run_dir / "rcnn"
    assert len(list((stage / "features").glob("*.pt"))) == 6
    assert all((stage / f"svm_{c}.pt").is_file() for c in (1, 2, 3)) and (stage / "bbox.pt").is_file()
    loaded = load_model(result.run_dir / "final.pt")
    assert loaded.checkpoint["task"] == "detection" and loaded.checkpoint["model"]["arch"] == "rcnn_r18"
    predictor = loaded.model.roi_heads.predictor
    assert bool(predictor.svm_trained) and bool(predictor.bbox_trained)
    image, _ = loaded.task.build_datasets(exp).val[0]
    (det,), _ = loaded.model([image])
    assert det.boxes.shape[1] == 4 and (det.scores <= 1).all()
    # `visiondet predict` runs an R-CNN checkpoint like any detector: COCO results with the dataset's ids
    from apps.cli import main

    pred = tmp_path / "pred"
    assert main(["predict", "--no-progress", "--weights", str(result.run_dir / "final.pt"), "--source",
                 str(data / "val" / "images"), "--output", str(pred), "--score-threshold", "0",
                 "--format", "jsonl", "--workers", "0", "--device", "cpu"]) == 0
    summary = json.loads((pred / "summary.json").read_text())
    assert (summary["task"], summary["done"], summary["failed"]) == ("detection", 2, 0)
    rows = [json.loads(line) for line in (pred / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(d["category_id"] in (1, 2, 3) for r in rows for d in r["detections"])
    # resume after a stop during the SVM stage: features and finished SVMs are reused, not recomputed
    svm1 = (stage / "svm_1.pt").stat().st_mtime_ns
    (stage / "svm_3.pt").unlink()
    (result.run_dir / "final.pt").unlink()
    lines: list[str] = []
    get_task("detection").finish_training(exp, result.run_dir, torch.device("cpu"), lines.append)
    assert any("6 of 6 images already done" in line for line in lines)
    assert [line for line in lines if line.startswith("rcnn svm class")] == [
        next(line for line in lines if line.startswith("rcnn svm class 3"))]
    assert (stage / "svm_1.pt").stat().st_mtime_ns == svm1 and (result.run_dir / "final.pt").is_file()


def test_finetune_without_any_region_gives_a_zero_loss(tiny_rcnn):
    model = tiny_rcnn().train()
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64),
             "proposals": torch.zeros(0, 4)}
    _, losses = model([torch.rand(3, 40, 40)], [empty])
    assert losses["loss_classifier"].item() == 0 and losses["loss_classifier"].requires_grad


def test_the_shipped_rcnn_checkpoint_of_the_former_task_gives_the_same_detections():
    # weights/rcnn_shapes.pt was saved by the former R-CNN module (task "rcnn"); it loads as a detector of
    # the detection task and answers as before (tests/data/rcnn_shapes_reference.pt: its detections on the
    # example scenes, recorded with that module)

    from apps.migrations import upgrade_checkpoint
    from apps.tasks import load_model
    from vision.checkpoint import load_checkpoint
    from vision.data.images import read_image

    shipped = Path("weights/rcnn_shapes.pt")
    assert load_checkpoint(shipped)["task"] == "rcnn"
    upgraded = upgrade_checkpoint(load_checkpoint(shipped))
    assert upgraded["task"] == "detection" and upgraded["model"]["arch"] == "rcnn_r18"
    loaded = load_model(shipped)
    assert isinstance(loaded.model, TwoStageDetector) and loaded.task.name == "detection"
    reference = torch.load("tests/data/rcnn_shapes_reference.pt", weights_only=True)
    for name, expected in reference.items():
        image = read_image(Path("weights/examples") / name, exif=False)
        image = torch.from_numpy(image).permute(2, 0, 1).float() / 255
        with torch.inference_mode():
            (det,), _ = loaded.model([image])
        assert torch.equal(det.labels, expected["labels"]), name
        assert torch.allclose(det.boxes, expected["boxes"], atol=1e-4), name
        assert torch.allclose(det.scores, expected["scores"], atol=1e-6), name


def test_the_former_task_name_says_what_replaced_it():
    from apps.tasks import get_task

    with pytest.raises(KeyError, match="task: detection and model.arch: rcnn_<network>"):
        get_task("rcnn")
