"""Run checkpoints: the file format of docs/ARCHITECTURE.md, resume state, fine-tuning weights.

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
import yaml
from torch import nn

from apps.config import ConfigError, Experiment, build_experiment, to_dict, training_data_name
from apps.schema import migrate_renamed
from apps.tasks import TASKS, get_task
from vision.checkpoint import FORMAT, VERSION, CheckpointError, load_checkpoint, save_checkpoint

__all__ = [
    "seed_everything",
    "capture_rng",
    "restore_rng",
    "make_checkpoint",
    "save",
    "remove_stale_temporaries",
    "find_resume_checkpoint",
    "RESUME_FREE_KEYS",
    "saved_config",
    "resume_changes",
    "FinetuneReport",
    "load_finetune_weights",
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


def find_resume_checkpoint(resume: bool | str, output_dir: str | None, task: str,
                           runs_root: Path = Path("runs")) -> Path:
    """The ``last.pt`` to continue: ``resume`` as a path (run folder or file), or ``output_dir``'s with
    ``resume=true``. Never a guess: ``resume=true`` without a folder is an error listing the recent runs."""
    if isinstance(resume, str):
        path = Path(resume)
    elif output_dir is not None:
        path = Path(output_dir)
    else:
        raise ConfigError("resume=true: which run? Give it: visiondet train --resume RUN_DIR (or "
                          f"resume=RUN_DIR); {_recent_runs(runs_root, task)}")
    if path.is_dir():
        path = path / "last.pt"
    if not path.is_file():
        raise ConfigError(f"resume: {path}: no such checkpoint file (runs keep last.pt in their folder; "
                          f"{_recent_runs(runs_root, task)})")
    return path


def _recent_runs(runs_root: Path, task: str, count: int = 5) -> str:
    """The most recent resumable runs of ``task`` as one line, newest first."""
    found = [(p.stat().st_mtime, p.parent) for p in (Path(runs_root) / task).glob("*/last.pt") if p.is_file()]
    if not found:
        return f"no resumable run under {Path(runs_root) / task}"
    found.sort(reverse=True)
    listed = ", ".join(f"{folder} ({time.strftime('%Y-%m-%d %H:%M', time.localtime(mtime))})"
                       for mtime, folder in found[:count])
    return f"most recent runs under {Path(runs_root) / task}: {listed}"


# Settings a resumed run may change freely: where and how it runs, how it logs and saves, how it treats
# unreadable files. Anything else (data, model, schedule, seed, ...) would make the continued run a
# different experiment than its config.yaml says, so it needs ``resume_force``.
RESUME_FREE_KEYS = frozenset({
    "output_dir", "resume", "resume_force", "device", "data.workers", "data.skip_unreadable",
    "train.log_every", "train.checkpoint_every", "train.checkpoint_minutes", "train.max_nonfinite",
    "train.eval_every", "train.patience",
})


def saved_config(run_dir: Path) -> dict[str, Any]:
    """The mapping of a run folder's ``config.yaml`` (what the run was started with), its model keys under
    their current names (a run started before a key was renamed still resumes)."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"resume: {path}: no such file (is {run_dir} a run folder?)")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"resume: {path}: invalid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"resume: {path}: not a mapping of settings")
    if data.get("task") in TASKS and isinstance(data.get("model"), dict):
        data["model"] = migrate_renamed(get_task(data["task"]).model_config_type, data["model"])
    return data


def _flat(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for key, value in node.items():
            out.update(_flat(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: node}


def resume_changes(run_dir: Path, exp: Experiment,
                   as_trained: Callable[[Experiment], Experiment] | None = None) -> list[str]:
    """``"key: saved -> now"`` for every setting of ``exp`` that differs from the run's config.yaml and
    is not free to change; a ConfigError naming them unless ``exp.resume_force``. Returns the changes.
    ``as_trained`` fills in what the data decides (num_classes) in the saved config as it was in ``exp``,
    so a config.yaml written before it held those values compares equal."""
    try:
        saved_exp = build_experiment(saved_config(run_dir))
        saved = to_dict(as_trained(saved_exp) if as_trained is not None else saved_exp)
    except ConfigError as exc:
        raise ConfigError(f"resume: {Path(run_dir) / 'config.yaml'}: {exc}") from None
    before, now = _flat(saved), _flat(to_dict(exp))
    changed = [f"{key}: {before.get(key)!r} -> {now.get(key)!r}" for key in sorted(before.keys() | now.keys())
               if key not in RESUME_FREE_KEYS and before.get(key) != now.get(key)]
    if changed and not exp.resume_force:
        raise ConfigError(f"resume: {run_dir} would continue with settings other than its config.yaml "
                          f"({'; '.join(changed)}). Resume with `visiondet train --resume {run_dir}` alone "
                          "to keep the saved ones, or add --force (resume_force=true) to continue with the "
                          "new ones")
    return changed


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
        state = ckpt.get("ema_state_dict") or ckpt["state_dict"]
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
