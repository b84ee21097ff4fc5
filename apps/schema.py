"""Typed dataclasses from plain mappings (YAML sections, checkpoint dicts) and back.

``from_dict`` checks every key and value type, so an error names the key and suggests the valid one: first
from ``SYNONYMS`` (other libraries' names and old spellings, ``learning_rate`` -> ``lr``, with the value
translated where the meaning differs: ``freeze_backbone: true`` -> ``freeze_at: 5``), then the closest
spelling. Keys renamed since a release (``apps.migrations.RENAMED_KEYS``) are migrated silently here, so old
checkpoints, whose model config is a plain dict, keep loading; a config file or override that still spells
one gets a one-line ConfigError from ``check_renamed`` instead, so people learn the new spelling.

Below ``apps.config`` (which needs the task registry) and ``apps.tasks`` (which load checkpoints).
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Callable
from typing import Any, Literal, get_args, get_origin, get_type_hints

from apps.migrations import (
    FLAG_NOTE,
    FREEZE_NOTE,
    TRAINABLE_NOTE,
    WEIGHTS_NOTE,
    Rename,
    freeze_at_from_flag,
    freeze_at_from_trainable,
    migrate_renamed,
    renamed_keys,
    same,
    weights_from_flag,
)

__all__ = ["ConfigError", "SYNONYMS", "check_renamed", "convert_value", "from_dict", "suggest_key", "to_dict"]


class ConfigError(ValueError):
    """A config that cannot be used; the message names the file or override, the key and the reason."""



def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "null"
    if isinstance(tp, type) and not get_args(tp):
        return tp.__name__
    if get_origin(tp) in (typing.Union, types.UnionType):  # "bool or 'auto'", not "Union[...]"
        return " or ".join(_type_name(arg) for arg in get_args(tp))
    if get_origin(tp) is Literal:
        return " or ".join(repr(v) for v in get_args(tp))
    return str(tp).replace("typing.", "")


def suggest_key(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.5)
    return f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(sorted(choices))}"


def convert_value(value: Any, tp: Any, key: str) -> Any:
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(f"{key}: expected {_type_name(tp)}, got null")
        for arg in args:
            if arg is type(None):
                continue
            try:
                return convert_value(value, arg, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        choices = list(get_args(tp))
        if value in choices:
            return value
        hint = suggest_key(str(value), [str(c) for c in choices]).replace("valid keys", "valid values")
        raise ConfigError(f"{key}: {value!r} is not one of {choices}{hint}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if value is None:
            return tp()
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping for {tp.__name__}, got {value!r}")
        return from_dict(tp, value, key)
    if origin is list:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item,) = get_args(tp) or (Any,)
        return [convert_value(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        args = get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(convert_value(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if len(args) != len(value):
            raise ConfigError(f"{key}: expected {len(args)} values, got {len(value)}: {value!r}")
        pairs = enumerate(zip(value, args, strict=True))
        return tuple(convert_value(v, a, f"{key}[{i}]") for i, (v, a) in pairs)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        _, vtype = get_args(tp) or (str, Any)
        return {str(k): convert_value(v, vtype, f"{key}.{k}") for k, v in value.items()}
    # YAML gives bool for true/false and int for 3; an int is accepted where a float is expected.
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif isinstance(tp, type) and isinstance(value, tp):
        return value
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")


def from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a mapping, checking every key and value type (errors name the key).
    Renamed keys are migrated silently (see the module docstring)."""
    data = migrate_renamed(cls, data)
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in data.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if key not in fields:
            raise ConfigError(f"unknown key {dotted!r}{_suggest(str(key), value, list(fields), prefix)}")
        kwargs[key] = convert_value(value, hints[key], dotted)
    for name, f in fields.items():
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if name not in kwargs and required:
            raise ConfigError(f"missing key {f'{prefix}.{name}' if prefix else name!r}")
    return cls(**kwargs)


