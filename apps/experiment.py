"""What one training run is: the typed sections of an experiment file and the checks that need no task.

:class:`Experiment` holds the task's name, its model config (the task's own dataclass), the data splits,
the optimisation settings and where and how the run goes. Tasks (apps/tasks/) and the engine read these
types; the loader of experiment files (apps/config.py) fills them from YAML and overrides with the model
and options types the task names. Nothing here knows a task, so both sides import it and neither imports
the other's module for it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from apps.schema import ConfigError

__all__ = [
    "SplitConfig",
    "DataConfig",
    "TrainConfig",
    "Experiment",
    "TestedScale",
    "check_values",
    "parse_duration",
    "training_data_name",
    "resolve_output_dir",
]


@dataclass
class SplitConfig:
    """One data split.

    Detection and segmentation read COCO data: ``images`` (folder) + ``annotations`` (JSON); segmentation
    may give ``masks`` (folder of PNG index masks) instead of annotations. Classification reads an
    ImageFolder ``root`` (one sub-folder per class). ``transforms`` is an albumentations list such as
    ``[{name: HorizontalFlip, p: 0.5}]``; ``None`` means the task's default pipeline for the split.
    """

    images: str | None = None
    annotations: str | None = None
    masks: str | None = None
    root: str | None = None
    transforms: list[dict[str, Any]] | None = None


@dataclass
class DataConfig:
    train: SplitConfig = field(default_factory=SplitConfig)
    val: SplitConfig | None = None  # no validation split: no evaluation, best.pt or early stopping
    workers: int = 2  # DataLoader worker processes per training process
    # a file that cannot be decoded: false ends the run with one line naming it (check the set with
    # `visiondet data check`); true skips it, lists it in <run>/skipped_images.txt and counts it
    skip_unreadable: bool = False
    # the training data in a few words, as checkpoints (``trained_on``) and the demo show it; None: named
    # from data.train's folders, e.g. "shapes_det (train)" (see training_data_name)
    name: str | None = None
    options: Any = None  # the task's own options dataclass (Task.options_type), e.g. image size


@dataclass
class TrainConfig:
    """Optimisation settings. Epoch-based values (milestones, step_size, cycle_epochs) are converted to
    optimizer steps; the learning rate changes every step."""

    epochs: int = 12
    batch_size: int = 8  # per process; the effective batch is batch_size * accum_steps * world size
    lr: float = 0.01  # used as given: no automatic scaling with the batch or the number of processes
    optimizer: Literal["sgd", "adagrad", "rmsprop", "adam", "adamw"] = "sgd"
    momentum: float = 0.9  # sgd and rmsprop
    nesterov: bool = False  # sgd
    betas: tuple[float, float] = (0.9, 0.999)  # adam, adamw
    eps: float = 1e-8  # adagrad, rmsprop, adam, adamw
    weight_decay: float = 1e-4
    norm_weight_decay: float = 0.0  # weight decay of normalisation layers and of every bias
    backbone_lr_mult: float = 1.0  # lr multiplier for parameters under the model's `backbone`
    scheduler: Literal["constant", "step", "multistep", "cosine", "poly", "cyclic", "onecycle"] = "cosine"
    step_size: int = 30  # step: epochs between decays
    milestones: list[int] = field(default_factory=list)  # multistep: epochs where lr *= gamma
    gamma: float = 0.1  # step, multistep
    power: float = 0.9  # poly
    min_lr_ratio: float = 0.0  # cosine, poly: final lr as a fraction of lr; cyclic: the cycle's low point
    cycle_epochs: float = 4.0  # cyclic: length of one full triangle (up and down)
    pct_start: float = 0.3  # onecycle: the share of the run spent rising from lr / 25 to lr
    warmup_iters: int = 0  # linear warm-up over this many optimizer steps
    warmup_factor: float = 0.001  # warm-up starts at lr * warmup_factor
    # mixed precision (autocast) in amp_dtype, on CUDA or the CPU; auto: bfloat16 where the processor
    # computes it natively, else float32 (apps/engine/precision.py)
    amp: bool | Literal["auto"] = False
    amp_dtype: Literal["bfloat16", "float16"] = "bfloat16"  # float16 uses a gradient scaler
    grad_clip: float | None = None  # max global L2 norm of the gradients
    accum_steps: int = 1  # batches whose gradients are summed before one optimizer step
    ema: bool = False  # keep an exponential moving average of the weights (evaluated and saved too)
    ema_decay: float = 0.9998
    patience: int | None = None  # stop after this many evaluations without a better primary metric
    eval_every: int = 1  # epochs between evaluations
    checkpoint_every: int = 0  # also write last.pt every N optimizer steps (0: only at epoch ends)
    checkpoint_minutes: float = 10.0  # also write last.pt this often during an epoch (0: never)
    log_every: int = 20  # optimizer steps between log lines / metrics.jsonl records
    max_nonfinite: int = 5  # consecutive non-finite losses that stop the run
    deterministic: bool = False  # deterministic kernels (slower); with a fixed seed, runs repeat exactly
    unfreeze_at_epoch: int | None = None  # transfer learning: unfreeze the frozen backbone at this epoch
    # train for this long (90s, 20m, 2h, 1h30m) instead of `epochs`: the schedule (warm-up, decay,
    # evaluations) is laid over the steps that fit, measured as the run goes (apps/engine/schedule.py)
    time_budget: str | int | float | None = None


@dataclass
class TestedScale:
    """Where a recipe was measured (its ``tested:`` block): the time budgets, the training set's size and,
    one line each, what the studies found there. ``visiondet train`` quotes the findings when a run leaves
    that scale, so a user knows the recipe's choices were measured elsewhere."""

    budgets: list[str] = field(default_factory=list)  # durations, e.g. [10m, 20m]
    train_images: int | None = None  # the training split the studies used
    findings: list[str] = field(default_factory=list)
    source: str = ""  # where the tables are (docs/LESSONS.md ...)


