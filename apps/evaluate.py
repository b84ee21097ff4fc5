"""`visiondet evaluate` as a job: :class:`EvaluateOptions` in, metrics printed and written as JSON.

The checkpoint's task builds the dataset, runs its evaluator and formats the result (``--predictions``: the
named task scores a results file without a model). Under torchrun each process evaluates a share of the
images and the counts are combined.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import torch
from tqdm import tqdm

from apps import WEIGHTS_DIR
from apps.config import ConfigError, SplitConfig
from apps.engine import distributed as dist_utils
from apps.engine.loader import DataWarnings, Unreadable, eval_loader
from apps.tasks import TASKS, get_task, load_model
from vision.data.check import check_dataset
from vision.layers import prepare_for_inference

__all__ = ["EvaluateOptions", "WithProgress", "check_pairing", "default_out", "evaluate", "run_evaluate"]

EVALUATE_DIR = Path("runs") / "evaluate"  # metrics of weights that are not in a training run's folder


@dataclass
class EvaluateOptions:
    """Everything one `visiondet evaluate` needs (the command line, as a value)."""

    weights: str | None = None  # a visiondet checkpoint
    images: str | None = None
    annotations: str | None = None
    masks: str | None = None
    root: str | None = None
    predictions: str | None = None  # score a saved results file instead, no model
    task: str | None = None  # the task of ``predictions`` (default: detection)
    out: str | None = None  # default: see default_out; metrics.json with predictions
    batch_size: int = 8
    workers: int = 2
    device: str = "auto"
    raw: bool = False  # the raw weights, not the EMA weights
    skip_unreadable: bool = False
    allow_size_mismatch: bool = False  # evaluate images whose size differs from the JSON (boxes clipped)


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


def default_out(weights: str | os.PathLike) -> Path:
    """Where the metrics of ``weights`` go without --out: beside them in a training run's folder (it has
    the run's config.yaml), else under runs/evaluate/, never into the shipped weights/ or beside a file
    that is not ours."""
    weights = Path(weights)
    name = f"{weights.stem}_eval.json"
    in_run = (weights.parent / "config.yaml").is_file()
    if in_run and weights.parent.resolve() != WEIGHTS_DIR.resolve() and os.access(weights.parent, os.W_OK):
        return weights.with_name(name)
    return EVALUATE_DIR / name


def check_pairing(annotations: str, images: str, *, allow_size_mismatch: bool = False) -> None:
    """The pairing part of `visiondet data check` on the evaluated split, before any model runs: images
    whose size differs from the JSON (the annotations of another set with the same file names, say) are
    a one-line ConfigError naming how many and the first, unless ``allow_size_mismatch``. Only headers
    are read (decoding problems are the loader's to report, with --skip-unreadable)."""
    if allow_size_mismatch or not Path(annotations).is_file() or not Path(images).is_dir():
        return
    report = check_dataset(annotations, images, decode=False)
    for finding in report.findings:
        if finding.code == "size_mismatch":
            raise ConfigError(
                f"{finding.count} of the {report.num_images} images in {images} differ in size from "
                f"{annotations} (the first: {finding.examples[0]}): the annotations are not these images' "
                f"(another set with the same file names?); `visiondet data check --annotations {annotations} "
                f"--images {images}` lists them; --allow-size-mismatch evaluates anyway (boxes clipped)")


def evaluate(opts: EvaluateOptions) -> tuple[str, dict[str, float], Path]:
    """Run the evaluation ``opts`` describe; returns (task name, metrics, JSON path)."""
    split = SplitConfig(images=opts.images, annotations=opts.annotations, masks=opts.masks, root=opts.root)
    for flag in ("images", "annotations", "masks", "root", "predictions"):
        value = getattr(opts, flag)
        if value is not None and not Path(value).exists():
            raise ConfigError(f"--{flag}: {value}: no such file or folder")
    if opts.batch_size < 1 or opts.workers < 0:
        raise ConfigError("--batch-size must be >= 1 and --workers >= 0")
    if opts.predictions is not None:
        name = opts.task or "detection"
        if name not in TASKS:
            raise ConfigError(f"--task: unknown task {name!r}; known: {', '.join(sorted(TASKS))}")
        metrics = get_task(name).score_predictions(opts.predictions, split)
        return name, metrics, Path(opts.out or "metrics.json")
    if opts.weights is None:
        raise ConfigError("--weights CKPT is required (or --predictions JSON to score a results file)")
    if opts.annotations and opts.images:
        check_pairing(opts.annotations, opts.images, allow_size_mismatch=opts.allow_size_mismatch)
    info = dist_utils.init_distributed(opts.device)
    try:
        loaded = load_model(opts.weights, info.device, ema=not opts.raw)
        # the model `visiondet predict` runs (batch norms folded): both give the same outputs
        loaded = dataclasses.replace(loaded, model=prepare_for_inference(loaded.model))
        dataset = loaded.task.build_eval_dataset(split, loaded)
        skipped: list[Unreadable] = []
        check = "visiondet data check" + (f" --annotations {opts.annotations} --images {opts.images}"
                                          if opts.annotations and opts.images else "")
        loader = eval_loader(dataset, loaded.task.collate, batch_size=opts.batch_size, workers=opts.workers,
                             pin_memory=info.device.type == "cuda", skip_unreadable=opts.skip_unreadable,
                             hint=f"find every such file with `{check}`, or pass --skip-unreadable",
                             on_skip=skipped.extend, data_warnings=(data_warnings := DataWarnings()))
        with torch.inference_mode():
            metrics = loaded.task.evaluate(loaded.model, WithProgress(loader, enabled=info.is_main),
                                           info.device, loaded.classes, loaded.preprocess)
        every = DataWarnings()  # all processes' shares
        for patterns in dist_utils.all_gather_object(data_warnings.patterns):
            every.merge(patterns)
        if info.is_main:
            for line in every.lines():
                print(f"warning: {line}", file=sys.stderr)
        for file in skipped:
            print(f"warning: skipped unreadable image {file.path}: {file.reason}", file=sys.stderr)
        if opts.skip_unreadable:  # every process's count (all_reduce_sum keeps the ranks in step)
            total = dist_utils.all_reduce_sum(torch.tensor([float(len(skipped))], device=info.device))
            metrics["skipped_images"] = float(total.item())
        dist_utils.barrier()  # leave the group together (see cleanup)
    finally:
        dist_utils.cleanup()
    return loaded.task.name, metrics, Path(opts.out) if opts.out else default_out(opts.weights)


def run_evaluate(opts: EvaluateOptions) -> int:
    """Evaluate, print the task's summary and write the JSON (rank 0); returns the exit code.

    Raises ConfigError, CheckpointError or UnreadableImageError for unusable arguments or data.
    """
    task_name, metrics, out = evaluate(opts)
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    print(get_task(task_name).format_metrics(metrics))
    record = {"task": task_name, "weights": opts.weights, "predictions": opts.predictions,
              "data": {k: v for k in ("images", "annotations", "masks", "root") if (v := getattr(opts, k))},
              "metrics": metrics}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"metrics written to {out}")
    return 0
