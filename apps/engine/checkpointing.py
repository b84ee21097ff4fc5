"""Run checkpoints: the file format of docs/ARCHITECTURE.md, resume state, fine-tuning weights, run folders.

Which run to resume and whether its config may change is apps/engine/resume.py (it reads configs; the
tasks write checkpoints through this module, so it reads no config and no task registry).

``last.pt`` (every epoch, every ``train.checkpoint_every`` optimizer steps and every
``train.checkpoint_minutes``) and ``best.pt`` (best primary metric) are written atomically by
``vision.checkpoint.save_checkpoint``: a run killed while writing leaves the previous file intact (plus a
stray temporary file, removed on resume).
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from apps.engine import distributed as dist_utils
from apps.engine.ema import ModelEMA
from apps.experiment import Experiment, resolve_output_dir, training_data_name
from apps.schema import ConfigError, to_dict
from vision.checkpoint import (
    FORMAT,
    VERSION,
    CheckpointError,
    checkpoint_weights,
    load_checkpoint,
    save_checkpoint,
)

__all__ = [
    "seed_everything",
    "capture_rng",
    "restore_rng",
    "make_checkpoint",
    "save",
    "remove_stale_temporaries",
    "FinetuneReport",
    "load_finetune_weights",
    "make_run_dir",
    "Counters",
    "RunCheckpoints",
]


def seed_everything(seed: int, *, deterministic: bool = False) -> None:
    """Seed Python, NumPy and torch; ``deterministic`` also selects deterministic kernels (slower)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it to be deterministic
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    else:
        torch.backends.cudnn.benchmark = True


def capture_rng() -> dict[str, Any]:
    """Every generator the main process uses, as plain data and tensors (loadable with weights_only)."""
    np_state = np.random.get_state(legacy=False)
    py_version, py_internal, py_gauss = random.getstate()
    return {
        "torch": torch.random.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
                  "pos": int(np_state["state"]["pos"]), "has_gauss": int(np_state["has_gauss"]),
                  "gauss": float(np_state["gauss"])},
        "python": {"version": py_version, "internal": list(py_internal), "gauss": py_gauss},
    }


def restore_rng(state: dict[str, Any]) -> None:
    torch.random.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state({"bit_generator": "MT19937",
                         "state": {"key": n["key"].numpy().astype(np.uint32), "pos": n["pos"]},
                         "has_gauss": n["has_gauss"], "gauss": n["gauss"]})
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss"]))


def make_checkpoint(*, exp: Experiment, model_cfg: Any, classes: list[dict[str, Any]],
                    preprocess: dict[str, Any], model: nn.Module, ema_state: dict[str, Any] | None,
                    metrics: dict[str, float], train_state: dict[str, Any] | None) -> dict[str, Any]:
    """The checkpoint dict (format "visiondet", version 1). ``model`` is the unwrapped module."""
    return {
        "format": FORMAT,
        "version": VERSION,
        "task": exp.task,
        "model": to_dict(model_cfg),
        "classes": [dict(c) for c in classes],
        "preprocess": dict(preprocess),
        "trained_on": training_data_name(exp.data),  # what the demo calls the model's data
        "state_dict": model.state_dict(),
        "ema_state_dict": ema_state,
        "config": to_dict(exp),
        "metrics": {k: float(v) for k, v in metrics.items()},
        "train_state": train_state,
    }


def save(ckpt: dict[str, Any], path: Path) -> Path:
    return save_checkpoint(ckpt, path)


