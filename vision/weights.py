"""Pretrained weights: where they come from, how they are fetched and checked, and how they are loaded.

A weight source is a row of ``WEIGHT_SOURCES``: architecture -> source name -> torchvision's published
file (name, URL, SHA-256). ``resolve_weights`` turns a source name or a local path into a local file,
downloading into ``weights/`` when needed; ``load_weights`` puts a torchvision ``.pth`` state dict or a
visiondet checkpoint into a model. Every file is read by ``vision.checkpoint.load_checkpoint``
(``torch.load(weights_only=True)``), so a file that carries pickled code is refused, never run.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm import tqdm

from vision.checkpoint import CheckpointError, checkpoint_weights, is_visiondet_checkpoint, load_checkpoint
from vision.layers import FrozenBatchNorm2d

__all__ = ["WEIGHT_SOURCES", "LoadReport", "WeightSource", "WeightsError", "load_state_dict_file",
           "load_weights", "resolve_weights", "sha256_file", "to_torchvision_state_dict"]


class WeightsError(ValueError):
    """Weights that cannot be found, fetched, verified or loaded; the message says which file and why."""


@dataclass(frozen=True)
class WeightSource:
    """One published weight file.

    ``sha256`` is the full hex digest where it is known, otherwise the leading digits that torchvision
    puts in the file name (``name-<first 8 hex digits of sha256>.pth``); a download must start with it.
    """

    file_name: str
    url: str
    sha256: str
    description: str = ""

    @property
    def full_hash(self) -> bool:
        return len(self.sha256) == 64


_TV = "https://download.pytorch.org/models/"


def _tv(file_name: str, sha256: str, description: str) -> WeightSource:
    return WeightSource(file_name, _TV + file_name, sha256, description)


_V1 = "torchvision IMAGENET1K_V1 (ImageNet-1k, 1000 classes)"
_V2 = "torchvision IMAGENET1K_V2 (ImageNet-1k, 1000 classes, newer training recipe)"

# Full SHA-256 digests of torchvision's published files, each found in at least two independent public
# records of the downloaded file (nothing was downloaded here). Five files have no full digest on public
# record that could be found: vgg11, vgg11_bn, vgg13, vgg13_bn and resnet152's V2 keep the 8-digit prefix of
# their file names, and are checked as prefixes (a download must start with it) rather than by a guess.
WEIGHT_SOURCES: dict[str, dict[str, WeightSource]] = {
    "resnet18": {"imagenet": _tv("resnet18-f37072fd.pth",
                                 "f37072fd47e89c5e827621c5baffa7500819f7896bbacec160b1a16c560e07ec", _V1)},
    "resnet34": {"imagenet": _tv("resnet34-b627a593.pth",
                                 "b627a593bcbe140c234610266fe4f8ae95ea42fc881d091c9b6052e6b1d0590f", _V1)},
    "resnet50": {"imagenet": _tv("resnet50-0676ba61.pth",
                                 "0676ba61b6795bbe1773cffd859882e5e297624d384b6993f7c9e683e722fb8a", _V1),
                 "imagenet-v2": _tv("resnet50-11ad3fa6.pth",
                                    "11ad3fa62ca79e40addfd354a8ec4b7c75143b3038b8d2a807fbc68deab379ca", _V2)},
    "resnet101": {"imagenet": _tv("resnet101-63fe2227.pth",
                                  "63fe2227b86e8f1f2063f43a75c84d195911b6a0eace650907dd3dc62dd49a0a", _V1),
                  "imagenet-v2": _tv(
                      "resnet101-cd907fc2.pth",
                      "cd907fc2a0de2292b2ba2b27d2216bc672d84632d1cf20058d01c0c03b5e020e", _V2)},
    "resnet152": {"imagenet": _tv("resnet152-394f9c45.pth",
                                  "394f9c45966e3651a89bbb78a48410a6755854ce4a5ab64927cf1c7247f85e58", _V1),
                  "imagenet-v2": _tv("resnet152-f82ba261.pth", "f82ba261", _V2)},
    "vgg11": {"imagenet": _tv("vgg11-8a719046.pth", "8a719046", _V1)},
    "vgg11_bn": {"imagenet": _tv("vgg11_bn-6002323d.pth", "6002323d", _V1)},
    "vgg13": {"imagenet": _tv("vgg13-19584684.pth", "19584684", _V1)},
    "vgg13_bn": {"imagenet": _tv("vgg13_bn-abd245e5.pth", "abd245e5", _V1)},
    "vgg16": {"imagenet": _tv("vgg16-397923af.pth",
                              "397923af8e79cdbb6a7127f12361acd7a2f83e06b05044ddf496e83de57a5bf0", _V1)},
    "vgg16_bn": {"imagenet": _tv("vgg16_bn-6c64b313.pth",
                                 "6c64b3138f2f4fcb3bcc4cafde11619c4f440eb1631787e93a682fd88305888a", _V1)},
    "vgg19": {"imagenet": _tv("vgg19-dcbb9e9d.pth",
                              "dcbb9e9dad569fff7a846263a77324fc34978fea2bfb039c012d710e1776ae44", _V1)},
    "vgg19_bn": {"imagenet": _tv("vgg19_bn-c79401a0.pth",
                                 "c79401a0cf3cb42714e4182f5868c7a6f4f4534f5df9e956e2bb2098de41cbb6", _V1)},
}

_PATH_SUFFIXES = (".pth", ".pt", ".ckpt", ".bin")


def sha256_file(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def _looks_like_path(source: str) -> bool:
    return os.sep in source or "/" in source or source.endswith(_PATH_SUFFIXES)


def _lookup(arch: str, source: str) -> WeightSource:
    if arch not in WEIGHT_SOURCES:
        raise WeightsError(f"no named weight sources for architecture {arch!r}; known: "
                           f"{', '.join(WEIGHT_SOURCES)}. Pass a path to a .pth file instead.")
    sources = WEIGHT_SOURCES[arch]
    if source not in sources:
        raise WeightsError(f"{source!r} is neither an existing file nor a weight source for {arch}; "
                           f"sources: {', '.join(sources)}")
    return sources[source]


def _check_hash(path: Path, entry: WeightSource, what: str) -> None:
    actual = sha256_file(path)
    if not actual.startswith(entry.sha256.lower()):
        kind = "" if entry.full_hash else " (prefix from torchvision's file name)"
        raise WeightsError(f"{what} {path} has sha256 {actual}, expected {entry.sha256}{kind}")


def _download(entry: WeightSource, target: Path, progress: bool) -> None:
    """Stream ``entry.url`` into a temporary file beside ``target``, check the hash, then rename."""
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(entry.url, timeout=60) as response:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=entry.file_name,
                      disable=not progress) as bar:
                while chunk := response.read(1 << 20):
                    out.write(chunk)
                    bar.update(len(chunk))
        try:
            _check_hash(tmp, entry, f"download of {entry.url} into")
        except WeightsError as exc:
            raise WeightsError(f"{exc}: refused and deleted") from None
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def resolve_weights(arch: str, source: str | os.PathLike, weights_dir: str | os.PathLike = "weights", *,
                    progress: bool = True) -> Path:
    """A local file for ``source``: an existing path as is, or a named source of ``arch`` fetched once.

    A named source (e.g. ``"imagenet"``) lives in ``weights_dir`` under torchvision's file name. When it
    is missing it is downloaded (tqdm progress bar on stderr when ``progress``) to a temporary file,
    its SHA-256 is checked, and only then is it renamed into place: a failed or corrupt download leaves
    nothing behind. Without network the error says which URL to fetch and where to put the file.
    """
    as_path = Path(source)
    if as_path.is_file():
        return as_path
    source = str(source)
    if _looks_like_path(source):
        raise WeightsError(f"{source}: no such weights file")
    entry = _lookup(arch, source)
    target = Path(weights_dir) / entry.file_name
    if target.is_file():
        _check_hash(target, entry, f"{arch} {source!r} weights file")
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        _download(entry, target, progress)
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise WeightsError(
            f"cannot download {arch} {source!r} weights from {entry.url} ({reason}). Offline? Fetch that "
            f"URL on a connected machine and put the file at {target.resolve()} "
            f"(sha256 {entry.sha256}{'' if entry.full_hash else '...'})"
        ) from exc
    return target


def load_state_dict_file(path: str | os.PathLike) -> dict[str, Tensor]:
    """The state dict in a torchvision ``.pth`` file or a visiondet checkpoint (``weights_only`` load)."""
    try:
        obj = load_checkpoint(path)
    except CheckpointError as exc:
        raise WeightsError(str(exc)) from exc
    if is_visiondet_checkpoint(obj):
        obj = checkpoint_weights(obj, ema=False)
    if not isinstance(obj, Mapping) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise WeightsError(f"{path}: not a state dict (expected a mapping of names to tensors, "
                           f"or a visiondet checkpoint with a state_dict)")
    return dict(obj)


def _strip_prefix(state: dict[str, Tensor], model_keys: Sequence[str]) -> dict[str, Tensor]:
    """Drop a wrapper prefix ("module." from DDP, "backbone." from a classifier checkpoint, ...).

    The prefix is read off the file: whatever precedes the model's first key in the file's keys, kept
    only when it makes more of the model's keys match than no prefix does.
    """
    if not model_keys:
        return state
    first = model_keys[0]
    candidates = {k[: -len(first)] for k in state if k.endswith(first)} - {""}

    def matches(prefix: str) -> int:
        return sum(prefix + k in state for k in model_keys)

    best = max(candidates, key=matches, default="")
    if best and matches(best) > matches(""):
        return {k[len(best):]: v for k, v in state.items() if k.startswith(best)}
    return state


@dataclass
class LoadReport:
    """What a non-strict load left out: model keys not in the file, file keys not in the model, and
    keys present in both with different shapes."""

    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.missing or self.unexpected or self.mismatched)

    def describe(self, limit: int = 5) -> str:
        parts = []
        for name, keys in (("missing", self.missing), ("unexpected", self.unexpected),
                           ("shape mismatch", self.mismatched)):
            if keys:
                more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
                parts.append(f"{name}: {', '.join(keys[:limit])}{more}")
        return "; ".join(parts)


def _is_counter(key: str) -> bool:
    # BatchNorm's step counter is absent from FrozenBatchNorm2d and filled in by BatchNorm when missing.
    return key.endswith("num_batches_tracked")


def load_weights(model: nn.Module, source_or_path: str | os.PathLike | Mapping[str, Tensor], *,
                 strict: bool = True, arch: str | None = None, ignore: Sequence[str] = (),
                 weights_dir: str | os.PathLike = "weights", progress: bool = True) -> LoadReport:
    """Load weights into ``model``: a named source of ``arch`` (default ``model.arch``), a torchvision
    ``.pth`` state dict, a visiondet checkpoint, or an in-memory state dict.

    Keys are mapped where needed: a wrapper prefix in the file is dropped, and a model that says it keeps
    only part of a network (``part_of_network = True``, as ``vision.backbones.Backbone`` does) takes just
    its own keys from a full network's file. ``ignore`` lists key prefixes to leave out on both sides
    (e.g. ``"fc."`` to keep a new classification head). With
    ``strict`` every other key must match in name and shape, checked before anything is copied; without
    it the matching keys load and the rest are reported.
    """
    if isinstance(source_or_path, Mapping):
        where, state = "state dict", dict(source_or_path)
    else:
        arch = arch or getattr(model, "arch", None)
        path = source_or_path
        if not Path(path).is_file() and not _looks_like_path(str(path)):
            if arch is None:
                raise WeightsError(f"{source_or_path!r}: not a file, and {type(model).__name__} has no "
                                   f"architecture name to look up named sources (pass arch=...)")
            path = resolve_weights(arch, source_or_path, weights_dir, progress=progress)
        where, state = str(path), load_state_dict_file(path)

    model_state = model.state_dict()
    model_keys = [k for k in model_state if not k.startswith(tuple(ignore))]
    state = _strip_prefix(state, model_keys)
    state = {k: v for k, v in state.items() if not k.startswith(tuple(ignore))}
    if getattr(model, "part_of_network", False):
        state = {k: v for k, v in state.items() if k in model_state or _is_counter(k)}

    report = LoadReport(
        missing=[k for k in model_keys if k not in state and not _is_counter(k)],
        unexpected=[k for k in state if k not in model_state and not _is_counter(k)],
        mismatched=[f"{k} {tuple(v.shape)} vs {tuple(model_state[k].shape)}" for k, v in state.items()
                    if k in model_state and v.shape != model_state[k].shape],
    )
    if strict and report:
        raise WeightsError(f"{where}: does not fit {type(model).__name__}: {report.describe()}")
    skip = {k.split(" ")[0] for k in report.mismatched}
    model.load_state_dict({k: v for k, v in state.items() if k not in skip}, strict=False)
    return report


def to_torchvision_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """``model``'s weights with torchvision's keys, ready for ``torchvision_model.load_state_dict``.

    Works for ResNet, VGG and their ``Backbone`` wrappers (whose keys are a subset of the network's),
    and for models holding one under ``.backbone`` (e.g. the Classifier: its trunk only). Frozen batch
    norms get back the ``num_batches_tracked`` counter that BatchNorm2d carries.
    """
    trunk = getattr(model, "backbone", None)
    if isinstance(trunk, nn.Module):
        model = trunk
    state = dict(model.state_dict())  # tensors share storage with the model, as state_dict() does
    for name, module in model.named_modules():
        if isinstance(module, FrozenBatchNorm2d):
            state[f"{name}.num_batches_tracked" if name else "num_batches_tracked"] = torch.tensor(0)
    return state
