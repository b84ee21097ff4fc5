"""Faster R-CNN R50-FPN speed: ours against torchvision's fasterrcnn_resnet50_fpn, same weights and input.

    python benchmarks/detector_speed.py                      # 800 and 512 px inference
    python benchmarks/detector_speed.py --sizes 512 --repeats 3

Both models are built as torchvision builds its COCO model (frozen batch norm, conv1 and res2 frozen),
with random weights (nothing is downloaded); torchvision's weights are converted into ours. Inference is
timed for ``TwoStageDetector`` as built, for ``prepare_for_inference(model)`` (batch norm folded into
the convs, channels-last weights), and with ``--compile`` for that model with ``torch.compile`` on its
backbone (its one-off compile time per input size is printed apart), all under ``torch.inference_mode``
with the usual post-processing (score > 0.05, 100 detections). The runs of the models alternate, so a busy
shared machine slows them alike; the medians and their ratios are printed. Then, untimed, every model's
detections are compared with torchvision's (count, classes, largest box and score differences), next to
torchvision's own difference between two thread counts (the float rounding noise floor). The random
model's frozen batch norms are first given the statistics of their inputs on the image (see
``like_trained``). The training step, ONNX Runtime and int8 are in benchmarks/efficiency.py, which imports
this file's helpers.
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

from detection.models import build_detector, prepare_for_inference
from detection.structures import Detections
from detection.torchvision_weights import COCO_CATEGORIES, convert_torchvision_state_dict, torchvision_config

COCO_IDS = torch.tensor([0] + [i for i, _ in COCO_CATEGORIES])
# The usual post-processing (score > 0.05, at most 100 detections) for timing; the output comparison lifts
# the cap (otherwise torchvision's "N/A" detections could push others out of its list).
COMPARE_MAX = 100000


def torchvision_model() -> FasterRCNN:
    """fasterrcnn_resnet50_fpn as torchvision builds it for its COCO weights (frozen BN, 3 stages train)."""
    backbone = resnet_fpn_backbone(
        backbone_name="resnet50", weights=None, norm_layer=FrozenBatchNorm2d, trainable_layers=3
    )
    return FasterRCNN(backbone, num_classes=91)


@torch.no_grad()
def like_trained(tv: FasterRCNN, image: torch.Tensor) -> FasterRCNN:
    """Give each frozen batch norm of the random model the statistics of its input on ``image``, as a
    trained model's are. With identity statistics the activations of a random ResNet-50 grow to the
    hundreds through its 16 residual blocks, which magnifies rounding differences far beyond a trained
    model's; calibrated, they stay near 1 and scores spread out. The same weights go into both models."""

    def calibrate(module, inputs):
        x = inputs[0]
        module.running_mean.copy_(x.mean(dim=(0, 2, 3)))
        module.running_var.copy_(x.var(dim=(0, 2, 3)))

    norms = [m for m in tv.backbone.body.modules() if isinstance(m, FrozenBatchNorm2d)]
    hooks = [m.register_forward_pre_hook(calibrate) for m in norms]
    batch, _ = tv.transform([image])
    tv.backbone.body(batch.tensors)
    for hook in hooks:
        hook.remove()
    return tv


def set_size(models, size: int) -> None:
    for model in models:
        model.transform.min_size, model.transform.max_size = (size,), round(size * 1333 / 800)


def set_postprocess(models, score_thresh: float, max_detections: int) -> None:
    for model in models:
        model.roi_heads.score_thresh, model.roi_heads.detections_per_img = score_thresh, max_detections


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def compare(theirs: dict, ours) -> str:
    """Count, labels, and the largest box / score differences after pairing each of our detections with
    the nearest of torchvision's of the same class (orders differ where scores tie)."""
    real = torch.isin(theirs["labels"], COCO_IDS[1:])  # torchvision also scores 10 unused "N/A" ids
    t_boxes, t_scores, t_labels = theirs["boxes"][real], theirs["scores"][real], theirs["labels"][real]
    o_labels = COCO_IDS[ours.labels]
    if len(t_boxes) != len(ours) or not torch.equal(t_labels.sort().values, o_labels.sort().values):
        return f"DIFFERENT: {len(t_boxes)} vs {len(ours)} detections or different classes"
    box_err = score_err = 0.0
    for label in o_labels.unique():
        mine, their = o_labels == label, t_labels == label
        dist = torch.cdist(ours.boxes[mine], t_boxes[their], p=float("inf"))
        nearest = dist.argmin(dim=1)
        if nearest.unique().numel() != nearest.numel():
            return f"DIFFERENT boxes in class {int(label)}"
        box_err = max(box_err, dist.min(dim=1).values.max().item())
        score_err = max(score_err, (ours.scores[mine] - t_scores[their][nearest]).abs().max().item())
    return f"{len(ours)} detections, same classes, max |box| {box_err:.1e} px, max |score| {score_err:.1e}"