def to_dict(obj: Any) -> Any:
    """Dataclasses -> plain dicts, tuples -> lists (YAML- and checkpoint-safe)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [to_dict(v) for v in obj]
    return obj


# ----------------------------------------------------------------------------------------------------------
# Other names for a key: synonyms (suggested in errors) and renamed keys (an error in a config file)


def _freeze_at_from_frozen_stages(value: Any) -> Any:
    # MMDetection's frozen_stages: -1 none, 0 the stem, 1 the stem and res2 ...; freeze_at counts the stem: 1
    return value + 1 if isinstance(value, int) and not isinstance(value, bool) else value



def _synonyms(new: str, olds: str, convert: Callable[[Any], Any] = same,
              note: str = "") -> dict[str, Rename]:
    return {old: Rename(new, convert, note) for old in olds.split()}


# What other libraries (torchvision, Ultralytics, Detectron2, MMDetection, Hugging Face, Lightning) and
# visiondet's own older files call a key -> its name here. Suggested before the closest spelling, for every
# section of every task's config, and only where the section has the key (segmentation has no freeze_at).
SYNONYMS: dict[str, Rename] = {
    **_synonyms("lr", "learning_rate lr0 base_lr initial_lr init_lr"),
    **_synonyms("epochs", "epoch num_epochs max_epochs n_epochs num_train_epochs"),
    **_synonyms("batch_size", "batch batchsize ims_per_batch samples_per_gpu images_per_batch "
                              "per_device_train_batch_size"),
    **_synonyms("workers", "num_workers workers_per_gpu dataloader_num_workers"),
    **_synonyms("backbone_weights", "pretrained pretrained_backbone weights_backbone backbone_pretrained "
                                    "pretrained_weights", weights_from_flag, WEIGHTS_NOTE),
    **_synonyms("freeze_at", "freeze_backbone", freeze_at_from_flag, FLAG_NOTE),
    **_synonyms("freeze_at", "trainable_backbone_layers trainable_layers", freeze_at_from_trainable,
                TRAINABLE_NOTE),
    **_synonyms("freeze_at", "frozen_stages", _freeze_at_from_frozen_stages,
                f"{FREEZE_NOTE}; freeze_at = frozen_stages + 1"),
    **_synonyms("warmup_iters", "warmup warmup_steps warmup_iterations warmup_iter"),
    **_synonyms("weight_decay", "wd decay"),
    **_synonyms("grad_clip", "clip_grad clip_grad_norm max_grad_norm gradient_clip_val clip_norm"),
    **_synonyms("accum_steps", "accumulate grad_accum gradient_accumulation_steps accumulate_grad_batches"),
    **_synonyms("optimizer", "optim solver"),
    **_synonyms("scheduler", "lr_scheduler schedule lr_schedule lr_policy"),
    **_synonyms("milestones", "steps lr_steps decay_epochs"),
    **_synonyms("amp", "fp16 mixed_precision use_amp half"),
    **_synonyms("num_classes", "nc num_class n_classes classes_num"),
    **_synonyms("patience", "early_stopping_patience early_stopping"),
    **_synonyms("checkpoint_every", "save_period checkpoint_period save_interval save_steps"),
    **_synonyms("log_every", "log_interval log_period print_freq logging_steps"),
    **_synonyms("eval_every", "eval_period eval_interval val_interval evaluation_interval"),
    **_synonyms("time_budget", "time time_limit max_time"),
    **_synonyms("output_dir", "out_dir work_dir project save_dir"),
}


def _yaml_value(value: Any) -> str:
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def _suggest(key: str, value: Any, fields: list[str], prefix: str) -> str:
    """The end of an unknown-key error: the known synonym's key (and value, where it translates), else
    the closest spelling, else the valid keys."""
    dotted = lambda name: f"{prefix}.{name}" if prefix else name  # noqa: E731
    synonym = SYNONYMS.get(key)
    if synonym is None:
        return suggest_key(dotted(key), [dotted(name) for name in fields])
    if synonym.new not in fields:  # the closest spelling would be a wrong turn (freeze_backbone -> frozen_bn)
        return (f"; its name here would be {dotted(synonym.new)!r}, which this section does not have; "
                f"valid keys: {', '.join(sorted(dotted(name) for name in fields))}")
    if synonym.convert is same:
        return f"; did you mean {dotted(synonym.new)!r}?"
    new_value = synonym.convert(value)
    return f"; did you mean '{dotted(synonym.new)}: {_yaml_value(new_value)}'? ({synonym.note})"


def check_renamed(cls: type, data: dict[str, Any], prefix: str = "") -> None:
    """A ConfigError for the first key of ``data`` that ``cls`` has renamed (config files, overrides)."""
    for old, rename in renamed_keys(cls).items():
        if old in data:
            dotted = f"{prefix}." if prefix else ""
            value = "" if rename.convert is same else f": {_yaml_value(rename.convert(data[old]))}"
            raise ConfigError(f"{dotted}{old} was renamed: use {dotted}{rename.new}{value} ({rename.note})")
