"""`visiondet proposals --images DIR --out FILE`: precompute selective search proposals for a dataset.

Examples::

    visiondet proposals --images data/shapes/train/images --out runs/proposals/train.npz
    visiondet proposals --images val/images --annotations val/annotations.json --out val.json --method quality

Every image's boxes go to an on-disk cache (``--cache``, default ``FILE.cache/`` beside the output) as soon
as they are computed, so an interrupted run continues where it stopped when the same command is run again,
and a second run over the same pictures (or a training run with the same settings and cache) computes
nothing. With ``--annotations`` (COCO JSON) the image ids are the dataset's and the proposal recall at IoU
0.5 / 0.7 for the top 300 / 1000 / 2000 boxes is printed; without, ids are the file paths under DIR.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--images", required=True, metavar="DIR", help="image folder (searched recursively)")
    parser.add_argument("--out", required=True, metavar="FILE", help="proposal file to write: .npz or .json")
    parser.add_argument("--method", choices=("fast", "quality"), default="fast",
                        help="selective search mode (R-CNN and Fast R-CNN used fast); default fast")
    parser.add_argument("--max-boxes", type=int, default=2000, help="boxes kept per image (default 2000)")
    parser.add_argument("--min-size", type=float, default=0.0, help="drop boxes with a side below this (px)")
    parser.add_argument("--max-side", type=int, default=None,
                        help="segment a copy at most this long (faster), boxes scaled back")
    parser.add_argument("--annotations", metavar="JSON",
                        help="COCO annotations: use its image ids and file names, and report proposal recall")
    parser.add_argument("--cache", metavar="DIR", help="proposal cache folder (default: FILE.cache)")
    parser.add_argument("--skip-unreadable", action="store_true",
                        help="leave out images that cannot be decoded (named, counted) instead of stopping "
                             "at the first one")


def _images(folder: Path, annotations: str | None, extensions: frozenset[str] | set[str]
            ) -> tuple[list[tuple[int | str, Path]], dict]:
    """(id, path) per image (files with one of ``extensions`` without annotations), and {id: [M, 4]
    ground-truth boxes (xyxy)} when annotations are given."""
    import numpy as np

    if annotations is None:
        paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in extensions and p.is_file())
        return [(str(p.relative_to(folder)), p) for p in paths], {}
    data = json.loads(Path(annotations).read_text())
    gts: dict[int | str, list[list[float]]] = {img["id"]: [] for img in data["images"]}
    for ann in data.get("annotations", []):
        if not ann.get("iscrowd", 0) and ann["image_id"] in gts:
            x, y, w, h = ann["bbox"]
            gts[ann["image_id"]].append([x, y, x + w, y + h])
    images = [(img["id"], folder / img["file_name"]) for img in data["images"]]
    return images, {k: np.asarray(v, np.float32).reshape(-1, 4) for k, v in gts.items()}


def run(args: argparse.Namespace) -> int:
    import torch
    from tqdm import tqdm

    from detection.proposals import (
        CachedSource,
        ProposalError,
        ProposalRecord,
        SelectiveSearch,
        image_sha1,
        write_proposal_file,
    )
    from detection.recall import format_recall, proposal_recall
    from vision.data.images import IMAGE_EXTENSIONS, ImageError, read_image

    folder, out = Path(args.images), Path(args.out)
    if not folder.is_dir():
        print(f"error: --images {folder}: no such folder", file=sys.stderr)
        return 2
    if out.suffix not in (".npz", ".json"):
        print(f"error: --out {out}: the proposal file must end in .npz or .json", file=sys.stderr)
        return 2
    try:
        images, gts = _images(folder, args.annotations, IMAGE_EXTENSIONS)
    except (OSError, ValueError, KeyError) as exc:
        print(f"error: --annotations {args.annotations}: not readable COCO JSON ({exc})", file=sys.stderr)
        return 2
    if not images:
        print(f"error: --images {folder}: no images found", file=sys.stderr)
        return 2
    cache_dir = Path(args.cache) if args.cache else out.with_name(out.name + ".cache")
    source = CachedSource(SelectiveSearch(mode=args.method, max_boxes=args.max_boxes, min_size=args.min_size,
                                          max_side=args.max_side), cache_dir)
    records, failed = [], []
    bar = tqdm(images, desc=f"selective search ({args.method})", unit="img", dynamic_ncols=True)
    for image_id, path in bar:
        try:
            pixels = read_image(path)
        except ImageError as exc:
            if not args.skip_unreadable:  # what is done stays in the cache: a second run continues
                bar.close()
                check = "visiondet data check" + (f" --annotations {args.annotations} --images {folder}"
                                                  if args.annotations else "")
                print(f"error: {exc}; find every such file with `{check}`, or pass --skip-unreadable",
                      file=sys.stderr)
                return 1
            failed.append(str(exc))
            tqdm.write(f"warning: skipped unreadable image {exc}")
            continue
        boxes = source.propose(pixels, image_id)
        records.append(ProposalRecord(image_id, boxes.numpy(), None, str(path.relative_to(folder)),
                                      image_sha1(pixels)))
        bar.set_postfix(cached=source.hits, boxes=len(boxes))
    try:
        write_proposal_file(out, records)
    except ProposalError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    total = sum(len(r.boxes) for r in records)
    print(f"wrote {out}: {len(records)} images, {total / max(len(records), 1):.0f} boxes per image "
          f"({source.misses} computed, {source.hits} from the cache {cache_dir})")
    if gts:
        recall = proposal_recall([torch.from_numpy(r.boxes) for r in records],
                                 [torch.from_numpy(gts[r.image_id]) for r in records])
        print("proposal recall (share of ground-truth boxes covered at the IoU):")
        print(format_recall(recall))
    if failed:
        print(f"{len(failed)} unreadable image(s) skipped: they have no proposals", file=sys.stderr)
    return 0
