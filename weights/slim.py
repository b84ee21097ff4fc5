"""Slim a training checkpoint into a small shipped one: no resume state, float16 weights, then checked.

    python weights/slim.py runs/default_weights/classifier/best.pt weights/classifier_shapes.pt \
        --check-images runs/default_weights/shapes_cls/val

What changes: ``train_state`` (optimizer, scheduler, RNG: only for resuming) is removed; the weights the run
selected on (the EMA copy when there is one) become ``state_dict`` and the other copy is dropped; floating
point tensors are stored in float16 (integer buffers and flags stay as they are); a detector's proposal
cache folder (``model.proposals.cache_dir``, a training convenience) is switched off.
``apps.tasks.load_model`` reads the result like any checkpoint: ``load_state_dict`` copies each float16
tensor into the float32 parameter it belongs to, so the loaded model runs in float32 as before.

What is checked: the slim copy loads through ``load_model`` and, on ``--check-images``, gives the same answers
as the original within float16 rounding (detection: the same boxes within 1 px at matching labels among the
confident ones; classification: the same top-1; segmentation: at least 99.5% of pixels equal). The figures
are printed; a failed check exits with status 1 and removes the slim copy.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")


def slim(src: Path, dst: Path) -> dict:
    """Write the slim float16 copy of ``src`` to ``dst``; returns it."""
    from vision.checkpoint import CheckpointError, is_visiondet_checkpoint, load_checkpoint, save_checkpoint

    ckpt = load_checkpoint(src)
    if not is_visiondet_checkpoint(ckpt):
        raise CheckpointError(f"{src}: not a visiondet checkpoint")
    state = ckpt.get("ema_state_dict") or ckpt["state_dict"]
    out = {k: v for k, v in ckpt.items() if k not in ("train_state", "ema_state_dict", "state_dict")}
    out["state_dict"] = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    proposals = (out.get("model") or {}).get("proposals")
    if isinstance(proposals, dict) and proposals.get("cache_dir"):
        # A shipped detector must not write a proposal file per image it sees into the training run's cache
        # folder (relative to wherever it is used): selective search runs afresh instead.
        out["model"] = {**out["model"], "proposals": {**proposals, "cache_dir": None}}
    # the key the shipped files already carry (this step was once called "export")
    out["exported_from"] = {"file": src.name, "dtype": "float16", "note": "train_state and EMA copy removed"}
    save_checkpoint(out, dst)
    return out


def compare(src: Path, dst: Path, images: list[Path]) -> tuple[bool, str]:
    """Run both checkpoints on ``images``; (same within float16 rounding?, a line of figures)."""
    import numpy as np

    from apps.predict.predictor import Predictor
    from vision.data.images import read_image

    a = Predictor(src, "cpu", score_threshold=0.5)
    b = Predictor(dst, "cpu", score_threshold=0.5)
    arrays = [read_image(p) for p in images]
    same, total, worst = 0, 0, 0.0
    for image in arrays:
        ra, rb = a.predict([image])[0], b.predict([image])[0]
        if a.task == "detection":
            total += 1
            ok = len(ra.labels) == len(rb.labels) and bool((ra.labels == rb.labels).all())
            if ok and len(ra.labels):
                diff = float(np.abs(ra.boxes - rb.boxes).max())
                worst = max(worst, diff)
                ok = diff <= 1.0
            same += ok
        elif a.task == "classification":
            total += 1
            same += int(ra.labels[0] == rb.labels[0])
        else:
            total += ra.mask.size
            same += int((ra.mask == rb.mask).sum())
    if a.task == "segmentation":
        share = same / max(total, 1)
        return share >= 0.995, f"{100 * share:.3f}% of {total} pixels equal"
    extra = f", largest box difference {worst:.3f} px" if a.task == "detection" else ""
    return same == total, f"{same}/{total} images give the same answer{extra}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", type=Path, help="a run's best.pt / last.pt / final.pt")
    parser.add_argument("dst", type=Path, help="the shipped file, e.g. weights/faster_rcnn_shapes.pt")
    parser.add_argument("--check-images", type=Path, metavar="DIR",
                        help="folder of images to compare the two on (searched recursively)")
    parser.add_argument("--limit", type=int, default=40, help="images compared at most (default 40)")
    parser.add_argument("--max-mb", type=float, default=25.0, help="refuse a bigger copy (default 25)")
    args = parser.parse_args()

    from apps.tasks import load_model

    slim(args.src, args.dst)
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
        ok, line = compare(args.src, args.dst, images[: args.limit])
        print(f"float32 vs float16: {line}")
        if not ok:
            print("error: the float16 copy answers differently", file=sys.stderr)
            args.dst.unlink()
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