def remove_stale_temporaries(run_dir: Path) -> list[Path]:
    """Delete temporary files left by a run killed during a checkpoint write."""
    stale = [p for p in run_dir.glob(".*.pt.*.tmp") if p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


@dataclass
class FinetuneReport:
    loaded: list[str] = field(default_factory=list)
    reinitialised: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # in the model only: initial values kept
    unexpected: list[str] = field(default_factory=list)  # in the checkpoint, not in the model: ignored

    def lines(self) -> list[str]:
        out = [f"weights: loaded {len(self.loaded)} tensors"]
        for key, have, want in self.reinitialised:
            out.append(f"weights: {key}: shape {list(have)} in the checkpoint, {list(want)} in the model: "
                       "re-initialised")
        if self.missing:
            out.append(f"weights: not in the checkpoint, left as initialised: {', '.join(self.missing)}")
        if self.unexpected:
            out.append(f"weights: not in the model, ignored: {', '.join(self.unexpected)}")
        return out


def load_finetune_weights(model: nn.Module, path: str | Path) -> FinetuneReport:
    """Copy every tensor of checkpoint ``path`` whose name and shape match into ``model`` (fine-tuning).

    Accepts a visiondet checkpoint (its EMA weights when present) or a bare state dict. Tensors whose
    shape differs (e.g. a head for another number of classes) keep the model's fresh initialisation.
    """
    ckpt = load_checkpoint(path, map_location="cpu")
    if isinstance(ckpt, dict) and ckpt.get("format") == FORMAT:
        state = checkpoint_weights(ckpt)
    elif isinstance(ckpt, dict) and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        state = ckpt
    else:
        raise CheckpointError(f"{path}: neither a visiondet checkpoint nor a state dict of tensors")
    own = model.state_dict()
    report = FinetuneReport()
    usable = {}
    for key, value in state.items():
        if key not in own:
            report.unexpected.append(key)
        elif tuple(value.shape) != tuple(own[key].shape):
            report.reinitialised.append((key, tuple(value.shape), tuple(own[key].shape)))
        else:
            usable[key] = value
            report.loaded.append(key)
    report.missing = [k for k in own if k not in state]
    if not usable:
        raise CheckpointError(f"{path}: no tensor of this checkpoint fits the model (another architecture?)")
    model.load_state_dict(usable, strict=False)
    return report


# ----------------------------------------------------------------------------------------------------------
# One run's folder and checkpoints


def make_run_dir(exp: Experiment, resume_path: Path | None, runs_root: Path, info: dist_utils.DistInfo
                 ) -> Path:
    """The run folder, made by rank 0 and broadcast: a resumed run's own, ``output_dir`` (refused when it
    already holds a run), or the next free ``runs/<task>/expN``."""
    path: Path | None = None
    if info.is_main:
        if resume_path is not None:
            path = resume_path.parent
            remove_stale_temporaries(path)
        elif exp.output_dir is not None:
            path = Path(exp.output_dir)
            if (path / "last.pt").exists():
                raise ConfigError(f"output_dir: {path} already holds a run; continue it with resume=true "
                                  "or choose another output_dir")
            path.mkdir(parents=True, exist_ok=True)
        else:
            while path is None:  # two runs started together must not share a folder
                candidate = resolve_output_dir(exp, runs_root)
                try:
                    candidate.mkdir(parents=True)
                    path = candidate
                except FileExistsError:
                    continue
    return Path(dist_utils.broadcast_object(str(path) if path else None))


@dataclass
class Counters:
    """Where a run stands; last.pt keeps it (``train_state``) with the last evaluation's metrics."""

    epoch: int = 0  # epochs finished
    batch_in_epoch: int = 0  # batches of the current epoch done
    step: int = 0  # optimizer steps done
    best: float | None = None  # best primary metric so far
    bad_evals: int = 0  # evaluations since it last improved
    metrics: dict[str, float] = field(default_factory=dict)  # the last evaluation


class RunCheckpoints:
    """``last.pt`` and ``best.pt`` of one run: what they hold, when ``last.pt`` is due, and resuming.

    Saving gathers every rank's random state, so every process calls :meth:`save_last` and :meth:`due`;
    only rank 0 writes. ``budget_state`` gives the time budget's state to keep (None without one).
    """

    def __init__(self, run_dir: Path, *, exp: Experiment, model_cfg: Any, classes: list[dict[str, Any]],
                 preprocess: dict[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer,
                 scheduler: Any, scaler: torch.amp.GradScaler, ema: ModelEMA | None, counters: Counters,
                 info: dist_utils.DistInfo, checkpoint_every: int, checkpoint_minutes: float,
                 budget_state: Callable[[], dict[str, float] | None]) -> None:
        self.run_dir, self.exp, self.model_cfg, self.classes = run_dir, exp, model_cfg, classes
        self.preprocess, self.model, self.optimizer, self.scheduler = preprocess, model, optimizer, scheduler
        self.scaler, self.ema, self.counters, self.info = scaler, ema, counters, info
        self.every, self.minutes, self.budget_state = checkpoint_every, checkpoint_minutes, budget_state
        self.saved_at = time.monotonic()  # of the last last.pt (train.checkpoint_minutes)

    def build(self, metrics: dict[str, float], *, resumable: bool) -> dict[str, Any]:
        c = self.counters
        train_state = None
        rngs = dist_utils.all_gather_object(capture_rng()) if resumable else None
        if resumable:
            train_state = {
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
                "epoch": c.epoch, "batch_in_epoch": c.batch_in_epoch, "step": c.step,
                "best": c.best, "bad_evals": c.bad_evals,
                "time_budget": self.budget_state(),
                "ema_updates": self.ema.updates if self.ema is not None else 0, "rng": rngs,
            }
        return make_checkpoint(
            exp=self.exp, model_cfg=self.model_cfg, classes=self.classes, preprocess=self.preprocess,
            model=self.model, ema_state=self.ema.state_dict() if self.ema is not None else None,
            metrics=metrics, train_state=train_state)

    def save_last(self) -> None:
        ckpt = self.build(self.counters.metrics, resumable=True)  # every rank: RNG states are gathered
        if self.info.is_main:
            save(ckpt, self.run_dir / "last.pt")
        self.saved_at = time.monotonic()

    def save_best(self, metrics: dict[str, float]) -> Path:
        best = self.build(metrics, resumable=False)
        if self.info.is_main:
            save(best, self.run_dir / "best.pt")
        return self.run_dir / "best.pt"

    def due(self) -> bool:
        """After an optimizer step: ``train.checkpoint_every`` steps or ``train.checkpoint_minutes`` since the
        last save (rank 0's clock decides for all ranks: saving gathers every rank's random state)."""
        due = bool(self.every) and self.counters.step % self.every == 0
        due = due or (self.minutes > 0 and time.monotonic() - self.saved_at >= self.minutes * 60)
        return bool(dist_utils.broadcast_object(due)) if self.info.world_size > 1 else due

    def restore(self, path: Path, log: Callable[[str], None], warn: Callable[[str], None]
                ) -> tuple[dict[str, Any], dict[str, float] | None]:
        """Load ``path`` (a last.pt) into the model, EMA, optimizer, scheduler, scaler and counters.
        Returns this rank's random state (to restore last, see the trainer) and the time budget's state."""
        ckpt = load_checkpoint(path, map_location="cpu")
        state = ckpt.get("train_state")
        if not state:
            raise ConfigError(f"resume: {path}: has no train_state (best.pt cannot be resumed; use last.pt)")
        if ckpt.get("task") != self.exp.task or ckpt.get("classes") != self.classes:
            raise ConfigError(f"resume: {path}: task or classes differ from this run's data")
        self.model.load_state_dict(ckpt["state_dict"])
        if self.ema is not None and ckpt.get("ema_state_dict"):
            self.ema.load_state_dict(ckpt["ema_state_dict"], state["ema_updates"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        c = self.counters
        c.epoch, c.batch_in_epoch, c.step = state["epoch"], state["batch_in_epoch"], state["step"]
        c.best, c.bad_evals = state["best"], state["bad_evals"]
        c.metrics = dict(ckpt.get("metrics") or {})
        log(f"resuming {path} at epoch {c.epoch + 1}, batch {c.batch_in_epoch}, step {c.step}")
        ranks = state["rng"]
        if len(ranks) != self.info.world_size:
            warn(f"resume: saved by {len(ranks)} process(es), now {self.info.world_size}: "
                 "random streams will differ from an uninterrupted run")
        return ranks[self.info.rank % len(ranks)], state.get("time_budget")