@dataclass
class Experiment:
    """One training run. ``model`` is the task's model config dataclass (Task.model_config_type)."""

    task: str
    model: Any
    data: DataConfig
    train: TrainConfig = field(default_factory=TrainConfig)
    output_dir: str | None = None  # None: a new runs/<task>/expN folder
    device: str = "auto"  # auto (CUDA if present, else CPU), cpu, cuda, cuda:1 ...
    seed: int = 0
    weights: str | None = None  # fine-tune from this checkpoint's weights (mismatched layers re-initialised)
    resume: bool | str = False  # a run folder / last.pt to continue (true: the one in output_dir)
    # resuming with other data, model or schedule than the run's saved config.yaml is refused unless true
    resume_force: bool = False
    tested: TestedScale | None = None  # the recipe's measured scale (apps/engine/tested.py)


# folders that hold a split's files rather than name it (images/ beside annotations.json, VOC's JPEGImages)
_CONTENT_FOLDERS = {"images", "imgs", "jpegimages", "masks", "annotations", "labels"}


def training_data_name(data: DataConfig) -> str:
    """``data.name``, else a readable name of the training split from its paths: the dataset folder and the
    split, ``data/shapes_det/train/annotations.json`` -> ``"shapes_det (train)"``,
    ``coco/annotations/instances_train2017.json`` -> ``"coco (instances_train2017)"``. Never a full path:
    the demo shows it to anyone who opens the page."""
    if data.name:
        return data.name
    split = data.train
    source = split.annotations or split.root or split.images or split.masks
    if not source:
        return "unnamed data"
    path = Path(source)
    if path.suffix:  # a file: its folder names the split, unless it is a folder of annotation files
        folder = path.parent
        if folder.name.lower() in _CONTENT_FOLDERS:
            return f"{folder.parent.name} ({path.stem})" if folder.parent.name else path.stem
        if not folder.name:  # a file in the working folder
            return path.stem
        path = folder
    if path.name.lower() in _CONTENT_FOLDERS and path.parent.name:
        path = path.parent
    return f"{path.parent.name} ({path.name})" if path.parent.name not in ("", ".") else path.name


