"""Faster R-CNN R50-FPN speed: ours against torchvision's fasterrcnn_resnet50_fpn, same weights and input.

    python benchmarks/detection.py                      # 800 and 512 px inference, one training step
    python benchmarks/detection.py --sizes 512 --repeats 3

Both models are built as torchvision builds its COCO model (frozen batch norm, conv1 and res2 frozen),
with random weights (nothing is downloaded); torchvision's weights are converted into ours. Inference is
timed for ``TwoStageDetector`` as built, and for ``prepare_for_inference(model)`` (batch norm folded into
the convs, channels-last weights), under ``torch.inference_mode``. The runs of the models alternate, so
a busy shared machine slows them alike; the medians and their ratios are printed, with the largest
output differences (boxes in px, scores) against torchvision. The training step is forward + backward +
SGD step on two images.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

# Run as a script, this file's folder comes first on sys.path, and this file's name would hide the
# `detection` package: put the repository root there instead.
if __package__ in (None, ""):
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import torch
import torchvision
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
from torchvision.ops.misc import FrozenBatchNorm2d

from detection.convert import COCO_CATEGORIES, convert_torchvision_state_dict, torchvision_config
from detection.models import build_detector, prepare_for_inference

COCO_IDS = torch.tensor([0] + [i for i, _ in COCO_CATEGORIES])
SCORE_THRESH = 0.0112  # random weights score about 1/91 per class: keep a few hundred detections to compare
MAX_DETECTIONS = 1000  # no cap binds, so torchvision's "N/A" detections cannot push others out of its list


def torchvision_model() -> FasterRCNN:
    """fasterrcnn_resnet50_fpn as torchvision builds it for its COCO weights (frozen BN, 3 stages train)."""
    backbone = resnet_fpn_backbone(
        backbone_name="resnet50", weights=None, norm_layer=FrozenBatchNorm2d, trainable_layers=3
    )
    return FasterRCNN(
        backbone, num_classes=91, box_score_thresh=SCORE_THRESH, box_detections_per_img=MAX_DETECTIONS
    )


def set_size(tv: FasterRCNN, ours, size: int) -> None:
    max_size = round(size * 1333 / 800)
    tv.transform.min_size, tv.transform.max_size = (size,), max_size
    for model in ours:
        model.transform.min_size, model.transform.max_size = (size,), max_size


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def compare(theirs: dict, ours) -> str:
    real = torch.isin(theirs["labels"], COCO_IDS[1:])  # torchvision also scores 10 unused "N/A" ids
    t_boxes, t_scores, t_labels = theirs["boxes"][real], theirs["scores"][real], theirs["labels"][real]
    if len(t_boxes) != len(ours):
        return f"counts differ: {len(t_boxes)} vs {len(ours)}"
    order_t = torch.argsort(t_scores * 1000 + t_labels, descending=True)
    order_o = torch.argsort(ours.scores * 1000 + COCO_IDS[ours.labels], descending=True)
    same_labels = torch.equal(t_labels[order_t], COCO_IDS[ours.labels][order_o])
    box = (t_boxes[order_t] - ours.boxes[order_o]).abs().max().item() if len(ours) else 0.0
    score = (t_scores[order_t] - ours.scores[order_o]).abs().max().item() if len(ours) else 0.0
    labels = "equal" if same_labels else "DIFFER"
    return f"{len(ours)} detections, labels {labels}, max |box| {box:.1e} px, max |score| {score:.1e}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[800, 512])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--skip-train", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    tv = torchvision_model().eval()
    cfg = torchvision_config()
    cfg.roi.score_thresh, cfg.roi.detections_per_img = SCORE_THRESH, MAX_DETECTIONS
    ours = build_detector(cfg, load_pretrained=False).eval()
    ours.load_state_dict(convert_torchvision_state_dict(tv.state_dict()))
    fast = prepare_for_inference(ours)
    image = torch.from_numpy(_sample_image()).permute(2, 0, 1).float() / 255  # a real photo, 427 x 640
    print(
        f"torch {torch.__version__}, torchvision {torchvision.__version__}, "
        f"{torch.get_num_threads()} threads, image {tuple(image.shape[1:])}, "
        f"median of {args.repeats} runs after one warm-up"
    )
    print(f"{'':28s}{'torchvision':>12s}{'ours':>9s}{'ratio':>7s}{'ours prepared':>15s}{'ratio':>7s}")
    for size in args.sizes:
        set_size(tv, (ours, fast), size)
        runs = {"tv": [], "ours": [], "fast": []}
        with torch.inference_mode():
            outputs = {"tv": tv([image])[0], "ours": ours([image])[0][0], "fast": fast([image])[0][0]}
            for _ in range(args.repeats):
                runs["tv"].append(timed(lambda: tv([image])))
                runs["ours"].append(timed(lambda: ours([image])))
                runs["fast"].append(timed(lambda: fast([image])))
        t, o, f = (statistics.median(runs[k]) for k in ("tv", "ours", "fast"))
        print(f"{f'inference {size} px (s/image)':28s}{t:12.3f}{o:9.3f}{o / t:7.2f}{f:15.3f}{f / t:7.2f}")
        print(f"    ours vs torchvision:          {compare(outputs['tv'], outputs['ours'])}")
        print(f"    prepared vs torchvision:      {compare(outputs['tv'], outputs['fast'])}")
    if not args.skip_train:
        t, o = train_step_times(tv, ours, image, args.repeats)
        print(f"{'training step, 2 images 512 px':28s}{t:12.3f}{o:9.3f}{o / t:7.2f}")


def train_step_times(tv: FasterRCNN, ours, image: torch.Tensor, repeats: int) -> tuple[float, float]:
    set_size(tv, (ours,), 512)
    images = [image, image.flip(-1)]
    boxes = torch.tensor([[100.0, 80.0, 300.0, 350.0], [350.0, 40.0, 600.0, 200.0]])
    targets = [
        {"boxes": boxes, "labels": torch.tensor([1, 18])},
        {"boxes": boxes[:1], "labels": torch.tensor([3])},
    ]
    # our labels are contiguous: COCO ids 1, 18, 3 are labels 1, 17, 3
    ours_targets = [
        {"boxes": boxes, "labels": torch.tensor([1, 17])},
        {"boxes": boxes[:1], "labels": torch.tensor([3])},
    ]
    opt_tv = torch.optim.SGD([p for p in tv.parameters() if p.requires_grad], lr=1e-5, momentum=0.9)
    opt_ours = torch.optim.SGD([p for p in ours.parameters() if p.requires_grad], lr=1e-5, momentum=0.9)
    tv.train()
    ours.train()

    def step_tv():
        opt_tv.zero_grad()
        sum(tv(images, targets).values()).backward()
        opt_tv.step()

    def step_ours():
        opt_ours.zero_grad()
        sum(ours(images, ours_targets)[1].values()).backward()
        opt_ours.step()

    step_tv(), step_ours()  # warm-up
    runs_tv, runs_ours = [], []
    for _ in range(repeats):
        runs_tv.append(timed(step_tv))
        runs_ours.append(timed(step_ours))
    return statistics.median(runs_tv), statistics.median(runs_ours)


def _sample_image():
    from sklearn.datasets import load_sample_image

    return load_sample_image("china.jpg").copy()


if __name__ == "__main__":
    main()
