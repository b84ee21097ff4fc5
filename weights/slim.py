"""Slim a training checkpoint into a small shipped one: no resume state, float16 weights, then checked.

    python weights/slim.py runs/default_weights/classifier/best.pt weights/classifier_shapes.pt \
        --check-images runs/default_weights/shapes_cls/val

What changes: ``train_state`` (optimizer, scheduler, RNG: only for resuming) is removed; the weights the run
selected on (the EMA copy when there is one) become ``state_dict`` and the other copy is dropped; floating
point tensors are stored in float16 (integer buffers and flags stay as they are); a detector's proposal
cache folder (``model.proposals.cache_dir``, a training convenience) is switched off.
``apps.tasks.load_model`` reads the result like any checkpoint: ``load_state_dict`` copies each float16
tensor into the float32 parameter it belongs to, so the loaded model runs in float32 as before.

``--single-photo NAMES`` records the classes learned from one photograph each (``single_photo_classes``),
which the demo names as single things, not categories.

``--int8`` also stores the conv and linear weights as int8 with one float32 scale per output channel
(``vision.checkpoint.quantize_int8``): half the float16 size, for the shipped real-photo models' 15 MB
limit. ``load_model`` (and fine-tuning or trunk loading from the file) multiply them back into float32.

What is checked: the slim copy loads through ``load_model`` and, on ``--check-images``, gives the same answers
as the original within float16 rounding (detection: the same boxes within 1 px at matching labels among the
confident ones; classification: the same top-1; segmentation: at least 99.5% of pixels equal); with
``--int8``, within its rounding: at least ``--int8-agreement`` (default 95%) of the images (detection,
classification) or 99% of the pixels (segmentation) answer the same. The figures are printed; a failed check
exits with status 1 and removes the slim copy.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")


def slim(src: Path, dst: Path, *, int8: bool = False, single_photo: list[str] | None = None) -> dict:
    """Write the slim float16 (``int8``: int8 conv and linear weights) copy of ``src`` to ``dst``; returns it.
    ``single_photo``: class names learned from one photograph each, saved as ``single_photo_classes`` (the
    demo says the model knows those very things, not their categories)."""
    from vision.checkpoint import (
        INT8_SCALES,
        CheckpointError,
        is_visiondet_checkpoint,
        load_checkpoint,
        quantize_int8,
        save_checkpoint,
    )

    ckpt = load_checkpoint(src)
    if not is_visiondet_checkpoint(ckpt):
        raise CheckpointError(f"{src}: not a visiondet checkpoint")
    names = [str(c.get("name")) for c in ckpt.get("classes") or []]
    unknown = [n for n in single_photo or [] if n not in names]
    if unknown:
        raise CheckpointError(f"{src}: --single-photo {', '.join(unknown)}: not among its classes "
                              f"({', '.join(names)})")
    state = ckpt.get("ema_state_dict") or ckpt["state_dict"]
    out = {k: v for k, v in ckpt.items() if k not in ("train_state", "ema_state_dict", "state_dict")}
    out["state_dict"] = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    if int8:
        out["state_dict"], out[INT8_SCALES] = quantize_int8(state)
        out["state_dict"] = {k: v.half() if v.is_floating_point() else v for k, v in out["state_dict"].items()}
    proposals = (out.get("model") or {}).get("proposals")
    if isinstance(proposals, dict) and proposals.get("cache_dir"):
        # A shipped detector must not write a proposal file per image it sees into the training run's cache
        # folder (relative to wherever it is used): selective search runs afresh instead.
        out["model"] = {**out["model"], "proposals": {**proposals, "cache_dir": None}}
    if single_photo:
        out["single_photo_classes"] = list(single_photo)
    # the key the shipped files already carry (this step was once called "export")
    dtype = "int8 conv/linear weights (per output channel), float16 others" if int8 else "float16"
    out["exported_from"] = {"file": src.name, "dtype": dtype, "note": "train_state and EMA copy removed"}
    save_checkpoint(out, dst)
    return out


# int8 detectors: a detection scored within this of the threshold may fall on either side of it in the
# other copy without the two disagreeing in substance (the real-photo detector: 8 of 40 validation images
# differed so under the float16 rule, at AP 0.6211 against 0.6217 in float32)
SURE_MARGIN = 0.1


def sure_detections_agree(ra: Any, rb: Any, sure: float, iou: float = 0.9) -> bool:
    """Every detection one copy scores at least ``sure`` has one of the same class in the other's list
    (any score over the threshold) overlapping it by ``iou`` or more, both ways."""
    from torchvision.ops import box_iou

    def covered(x: Any, y: Any) -> bool:
        for box, label, score in zip(x.boxes, x.labels, x.scores, strict=True):
            if score < sure:
                continue
            partners = torch.as_tensor(y.boxes[y.labels == label])
            if not len(partners) or box_iou(torch.as_tensor(box[None]), partners).max() < iou:
                return False
        return True

    return covered(ra, rb) and covered(rb, ra)


def compare(src: Path, dst: Path, images: list[Path], agreement: float = 1.0) -> tuple[bool, str]:
    """Run both checkpoints on ``images``; (same within the slim copy's rounding?, a line of figures).
    ``agreement``: the share of images (segmentation: 0.995 when 1, else 0.99 of pixels) that must agree;
    under 1 (int8), detections agree by :func:`sure_detections_agree` instead of box for box."""
    import numpy as np

    from apps.predict.predictor import Predictor
    from vision.data.images import read_image

    a = Predictor(src, "cpu", score_thresh=0.5)
    b = Predictor(dst, "cpu", score_thresh=0.5)
    arrays = [read_image(p) for p in images]
    same, total, worst = 0, 0, 0.0
    for image in arrays:
        ra, rb = a.predict([image])[0], b.predict([image])[0]
        if a.task == "detection":
            total += 1
            if agreement >= 1.0:  # float16: the same list, every box within a pixel
                ok = len(ra.labels) == len(rb.labels) and bool((ra.labels == rb.labels).all())
                if ok and len(ra.labels):
                    diff = float(np.abs(ra.boxes - rb.boxes).max())
                    worst = max(worst, diff)
                    ok = diff <= 1.0
            else:
                ok = sure_detections_agree(ra, rb, 0.5 + SURE_MARGIN)  # 0.5: both Predictors' threshold
            same += ok
        elif a.task == "classification":
            total += 1
            same += int(ra.labels[0] == rb.labels[0])
        else:
            total += ra.mask.size
            same += int((ra.mask == rb.mask).sum())
    if a.task == "segmentation":
        share = same / max(total, 1)
        return share >= (0.995 if agreement >= 1.0 else 0.99), f"{100 * share:.3f}% of {total} pixels equal"
    extra = ""
    if a.task == "detection":
        extra = (f", largest box difference {worst:.3f} px" if agreement >= 1.0 else
                 f" (every detection scored >= {0.5 + SURE_MARGIN:g} matched by class at IoU >= 0.9)")
    return same >= agreement * total, f"{same}/{total} images give the same answer{extra}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", type=Path, help="a run's best.pt / last.pt / final.pt")
    parser.add_argument("dst", type=Path, help="the shipped file, e.g. weights/faster_rcnn_shapes.pt")
    parser.add_argument("--check-images", type=Path, metavar="DIR",
                        help="folder of images to compare the two on (searched recursively)")
    parser.add_argument("--limit", type=int, default=40, help="images compared at most (default 40)")
    parser.add_argument("--max-mb", type=float, default=25.0, help="refuse a bigger copy (default 25)")
    parser.add_argument("--int8", action="store_true", help="conv and linear weights as int8 (half the size)")
    parser.add_argument("--int8-agreement", type=float, default=0.95,
                        help="--int8: share of checked images that must answer as the original (0.95)")
    parser.add_argument("--single-photo", default="", metavar="NAMES",
                        help="comma-separated classes learned from one photograph each (the demo says so)")
    args = parser.parse_args()

    from apps.tasks import load_model
    from vision.checkpoint import CheckpointError

    try:
        slim(args.src, args.dst, int8=args.int8, single_photo=[n for n in args.single_photo.split(",") if n])
    except CheckpointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    size_mb = args.dst.stat().st_size / 1e6
    load_model(args.dst, "cpu")  # raises CheckpointError if load_model cannot rebuild it
    was_mb = args.src.stat().st_size / 1e6
    print(f"{args.dst}: {size_mb:.2f} MB (from {was_mb:.2f} MB), loads with load_model")
    if size_mb > args.max_mb:
        print(f"error: {args.dst} is over {args.max_mb} MB", file=sys.stderr)
        args.dst.unlink()
        return 1
    if args.check_images:
        images = sorted(p for p in args.check_images.rglob("*") if p.suffix.lower() in (".png", ".jpg"))
        ok, line = compare(args.src, args.dst, images[: args.limit], args.int8_agreement if args.int8 else 1.0)
        kind = "int8" if args.int8 else "float16"
        print(f"float32 vs {kind}: {line}")
        if not ok:
            print(f"error: the {kind} copy answers differently", file=sys.stderr)
            args.dst.unlink()
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
