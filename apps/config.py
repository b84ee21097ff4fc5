"""Experiment files: YAML (+ ``base:`` inheritance) and dotted ``key=value`` overrides -> typed dataclasses.

One config system for every task. A file may name one or more ``base:`` files (paths relative to it);
they are deep-merged first (mappings merge key by key, everything else is replaced), then the file, then
the command-line overrides. The merged mapping becomes an :class:`Experiment` whose ``model`` and
``data.options`` sections take the dataclasses of the chosen task, so every key is typed and checked:
an unknown key is an error that suggests the closest valid one, a renamed key gives its new spelling, a
wrong type names the key and the expected type, and missing data files are reported before any work starts.
The typed conversion itself (``from_dict``, ``to_dict``, ``ConfigError``) lives in ``apps.schema``, below
the task registry this module reads, and is re-exported here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from apps.schema import ConfigError, check_renamed, convert_value, from_dict, suggest_key, to_dict
from apps.tasks import RETIRED_TASKS, TASKS, get_task

__all__ = [
    "ConfigError",
    "SplitConfig",
    "DataConfig",
    "TrainConfig",
    "Experiment",
    "load_config",
    "build_experiment",
    "from_dict",
    "to_dict",
    "parse_overrides",
    "save_config",
    "resolve_output_dir",
    "parse_duration",
    "training_data_name",
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


# ----------------------------------------------------------------------------------------------------------
# YAML files and overrides


class _Loader(yaml.SafeLoader):
    """PyYAML follows YAML 1.1, where ``1e-4`` (no dot) is a string; read it as a float, as YAML 1.2 does."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:(?:\d+\.\d*|\.\d+)(?:[eE][-+]?\d+)?|\d+[eE][-+]?\d+)$|^[-+]?\.(?:inf|Inf|INF)$|^\.(?:nan|NaN|NAN)$"),
    list("-+0123456789."),
)


def _yaml_load(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # a SafeLoader subclass: plain data only


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file")
    try:
        data = _yaml_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config must be a mapping of keys, got {type(data).__name__}")
    return data


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Return ``base`` updated by ``update``: nested mappings merge, other values (lists too) replace."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def load_yaml_with_bases(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read a config file and its ``base:`` chain (a path or a list of paths relative to the file)."""
    path = Path(path).resolve()
    if path in _seen:
        chain = " -> ".join(str(p) for p in (*_seen, path))
        raise ConfigError(f"{path}: circular base: {chain}")
    data = _read_yaml(path)
    bases = data.pop("base", None) or []
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise ConfigError(f"{path}: 'base' must be a path or a list of paths, got {bases!r}")
    merged: dict[str, Any] = {}
    for base in bases:
        merged = deep_merge(merged, load_yaml_with_bases(path.parent / base, (*_seen, path)))
    return deep_merge(merged, data)


_OVERRIDE = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*)=(.*)$", re.DOTALL)


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """``["train.lr=0.1", "data.val=null"]`` -> nested mapping; values are parsed as YAML scalars/lists."""
    out: dict[str, Any] = {}
    for text in overrides:
        match = _OVERRIDE.match(text)
        if not match:
            raise ConfigError(f"override {text!r}: expected key=value with a dotted key, e.g. train.lr=0.01")
        key, raw = match.groups()
        try:
            value = _yaml_load(raw) if raw.strip() else None
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {text!r}: cannot parse the value: {exc}") from exc
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = node[part] = {}
            node = child
        node[parts[-1]] = value
    return out


# ----------------------------------------------------------------------------------------------------------
# Experiment


def build_experiment(data: dict[str, Any]) -> Experiment:
    """Typed :class:`Experiment` from a merged mapping; the task decides the model and options types.
    A renamed model key is an error that gives the new spelling (checkpoints migrate them silently)."""
    data = dict(data)
    name = data.get("task")
    if not isinstance(name, str):
        raise ConfigError(f"missing key 'task' (one of {sorted(TASKS)})")
    if name in RETIRED_TASKS:
        raise ConfigError(RETIRED_TASKS[name])
    if name not in TASKS:
        raise ConfigError(f"task: unknown task {name!r}{suggest_key(name, sorted(TASKS))}")
    task = get_task(name)
    model_section = data.pop("model", None) or {}
    if isinstance(model_section, dict):
        check_renamed(task.model_config_type, model_section, "model")
    model = convert_value(model_section, task.model_config_type, "model")
    data_section = dict(data.pop("data", None) or {})
    options = convert_value(data_section.pop("options", None) or {}, task.options_type, "data.options")
    data_cfg = convert_value(data_section, DataConfig, "data")
    data_cfg.options = options
    exp = from_dict(Experiment, {**data, "model": model, "data": data_cfg})
    _check_values(exp)
    return exp


def _check_values(exp: Experiment) -> None:
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


def load_config(path: str | Path | None, overrides: list[str] = (), *, base: dict[str, Any] | None = None
                ) -> Experiment:
    """Read ``path`` (with its bases), apply ``overrides`` and return the typed experiment.

    ``base`` (e.g. the config saved in a run folder, for resuming) is used under the file when given.
    Errors are :class:`ConfigError` naming the file or the override.
    """
    merged = dict(base or {})
    source = "command line"
    if path is not None:
        source = str(path)
        merged = deep_merge(merged, load_yaml_with_bases(path))
    override_map = parse_overrides(list(overrides))
    merged = deep_merge(merged, override_map)
    try:
        exp = build_experiment(merged)
    except ConfigError as exc:
        where = "override" if _mentions_override(str(exc), override_map) else source
        raise ConfigError(f"{where}: {exc}") from None
    check_paths(exp)
    return exp


def _mentions_override(message: str, override_map: dict[str, Any]) -> bool:
    keys = []

    def walk(node: dict[str, Any], prefix: str) -> None:
        for k, v in node.items():
            keys.append(f"{prefix}{k}")
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")

    walk(override_map, "")
    return any(f"'{k}'" in message or message.startswith((f"{k}:", f"{k} ")) for k in keys)


def check_paths(exp: Experiment) -> None:
    """Fail early on missing files: the task's data paths, fine-tuning weights."""
    get_task(exp.task).check_config(exp)
    if exp.weights is not None and not Path(exp.weights).is_file():
        raise ConfigError(f"weights: {exp.weights}: no such checkpoint file")


def save_config(exp: Experiment, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(exp), sort_keys=False))


def resolve_output_dir(exp: Experiment, runs_root: str | Path = "runs") -> Path:
    """The run folder: ``output_dir`` if given, else the next free ``runs/<task>/expN`` (never reused)."""
    if exp.output_dir is not None:
        return Path(exp.output_dir)
    parent = Path(runs_root) / exp.task
    taken = [int(m.group(1)) for p in parent.glob("exp*") if (m := re.fullmatch(r"exp(\d+)", p.name))]
    return parent / f"exp{max(taken, default=0) + 1}"
