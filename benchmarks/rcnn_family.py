"""The R-CNN family's speed table, measured on this CPU, beside the course's figures; plus AP50 of each.

Two parts, both on the same ResNet-18 trunk with fully connected box heads (configs/detection/*_shapes.yaml):

1. Speed at the papers' test scale: one real photograph (scikit-learn's 640x427 "china.jpg"), selective
   search in fast mode (up to 2000 boxes, R-CNN and Fast R-CNN), R-CNN warping every proposal to 224 px,
   Fast and Faster R-CNN at a 600 px short side, Faster R-CNN scoring its RPN's top 300 proposals. Seconds
   per image include the proposals (no cache). Timing does not depend on the weights, so these networks are
   randomly initialised; Fast R-CNN is also timed with its fc6/fc7 compressed by truncated SVD. R-CNN's
   CNN runs the same network on every warped region, so it is timed on ``--rcnn-sample`` regions and
   scaled to the number of proposals (selective search itself is timed in full).
2. Accuracy: the three shapes configs trained from scratch on one synthetic shapes set (R-CNN's SVM and box
   regression stages included), AP50 on its validation split, seconds per image at that (small) scale, and
   the training time. Faster R-CNN trains 18 epochs to the others' 6 (``EPOCHS``): its RPN is learnt from
   scratch with everything else and needs the steps, and 18 epochs of it cost about the CPU time of R-CNN's
   6 (whose SVM and regression stages come on top of its fine-tuning).

Course table (R-CNN 50 s, Fast R-CNN 2 s, Faster R-CNN 0.2 s per image: 1x, 25x, 250x). Goals on CPU: Fast
R-CNN >= 25x and Faster R-CNN >= 100x faster than R-CNN, AP50 in the papers' order (R-CNN < Fast < Faster).
Not a test; run it by hand on a quiet machine (part 2 trains three detectors: tens of CPU minutes):

    nice -n 10 .venv/bin/python benchmarks/rcnn_family.py [--num-images 600] [--keep DIR] [--speed-only]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

CONFIGS = ROOT / "configs" / "detection"
MODELS = {  # name -> (config, course seconds per image)
    "R-CNN": ("rcnn_r18_shapes.yaml", 50.0),
    "Fast R-CNN": ("fast_rcnn_r18_fpn_shapes.yaml", 2.0),
    "Faster R-CNN": ("faster_rcnn_r18_fpn_shapes.yaml", 0.2),
}
EPOCHS = {"R-CNN": 6, "Fast R-CNN": 6, "Faster R-CNN": 18}  # see part 2 above
SVD_RANKS = (64, 32)  # fc6, fc7 ranks of the 256-d shapes head (the paper: 1024 and 256 of VGG's 4096)


def _model_section(name: str) -> dict:
    from apps.config import load_yaml_with_bases

    return load_yaml_with_bases(CONFIGS / MODELS[name][0])["model"]


def paper_scale_models(num_classes: int = 20) -> dict:
    """The three shapes networks at the papers' test settings (random weights), uncached proposals."""
    from apps.config import from_dict
    from detection.models import DetectorConfig, build_detector

    models = {}
    for name in ("R-CNN", "Fast R-CNN", "Faster R-CNN"):
        section = _model_section(name)
        section["num_classes"] = num_classes
        if name == "R-CNN":  # regions warped to 224 px with 16 px of context, pool5 7 x 7, as the paper
            section["rcnn"] = {**section["rcnn"], "input_size": 224, "context_padding": 16}
            section["roi"] = {**section["roi"], "output_size": 7}
        else:
            section.update(min_size=600, max_size=1000)
        if name == "Faster R-CNN":
            # the paper scores the RPN's top 300 proposals; 1000 per FPN level before NMS, as torchvision
            section["rpn"] = {**section["rpn"], "pre_nms_top_n_test": 1000, "post_nms_top_n_test": 300}
        else:
            section["proposals"] = {**section["proposals"], "cache_dir": None, "min_size": 0}
        models[name] = build_detector(from_dict(DetectorConfig, section), load_pretrained=False)
    return {name: m.eval() for name, m in models.items()}