def photo_and_same_weights() -> tuple[torch.Tensor, FasterRCNN, torch.nn.Module]:
    """(a real 427x640 photo as [3, H, W] in [0, 1], torchvision's R50-FPN with batch-norm statistics as a
    trained model would have on it, ours with the same weights); seeded, so every run compares the same."""
    torch.manual_seed(0)
    image = torch.from_numpy(_sample_image()).permute(2, 0, 1).float() / 255
    tv = like_trained(torchvision_model().eval(), image)
    ours = build_detector(torchvision_config(), load_pretrained=False).eval()
    ours.load_state_dict(convert_torchvision_state_dict(tv.state_dict()))
    return image, tv, ours


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[800, 512])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument(
        "--compile", action="store_true", help="also time the prepared model with torch.compile(backbone)"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    image, tv, ours = photo_and_same_weights()
    models = {"torchvision": tv, "ours": ours, "ours prepared": prepare_for_inference(ours)}
    if args.compile:
        from torch._inductor import config as inductor_config

        inductor_config.freezing = True  # weights are constants: prepacked for the CPU kernels
        compiled = prepare_for_inference(ours)
        compiled.backbone = torch.compile(compiled.backbone, dynamic=False)
        models["prepared + compile"] = compiled
    print(
        f"torch {torch.__version__}, torchvision {torchvision.__version__}, "
        f"{torch.get_num_threads()} threads, image {tuple(image.shape[1:])}, "
        f"median of {args.repeats} runs after one warm-up; seconds per image (ratio to torchvision)",
        flush=True,
    )
    print(f"{'':24s}" + "".join(f"{name:>22s}" for name in models), flush=True)
    for size in args.sizes:
        set_size(models.values(), size)
        runs: dict[str, list[float]] = {name: [] for name in models}
        with torch.inference_mode():
            for name, model in models.items():
                warm = timed(lambda m=model: m([image]))
                if name == "prepared + compile":
                    print(f"    (torch.compile warm-up at {size} px: {warm:.0f} s)", flush=True)
            for _ in range(args.repeats):  # interleaved, so a busy machine slows every model alike
                for name, model in models.items():
                    runs[name].append(timed(lambda m=model: m([image])))
        medians = {name: statistics.median(r) for name, r in runs.items()}
        base = medians["torchvision"]
        cells = "".join(f"{f'{t:.3f} ({t / base:.2f}x)':>22s}" for t in medians.values())
        print(f"{f'inference {size} px':24s}{cells}", flush=True)
        set_postprocess(models.values(), 0.05, COMPARE_MAX)
        with torch.inference_mode():
            theirs = tv([image])[0]
            for name, model in list(models.items())[1:]:
                print(
                    f"    {name + ' vs torchvision:':40s}{compare(theirs, model([image])[0][0])}", flush=True
                )
            # the noise floor: torchvision against itself with another thread count (another summation order)
            threads = torch.get_num_threads()
            torch.set_num_threads(1 if threads > 1 else 2)
            other = tv([image])[0]
            torch.set_num_threads(threads)
            label = f"torchvision, 1 vs {threads} threads:"
            print(f"    {label:40s}{compare(theirs, _as_ours(other))}", flush=True)
        set_postprocess(models.values(), 0.05, 100)


def _as_ours(output: dict) -> Detections:
    """torchvision's output (COCO ids as labels) as our Detections (labels 1..80); "N/A" ids dropped."""
    label_of = {int(cid): i for i, cid in enumerate(COCO_IDS.tolist())}
    keep = torch.isin(output["labels"], COCO_IDS[1:])
    labels = torch.tensor([label_of[int(c)] for c in output["labels"][keep]], dtype=torch.int64)
    return Detections(output["boxes"][keep], output["scores"][keep], labels)


def _sample_image():
    from sklearn.datasets import load_sample_image

    return load_sample_image("china.jpg").copy()


if __name__ == "__main__":
    main()
