"""Experiment files: YAML (+ ``base:`` inheritance) and dotted ``key=value`` overrides -> typed dataclasses.

One config system for every task. A file may name one or more ``base:`` files (paths relative to it);
they are deep-merged first (mappings merge key by key, everything else is replaced), then the file, then
the command-line overrides. The merged mapping becomes an :class:`Experiment` whose ``model`` and
``data.options`` sections take the dataclasses of the chosen task, so every key is typed and checked:
an unknown key is an error that suggests the closest valid one, a renamed key gives its new spelling, a
wrong type names the key and the expected type, and missing data files are reported before any work starts.
The types themselves (:class:`Experiment`, :class:`SplitConfig`, ...) live in ``apps.experiment`` and the
typed conversion (``from_dict``, ``to_dict``, ``ConfigError``) in ``apps.schema``: the tasks import those,
never this module, which reads the task registry; both are re-exported here.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from apps.experiment import (
    DataConfig,
    Experiment,
    SplitConfig,
    TrainConfig,
    check_values,
    parse_duration,
    resolve_output_dir,
    training_data_name,
)
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
    check_values(exp)
    return exp


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