def svd_copy(model):
    """A copy of a Fast R-CNN with its box head's fc6/fc7 replaced by their truncated SVDs."""
    import copy

    from detection.fast_rcnn import compress_fc_layers

    compressed = copy.deepcopy(model)
    compress_fc_layers(compressed.roi_heads.box_head, *SVD_RANKS)
    return compressed.eval()


def proposal_seconds(model, image) -> float:
    """Time of the model's external proposals alone (0 for an RPN, which is part of the network)."""
    source = getattr(model.proposal_generator, "source", None)
    if source is None:
        return 0.0
    start = time.perf_counter()
    source(image)
    return time.perf_counter() - start


def seconds_per_image(model, images, runs: int = 1) -> tuple[float, float]:
    """(median seconds per image over ``images`` x ``runs``, median proposal seconds), one image per call."""
    import torch

    totals, proposals = [], []
    with torch.inference_mode():
        model([images[0]])  # warm-up: allocator, oneDNN kernels
        for _ in range(runs):
            for image in images:
                start = time.perf_counter()
                model([image])
                totals.append(time.perf_counter() - start)
                proposals.append(proposal_seconds(model, image))
    return statistics.median(totals), statistics.median(proposals)


def rcnn_seconds(model, image, sample: int) -> tuple[float, float]:
    """R-CNN's seconds per image: selective search timed in full; the CNN, whose cost is the same for every
    warped region, timed on ``sample`` of them (in ``region_batch`` chunks, as ``detect`` runs it) and
    scaled to all proposals. Running all 2000 through a CNN takes many minutes on a shared CPU."""
    import torch

    heads = model.roi_heads
    with torch.inference_mode():
        start = time.perf_counter()
        proposals = model.proposal_generator.source(image)
        proposal_s = time.perf_counter() - start
        batch, _, _ = model.transform([image])
        features = model.backbone(batch.tensors)
        heads.region_features(features, [proposals[: heads.region_batch]], batch.image_sizes)  # warm-up
        subset = proposals[:sample]
        start = time.perf_counter()
        heads.region_features(features, [subset], batch.image_sizes)
        per_region = (time.perf_counter() - start) / len(subset)
    return proposal_s + per_region * len(proposals), proposal_s


def vgg_head_svd(rois: int = 256) -> None:
    """Fast R-CNN's own case for truncated SVD: VGG-16's fc6/fc7 (25088 -> 4096 -> 4096) on ``rois`` RoIs,
    full vs. 1024/256 singular values, and how far the compressed head's output moves."""
    import copy

    import torch

    from detection.fast_rcnn import compress_fc_layers
    from detection.roi_heads import VGGBoxHead
    from vision.backbones import build_network

    net = build_network("vgg16")
    head = VGGBoxHead(net.classifier[0], net.classifier[3]).eval()
    compressed = compress_fc_layers(copy.deepcopy(head), 1024, 256).eval()
    x = torch.relu(torch.randn(rois, 512, 7, 7))
    timings = []
    with torch.inference_mode():
        for module in (head, compressed):
            module(x[:8])
            start = time.perf_counter()
            out = module(x)
            timings.append(time.perf_counter() - start)
        reference = head(x)
        error = float((out - reference).norm() / reference.norm())
    print(f"  VGG-16 fc6/fc7 on {rois} RoIs: {timings[0]:.2f} s, with truncated SVD (1024, 256) "
          f"{timings[1]:.2f} s ({timings[0] / timings[1]:.1f}x); relative output change {error:.3f} "
          "(random weights: no low-rank structure to keep, so this is an upper bound)", flush=True)


