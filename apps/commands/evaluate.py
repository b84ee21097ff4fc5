"""`visiondet evaluate`: a trained model's metrics on a labelled set, printed and written as JSON.

    visiondet evaluate --weights best.pt --root data/val                           # classification
    visiondet evaluate --weights best.pt --images DIR --annotations val.json       # detection, segmentation
    visiondet evaluate --task detection --predictions results.json --annotations val.json --images DIR

The checkpoint says which task it is; the task builds the dataset, runs its evaluator and formats the
result. Under torchrun each process evaluates a share of the images and the counts are combined.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

from tqdm import tqdm


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--weights", metavar="CKPT", help="a visiondet checkpoint (best.pt, last.pt)")
    parser.add_argument("--images", metavar="DIR", help="image folder (detection, segmentation)")
    parser.add_argument("--annotations", metavar="JSON", help="COCO annotations (detection, segmentation)")
    parser.add_argument("--masks", metavar="DIR", help="PNG index masks (segmentation)")
    parser.add_argument("--root", metavar="DIR", help="ImageFolder tree (classification)")
    parser.add_argument("--predictions", metavar="JSON",
                        help="score a saved results file, no model (detection: COCO results)")
    parser.add_argument("--task", help="the task of --predictions (default: detection)")
    parser.add_argument("--out", metavar="JSON",
                        help="where to write the metrics (default: <weights>_eval.json beside the weights, "
                             "or metrics.json with --predictions)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader worker processes")
    parser.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, cuda:1 ...")
    parser.add_argument("--raw", action="store_true", help="evaluate the raw weights, not the EMA weights")
    parser.add_argument("--skip-unreadable", action="store_true",
                        help="leave out image files that cannot be decoded (listed on stderr and counted in "
                             "the JSON; their ground truth still counts) instead of stopping at the first")


class WithProgress:
    """``loader`` as the tasks' evaluators use it (iteration, ``dataset``, ``len``), showing how far it is:
    a tqdm bar on a terminal, else a plain line about every tenth of the way (logs, CI, ``nohup``)."""

    def __init__(self, loader: Any, *, enabled: bool = True, stream: TextIO | None = None) -> None:
        self.loader, self.enabled = loader, enabled
        self.stream = stream or sys.stderr

    def __getattr__(self, name: str) -> Any:
        return getattr(self.loader, name)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Any]:
        total = len(self.loader)
        if not self.enabled:
            yield from self.loader
        elif self.stream.isatty():
            yield from tqdm(self.loader, total=total, desc="evaluate", unit="batch", file=self.stream)
        else:
            start, step = time.perf_counter(), max(1, total // 10)
            for done, batch in enumerate(self.loader, start=1):
                yield batch
                if done % step == 0 or done == total:
                    rate = done / max(time.perf_counter() - start, 1e-9)
                    print(f"evaluate: {done}/{total} batches, {rate:.2f} batches/s", file=self.stream,
                          flush=True)


def evaluate(args: argparse.Namespace) -> tuple[str, dict[str, float], Path]:
    """Run the evaluation ``args`` describe; returns (task name, metrics, JSON path)."""
    import torch

    from apps.config import ConfigError, SplitConfig
    from apps.engine import distributed as dist_utils
    from apps.engine.loader import Unreadable, eval_loader
    from apps.tasks import TASKS, get_task, load_model

    split = SplitConfig(images=args.images, annotations=args.annotations, masks=args.masks, root=args.root)
    for flag in ("images", "annotations", "masks", "root", "predictions"):
        value = getattr(args, flag)
        if value is not None and not Path(value).exists():
            raise ConfigError(f"--{flag}: {value}: no such file or folder")
    if args.batch_size < 1 or args.workers < 0:
        raise ConfigError("--batch-size must be >= 1 and --workers >= 0")
    if args.predictions is not None:
        name = args.task or "detection"
        if name not in TASKS:
            raise ConfigError(f"--task: unknown task {name!r}; known: {', '.join(sorted(TASKS))}")
        metrics = get_task(name).score_predictions(args.predictions, split)
        return name, metrics, Path(args.out or "metrics.json")
    if args.weights is None:
        raise ConfigError("--weights CKPT is required (or --predictions JSON to score a results file)")
    info = dist_utils.init_distributed(args.device)
    try:
        loaded = load_model(args.weights, info.device, ema=not args.raw)
        dataset = loaded.task.build_eval_dataset(split, loaded)
        skipped: list[Unreadable] = []
        check = "visiondet data check" + (f" --annotations {args.annotations} --images {args.images}"
                                          if args.annotations and args.images else "")
        loader = eval_loader(dataset, loaded.task.collate, batch_size=args.batch_size, workers=args.workers,
                             pin_memory=info.device.type == "cuda", skip_unreadable=args.skip_unreadable,
                             hint=f"find every such file with `{check}`, or pass --skip-unreadable",
                             on_skip=skipped.extend)
        with torch.inference_mode():
            metrics = loaded.task.evaluate(loaded.model, WithProgress(loader, enabled=info.is_main),
                                           info.device, loaded.classes)
        for file in skipped:
            print(f"warning: skipped unreadable image {file.path}: {file.reason}", file=sys.stderr)
        if args.skip_unreadable:  # every process's count (all_reduce_sum keeps the ranks in step)
            total = dist_utils.all_reduce_sum(torch.tensor([float(len(skipped))], device=info.device))
            metrics["skipped_images"] = float(total.item())
        dist_utils.barrier()  # leave the group together (see cleanup)
    finally:
        dist_utils.cleanup()
    weights = Path(args.weights)
    return loaded.task.name, metrics, Path(args.out or weights.with_name(f"{weights.stem}_eval.json"))


def run(args: argparse.Namespace) -> int:
    from apps.config import ConfigError
    from apps.engine.loader import UnreadableImageError
    from apps.tasks import get_task
    from vision.checkpoint import CheckpointError

    try:
        task_name, metrics, out = evaluate(args)
    except (ConfigError, CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except UnreadableImageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    print(get_task(task_name).format_metrics(metrics))
    record = {"task": task_name, "weights": args.weights, "predictions": args.predictions,
              "data": {k: v for k in ("images", "annotations", "masks", "root") if (v := getattr(args, k))},
              "metrics": metrics}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"metrics written to {out}")
    return 0