def check_values(exp: Experiment) -> None:
    t = exp.train
    positive = {"train.epochs": t.epochs, "train.batch_size": t.batch_size,
                "train.accum_steps": t.accum_steps, "train.eval_every": t.eval_every,
                "train.log_every": t.log_every, "train.max_nonfinite": t.max_nonfinite}
    for key, value in positive.items():
        if value < 1:
            raise ConfigError(f"{key}: must be >= 1, got {value}")
    if t.lr <= 0:
        raise ConfigError(f"train.lr: must be > 0, got {t.lr}")
    if t.checkpoint_every < 0 or t.warmup_iters < 0 or exp.data.workers < 0:
        raise ConfigError("train.checkpoint_every, train.warmup_iters and data.workers must be >= 0")
    if t.checkpoint_minutes < 0:
        raise ConfigError(f"train.checkpoint_minutes: must be >= 0, got {t.checkpoint_minutes}")
    if not 0.0 < t.ema_decay < 1.0:
        raise ConfigError(f"train.ema_decay: must be in (0, 1), got {t.ema_decay}")
    if t.nesterov and (t.optimizer != "sgd" or t.momentum <= 0):
        raise ConfigError("train.nesterov: needs train.optimizer=sgd and train.momentum > 0")
    if sorted(t.milestones) != t.milestones:
        raise ConfigError(f"train.milestones: must be increasing, got {t.milestones}")
    if not 0.0 < t.pct_start < 1.0:
        raise ConfigError(f"train.pct_start: must be in (0, 1), got {t.pct_start}")
    if t.patience is not None and t.patience < 1:
        raise ConfigError(f"train.patience: must be >= 1 or null, got {t.patience}")
    if t.time_budget is not None:
        parse_duration(t.time_budget, "train.time_budget")


_DURATION = re.compile(r"^(?:(\d+(?:\.\d*)?)h)?(?:(\d+(?:\.\d*)?)m)?(?:(\d+(?:\.\d*)?)s)?$")


def parse_duration(value: str | int | float, key: str = "duration") -> float:
    """``"90s"``, ``"20m"``, ``"2h"``, ``"1h30m"`` -> seconds (> 0). A bare number is refused: minutes or
    hours (Ultralytics' ``time=`` is hours) would both be guesses."""
    text = str(value).strip().lower().replace(" ", "")
    match = _DURATION.match(text) if not isinstance(value, bool) else None
    if isinstance(value, int | float) and not isinstance(value, bool):
        raise ConfigError(f"{key}: {value!r} has no unit; write e.g. {value}s, {value}m or {value}h")
    if not text or match is None or not any(match.groups()):
        raise ConfigError(f"{key}: cannot read {value!r} as a duration; write e.g. 90s, 20m, 2h or 1h30m")
    hours, minutes, seconds = (float(g) if g else 0.0 for g in match.groups())
    total = hours * 3600 + minutes * 60 + seconds
    if total <= 0:
        raise ConfigError(f"{key}: must be longer than zero, got {value!r}")
    return total


def resolve_output_dir(exp: Experiment, runs_root: str | Path = "runs") -> Path:
    """The run folder: ``output_dir`` if given, else the next free ``runs/<task>/expN`` (never reused)."""
    if exp.output_dir is not None:
        return Path(exp.output_dir)
    parent = Path(runs_root) / exp.task
    taken = [int(m.group(1)) for p in parent.glob("exp*") if (m := re.fullmatch(r"exp(\d+)", p.name))]
    return parent / f"exp{max(taken, default=0) + 1}"