def speed_part(runs: int, rcnn_sample: int) -> dict[str, tuple[float, float]]:
    import torch
    from sklearn.datasets import load_sample_image

    photo = load_sample_image("china.jpg").copy()  # (427, 640, 3) RGB, a real photo shipped with scikit-learn
    image = torch.from_numpy(photo).permute(2, 0, 1).float() / 255
    torch.manual_seed(0)
    models = paper_scale_models()
    models["Fast R-CNN + SVD"] = svd_copy(models["Fast R-CNN"])
    out = {}
    for name, model in models.items():
        if name == "R-CNN":
            out[name] = rcnn_seconds(model, image, rcnn_sample)
            note = f"; CNN timed on {rcnn_sample} regions and scaled to all proposals"
        else:
            out[name] = seconds_per_image(model, [image], runs)
            note = ""
        seconds, proposal_s = out[name]
        print(f"  {name:<17} {seconds:8.2f} s per image (proposals {proposal_s:.2f} s{note})", flush=True)
    return out


def accuracy_part(work: Path, num_images: int, time_images: int, overrides: list[str],
                  epochs: dict[str, int]) -> dict[str, tuple[float, float, float]]:
    """Train the three shapes models on one synthetic set -> {name: (AP50, s per image, train s)}."""
    import torch

    from apps.config import SplitConfig, load_config
    from apps.engine.loader import eval_loader
    from apps.engine.trainer import train
    from apps.tasks import get_task, load_model
    from detection.proposals import ProposalConfig, build_proposal_source
    from vision.data.synthetic import make_shapes

    splits = make_shapes("detection", work / "data", num_images=num_images, seed=0, image_size=(128, 160))
    data = [f"data.train.images={splits['train']}/images",
            f"data.train.annotations={splits['train']}/annotations.json",
            f"data.val.images={splits['val']}/images",
            f"data.val.annotations={splits['val']}/annotations.json",
            "data.workers=0"]
    val = SplitConfig(images=f"{splits['val']}/images", annotations=f"{splits['val']}/annotations.json")
    results = {}
    for name, (config, _) in MODELS.items():
        run_dir = work / name.replace(" ", "_").lower()
        extra = [f"model.proposals.cache_dir={work / 'proposal_cache'}"] if name != "Faster R-CNN" else []
        extra += [f"train.epochs={epochs[name]}"]
        exp = load_config(CONFIGS / config, [*data, *extra, f"output_dir={run_dir}", *overrides])
        started = time.perf_counter()
        result = train(exp)
        checkpoint = result.run_dir / "best.pt"
        if name == "R-CNN":
            if not (result.run_dir / "final.pt").is_file():  # the engine's hook writes it; not under torchrun
                get_task("detection").finish_training(exp, result.run_dir, torch.device("cpu"))
            checkpoint = result.run_dir / "final.pt"
        train_seconds = time.perf_counter() - started
        print(f"  {name}: trained in {train_seconds:.0f} s -> {checkpoint}", flush=True)
        variants = {name: load_model(checkpoint, "cpu")}
        if name == "Fast R-CNN":
            compressed = svd_copy(variants[name].model)
            variants["Fast R-CNN + SVD"] = dataclasses.replace(variants[name], model=compressed)
        for label, loaded in variants.items():
            dataset = loaded.task.build_eval_dataset(val, loaded)
            loader = eval_loader(dataset, loaded.task.collate, batch_size=1, workers=0)
            with torch.inference_mode():
                metrics = loaded.task.evaluate(loaded.model, loader, torch.device("cpu"), loaded.classes)
            model = loaded.model
            # time with proposals computed, not read from the training run's cache
            proposals_cfg = loaded.checkpoint["model"].get("proposals")
            if proposals_cfg:
                source = build_proposal_source(ProposalConfig(**{**proposals_cfg, "cache_dir": None}))
                model.proposal_generator.source = source
            images = [dataset[i][0] for i in range(min(time_images, len(dataset)))]
            seconds, _ = seconds_per_image(model, images)
            results[label] = (metrics["AP50"], seconds, train_seconds)
            print(f"  {label:<17} AP50 {metrics['AP50']:.3f}  {seconds:.3f} s per image", flush=True)
    return results


