"""Resuming a run: which ``last.pt`` to continue, and which settings may differ from its config.yaml.

A run is continued explicitly (``resume=RUN_DIR``, or ``resume=true`` with ``output_dir``), with its own
config.yaml; settings that would make it another experiment (data, model, schedule, seed) need
``resume_force``. The state itself is restored by :class:`apps.engine.checkpointing.RunCheckpoints`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from apps.config import build_experiment
from apps.experiment import Experiment
from apps.migrations import migrate_renamed
from apps.schema import ConfigError, to_dict
from apps.tasks import TASKS, get_task

__all__ = ["find_resume_checkpoint", "RESUME_FREE_KEYS", "saved_config", "resume_changes"]


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