def print_table(speed: dict, accuracy: dict, epochs: dict[str, int]) -> bool:
    base = speed.get("R-CNN", (float("nan"), 0))[0]
    shapes_base = accuracy.get("R-CNN", (0, float("nan"), 0))[1]
    print("\n| model | course s/img | course speed-up | ours s/img (paper scale, CPU) | of which proposals "
          "| ours speed-up | AP50 shapes val | s/img shapes (speed-up) | train s (epochs) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in ("R-CNN", "Fast R-CNN", "Fast R-CNN + SVD", "Faster R-CNN"):
        course = MODELS.get(name, (None, None))[1]
        c_s = f"{course:g}" if course else "-"
        c_x = f"{MODELS['R-CNN'][1] / course:g}x" if course else "-"
        s, p = speed.get(name, (float("nan"), float("nan")))
        ap, shapes_s, train_s = accuracy.get(name, (float("nan"), float("nan"), float("nan")))
        print(f"| {name} | {c_s} | {c_x} | {s:.2f} | {p:.2f} | {base / s:.1f}x | {ap:.3f} "
              f"| {shapes_s:.3f} ({shapes_base / shapes_s:.1f}x) | {train_s:.0f} ({epochs.get(name, '-')}) |")
    ok = True
    if speed:
        fast_x, faster_x = base / speed["Fast R-CNN"][0], base / speed["Faster R-CNN"][0]
        ok &= fast_x >= 25 and faster_x >= 100
        print(f"\nspeed goals: Fast R-CNN {fast_x:.1f}x (goal >= 25x), "
              f"Faster R-CNN {faster_x:.1f}x (goal >= 100x)")
    if accuracy:
        aps = [accuracy[n][0] for n in ("R-CNN", "Fast R-CNN", "Faster R-CNN")]
        ordered = aps[0] <= aps[1] <= aps[2]
        ok &= ordered
        print(f"AP50 R-CNN {aps[0]:.3f}, Fast {aps[1]:.3f}, Faster {aps[2]:.3f}: "
              f"{'in' if ordered else 'NOT in'} the papers' order")
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3, help="timed runs of Fast/Faster R-CNN at paper scale")
    parser.add_argument("--rcnn-sample", type=int, default=128, help="warped regions R-CNN's CNN is timed on")
    parser.add_argument("--speed-only", action="store_true", help="skip part 2 (training)")
    parser.add_argument("--accuracy-only", action="store_true", help="skip part 1 (paper-scale timing)")
    parser.add_argument("--vgg-svd", action="store_true",
                        help="also time VGG-16's fc6/fc7 with and without truncated SVD (the SVD of the "
                             "25088 x 4096 fc6 alone takes over 10 minutes on 2 busy cores)")
    parser.add_argument("--num-images", type=int, default=600, help="synthetic train + val images (20%% val)")
    parser.add_argument("--time-images", type=int, default=10, help="validation images timed in part 2")
    parser.add_argument("--keep", metavar="DIR", help="keep data and runs here (default: a temp folder)")
    parser.add_argument("--epochs", type=int, nargs=3, metavar=("RCNN", "FAST", "FASTER"),
                        help=f"training epochs of each (default: {', '.join(map(str, EPOCHS.values()))})")
    parser.add_argument("overrides", nargs="*", help="overrides for all three configs, e.g. train.lr=0.01")
    args = parser.parse_args()

    import torch

    speed = {}
    if not args.accuracy_only:
        print(f"CPU threads: {torch.get_num_threads()}; part 1: speed at the papers' scale", flush=True)
        speed = speed_part(args.runs, args.rcnn_sample)
        if args.vgg_svd:
            vgg_head_svd()
    accuracy = {}
    epochs = dict(zip(MODELS, args.epochs, strict=True)) if args.epochs else EPOCHS
    if not args.speed_only:
        work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="visiondet_rcnn_family_"))
        print(f"part 2: training on synthetic shapes in {work}", flush=True)
        accuracy = accuracy_part(work, args.num_images, args.time_images, args.overrides, epochs)
    return 0 if print_table(speed, accuracy, epochs) else 1


if __name__ == "__main__":
    sys.exit(main())
