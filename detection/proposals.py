"""Proposal sources for the R-CNN family: selective search, precomputed files, a trained RPN, and a cache.

R-CNN and Fast R-CNN do not find their own regions: they classify boxes handed to them by a separate
"proposal" algorithm (selective search, Uijlings et al. 2013, in both papers). Every source here answers
the same question, "which boxes of this image may hold an object?", through one method:

    source.propose(image, image_id=None) -> Tensor[P, 4]

``image`` is the decoded picture, (H, W, 3) uint8 RGB (``to_uint8_image`` turns a model's [3, H, W] float
tensor back into one); the answer is P boxes, float32 xyxy in that image's pixels, best-ranked first.

``CachedSource`` wraps any source and stores its answers on disk, keyed by the sha1 of the decoded pixels
and the source's settings, so a second epoch, a second model or a second run never recomputes them. In
training, proposals are data: detection.proposal_data attaches them to each sample (by image id, file name
or the un-augmented pixels) before augmentation moves them with the boxes.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from abc import ABC, abstractmethod
from collections.abc import Hashable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor
from torchvision.ops import box_convert

from detection.rpn import RegionProposalNetwork
from detection.transform import scale_boxes

__all__ = [
    "ProposalError",
    "ProposalSource",
    "SelectiveSearch",
    "ProposalFile",
    "ProposalRecord",
    "CachedSource",
    "image_sha1",
    "to_uint8_image",
    "write_proposal_file",
    "ProposalConfig",
    "build_proposal_source",
    "RPNProposals",
]


class ProposalError(ValueError):
    """A proposal file or source that cannot be used; the message names the file and the reason."""


def to_uint8_image(image: Tensor) -> np.ndarray:
    """[3, H, W] float in [0, 1] -> (H, W, 3) uint8 RGB: the inverse of ``to_tensor`` on 8-bit images."""
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"expected an image tensor [3, H, W], got shape {tuple(image.shape)}")
    # Proposal algorithms are CPU programs (OpenCV), so leaving the device here is intended.
    pixels = (image.detach() * 255.0).round().clamp(0, 255).to(torch.uint8)
    return pixels.permute(1, 2, 0).contiguous().cpu().numpy()


def image_sha1(image: np.ndarray) -> str:
    """sha1 of the decoded pixels and their shape: the same picture in another file or format hashes alike."""
    image = np.ascontiguousarray(image)
    digest = hashlib.sha1(f"{image.shape}|{image.dtype}|".encode())
    digest.update(image.data)
    return digest.hexdigest()


def _as_image(image: np.ndarray | Tensor) -> np.ndarray:
    if isinstance(image, Tensor):
        return to_uint8_image(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an (H, W, 3) uint8 RGB image, got {image.shape} {image.dtype}")
    return image


def _clean_boxes(boxes: np.ndarray, min_size: float, max_boxes: int | None) -> np.ndarray:
    """Drop boxes smaller than ``min_size`` on either side and exact duplicates; keep the rank order."""
    boxes = boxes.reshape(-1, 4).astype(np.float32)
    sizes = np.minimum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])
    boxes = boxes[sizes >= min_size]
    _, first = np.unique(boxes, axis=0, return_index=True)
    boxes = boxes[np.sort(first)]
    return boxes[:max_boxes] if max_boxes is not None else boxes


class ProposalSource(ABC):
    """Anything that proposes candidate object boxes for an image."""

    @abstractmethod
    def propose(self, image: np.ndarray | Tensor, image_id: Hashable | None = None) -> Tensor:
        """Boxes [P, 4] float32 xyxy in the image's pixels, best first; ``image`` (H, W, 3) uint8 RGB."""

    @abstractmethod
    def settings(self) -> dict[str, Any]:
        """Everything that changes the answer (JSON-serialisable): part of the cache key."""

    def __call__(self, image: np.ndarray | Tensor, image_id: Hashable | None = None) -> Tensor:
        return self.propose(image, image_id)


class SelectiveSearch(ProposalSource):
    """Selective search (Uijlings et al., 2013) through OpenCV contrib's ``cv2.ximgproc.segmentation``.

    Args:
        mode: "fast" (the mode R-CNN and Fast R-CNN used, about 2k boxes for a 500x375 image) or "quality"
            (more strategies, about 4x the boxes and time).
        max_boxes: keep the first ``max_boxes`` in OpenCV's ranking (2000 in R-CNN).
        min_size: drop boxes whose shorter side is below this many pixels (of the original image).
        max_side: if set, segment a copy whose longer side is at most this (faster) and scale boxes back.

    OpenCV ranks regions by a randomised hierarchy level, as the paper does, so two runs return the same set
    of boxes in different orders; wrap the source in ``CachedSource`` to make runs repeatable.
    """

    def __init__(self, *, mode: str = "fast", max_boxes: int | None = 2000, min_size: float = 0,
                 max_side: int | None = None) -> None:
        if mode not in ("fast", "quality"):
            raise ValueError(f"selective search mode must be 'fast' or 'quality', got {mode!r}")
        try:
            import cv2

            cv2.ximgproc.segmentation.createSelectiveSearchSegmentation  # noqa: B018 (fail early if missing)
        except (ImportError, AttributeError) as exc:
            raise ImportError(
                "selective search needs OpenCV's contrib build (cv2.ximgproc): "
                "pip install --no-deps --force-reinstall opencv-contrib-python-headless==<opencv version>"
            ) from exc
        self.mode, self.max_boxes, self.min_size, self.max_side = mode, max_boxes, min_size, max_side

    def settings(self) -> dict[str, Any]:
        import cv2

        return {"source": "selective_search", "mode": self.mode, "max_boxes": self.max_boxes,
                "min_size": self.min_size, "max_side": self.max_side, "opencv": cv2.__version__}

    def propose(self, image: np.ndarray | Tensor, image_id: Hashable | None = None) -> Tensor:
        import cv2

        image = _as_image(image)
        height, width = image.shape[:2]
        scale = 1.0
        if self.max_side is not None and max(height, width) > self.max_side:
            scale = self.max_side / max(height, width)
            size = (max(1, round(width * scale)), max(1, round(height * scale)))
            image = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
        search = cv2.ximgproc.segmentation.createSelectiveSearchSegmentation()
        search.setBaseImage(np.ascontiguousarray(image[:, :, ::-1]))  # OpenCV expects BGR
        if self.mode == "fast":
            search.switchToSelectiveSearchFast()
        else:
            search.switchToSelectiveSearchQuality()
        rects = search.process().astype(np.float32).reshape(-1, 4)  # x, y, w, h
        boxes = box_convert(torch.from_numpy(rects), "xywh", "xyxy").numpy() / scale
        boxes[:, 0::2] = boxes[:, 0::2].clip(0, width)
        boxes[:, 1::2] = boxes[:, 1::2].clip(0, height)
        return torch.from_numpy(_clean_boxes(boxes, self.min_size, self.max_boxes))


@dataclass
class ProposalRecord:
    """Proposals of one image as stored in a file. boxes: [P, 4] float32 xyxy; scores: [P] or None."""

    image_id: int | str
    boxes: np.ndarray
    scores: np.ndarray | None = None
    file_name: str = ""
    sha1: str = ""


def write_proposal_file(path: str | os.PathLike, records: Iterable[ProposalRecord]) -> Path:
    """Write proposals to ``path``: ``.json`` (COCO style, xywh) or ``.npz`` (xyxy arrays), atomically.

    JSON: ``{"images": [{"id", "file_name", "sha1"}], "proposals": [{"image_id", "bbox": [x, y, w, h],
    "score"?}]}``, one entry per box in rank order, like COCO results. NPZ: ``image_ids`` [N], ``file_names``
    [N], ``sha1`` [N], ``counts`` [N], ``boxes`` [sum(counts), 4] and optionally ``scores`` [sum(counts)].
    """
    path = Path(path)
    records = list(records)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        if path.suffix == ".json":
            images, proposals = [], []
            for rec in records:
                images.append({"id": rec.image_id, "file_name": rec.file_name, "sha1": rec.sha1})
                boxes = np.asarray(rec.boxes, dtype=np.float64).reshape(-1, 4)
                xywh = box_convert(torch.from_numpy(boxes), "xyxy", "xywh").numpy().round(2)
                for i, box in enumerate(xywh.tolist()):
                    entry: dict[str, Any] = {"image_id": rec.image_id, "bbox": box}
                    if rec.scores is not None:
                        entry["score"] = round(float(rec.scores[i]), 5)
                    proposals.append(entry)
            Path(tmp).write_text(json.dumps({"images": images, "proposals": proposals}))
        elif path.suffix == ".npz":
            arrays = {
                "image_ids": np.asarray([rec.image_id for rec in records]),
                "file_names": np.asarray([rec.file_name for rec in records], dtype=str),
                "sha1": np.asarray([rec.sha1 for rec in records], dtype=str),
                "counts": np.asarray([len(rec.boxes) for rec in records], dtype=np.int64),
                "boxes": np.concatenate([np.asarray(r.boxes, np.float32).reshape(-1, 4) for r in records])
                if records else np.zeros((0, 4), np.float32),
            }
            if records and all(rec.scores is not None for rec in records):
                arrays["scores"] = np.concatenate([np.asarray(r.scores, np.float32) for r in records])
            with open(tmp, "wb") as f:
                np.savez_compressed(f, **arrays)
        else:
            raise ProposalError(f"{path}: proposal files must end in .json or .npz")
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return path


def _key(image_id: Any) -> int | str:
    """Ids compare as ints when they look like ints, so 7, np.int64(7) and "7" find the same image."""
    if isinstance(image_id, (int, np.integer)):
        return int(image_id)
    text = str(image_id)
    return int(text) if text.lstrip("-").isdigit() else text


class ProposalFile(ProposalSource):
    """Precomputed proposals from a ``.json`` or ``.npz`` file (see ``write_proposal_file``).

    An image is found by its id when one is given, else by the sha1 of its pixels (which the file records when
    ``visiondet proposals`` wrote it), so a model can use the file at predict time, where no ids exist.
    A bare COCO results list ``[{"image_id", "bbox", "score"}, ...]`` is read as well.
    """

    def __init__(self, path: str | os.PathLike, *, max_boxes: int | None = None) -> None:
        self.path = Path(path)
        self.max_boxes = max_boxes
        if not self.path.is_file():
            raise ProposalError(f"{self.path}: no such proposal file")
        try:
            entries = self._read_npz() if self.path.suffix == ".npz" else self._read_json()
        except ProposalError:
            raise
        except Exception as exc:  # json, zip and key errors all mean the same to the user
            reason = f"{type(exc).__name__}: {exc}"
            raise ProposalError(f"{self.path}: not a readable proposal file ({reason})") from exc
        self.by_id = {_key(rec.image_id): rec for rec in entries}
        self.by_sha1 = {rec.sha1: rec for rec in entries if rec.sha1}
        # `visiondet proposals` without annotations uses the relative file path as the id
        self.by_name = {rec.file_name: rec for rec in entries if rec.file_name}
        self.by_name.update({rec.image_id: rec for rec in entries if isinstance(rec.image_id, str)})

    def _read_npz(self) -> list[ProposalRecord]:
        with np.load(self.path, allow_pickle=False) as data:
            missing = {"image_ids", "counts", "boxes"} - set(data.files)
            if missing:
                raise ProposalError(f"{self.path}: missing arrays {sorted(missing)}")
            counts = data["counts"]
            boxes = data["boxes"].astype(np.float32).reshape(-1, 4)
            if counts.sum() != len(boxes):
                raise ProposalError(f"{self.path}: counts add to {counts.sum()}, not {len(boxes)} boxes")
            scores = data["scores"] if "scores" in data.files else None
            names = data["file_names"] if "file_names" in data.files else [""] * len(counts)
            sha1s = data["sha1"] if "sha1" in data.files else [""] * len(counts)
            starts = np.concatenate([[0], np.cumsum(counts)])
            return [
                ProposalRecord(_key(i), boxes[a:b], None if scores is None else scores[a:b], str(n), str(s))
                for i, a, b, n, s in zip(data["image_ids"].tolist(), starts[:-1], starts[1:], names, sha1s,
                                         strict=True)
            ]

    def _read_json(self) -> list[ProposalRecord]:
        data = json.loads(self.path.read_text())
        images = data.get("images", []) if isinstance(data, dict) else []
        entries = data.get("proposals") if isinstance(data, dict) else data
        if not isinstance(entries, list):
            raise ProposalError(f"{self.path}: expected a proposals list or a dict with a 'proposals' list")
        boxes: dict[int | str, list[list[float]]] = {img_id: [] for img_id in (_key(i["id"]) for i in images)}
        scores: dict[int | str, list[float]] = {}
        for n, entry in enumerate(entries):
            if "image_id" not in entry or len(entry.get("bbox", ())) != 4:
                raise ProposalError(f"{self.path}: proposal {n} needs 'image_id' and a 4-number 'bbox'")
            img_id = _key(entry["image_id"])
            boxes.setdefault(img_id, []).append(entry["bbox"])
            if "score" in entry:
                scores.setdefault(img_id, []).append(float(entry["score"]))
        meta = {_key(i["id"]): i for i in images}
        records = []
        for img_id, xywh in boxes.items():
            arr = np.asarray(xywh, dtype=np.float32).reshape(-1, 4)
            xyxy = box_convert(torch.from_numpy(arr), "xywh", "xyxy").numpy()
            has_scores = len(arr) and len(scores.get(img_id, ())) == len(arr)
            sc = np.asarray(scores[img_id], np.float32) if has_scores else None
            if sc is not None:  # a results-style file is ranked by score, not by order
                order = np.argsort(-sc, kind="stable")
                xyxy, sc = xyxy[order], sc[order]
            info = meta.get(img_id, {})
            records.append(ProposalRecord(img_id, xyxy, sc, info.get("file_name", ""), info.get("sha1", "")))
        return records

    def settings(self) -> dict[str, Any]:
        return {"source": "file", "path": str(self.path.resolve()), "max_boxes": self.max_boxes,
                "mtime_ns": self.path.stat().st_mtime_ns}

    def record(self, image: np.ndarray | Tensor | None, image_id: Hashable | None = None, *,
               file_name: str | None = None) -> ProposalRecord:
        """The record of an image: by its id, else by its file name (relative to the image folder), else by
        the sha1 of its pixels; a ProposalError names the file when none matches."""
        if image_id is not None and _key(image_id) in self.by_id:
            return self.by_id[_key(image_id)]
        if file_name and file_name in self.by_name:
            return self.by_name[file_name]
        if image is not None:
            found = self.by_sha1.get(image_sha1(_as_image(image)))
            if found is not None:
                return found
        what = f"image id {image_id!r}" if image_id is not None else "this image (no id; its pixel sha1)"
        what += f" ({file_name})" if file_name else ""
        raise ProposalError(f"{self.path}: no proposals for {what}; the file holds {len(self.by_id)} images")

    def propose(self, image: np.ndarray | Tensor | None, image_id: Hashable | None = None) -> Tensor:
        boxes = self.record(image, image_id).boxes[: self.max_boxes]
        return torch.from_numpy(np.array(boxes, dtype=np.float32).reshape(-1, 4))


DEFAULT_CACHE_ENTRIES = 200_000  # about 16 KB each at 2000 boxes: a few GB at most


class CachedSource(ProposalSource):
    """Wrap ``source`` with an on-disk cache: one ``.npy`` per (image pixels, source settings).

    The key is the image as decoded (its pixels, before any augmentation) and the source's settings, so the
    same picture finds its entry from any run, model or file name. At most ``max_entries`` files are kept
    (over all the processes sharing the folder): past that the least recently used tenth is deleted. "Used"
    is a file's modification time, which every write and every hit sets from the clock in nanoseconds
    (``os.utime``: the kernel's own file times are a timer tick coarse, too coarse to order entries written
    in a burst). The files are counted on disk, again after every hundredth of ``max_entries`` written here,
    so DataLoader workers writing at once overshoot by that much at most.
    ``hits`` and ``misses`` count what happened, so a caller (or a test) can see that nothing was recomputed.
    Writes are atomic, so several data-loader workers may share one cache folder.
    """

    def __init__(self, source: ProposalSource, cache_dir: str | os.PathLike, *,
                 max_entries: int = DEFAULT_CACHE_ENTRIES) -> None:
        if max_entries < 1:
            raise ValueError(f"proposal cache max_entries must be >= 1, got {max_entries}")
        self.source = source
        self.cache_dir = Path(cache_dir)
        self.max_entries = max_entries
        settings = json.dumps(source.settings(), sort_keys=True)
        self.settings_sha1 = hashlib.sha1(settings.encode()).hexdigest()
        self.hits = 0
        self.misses = 0
        self._recount_every = max(1, max_entries // 100)
        self._written = 0  # by this process since the folder was last counted

    def _files(self) -> list[Path]:
        return list(self.cache_dir.glob("??/*.npy"))

    def _prune(self) -> None:
        """Count the entries on disk; past ``max_entries``, delete the least recently used down to 90%."""
        dated = []
        for path in self._files():
            try:
                dated.append((path.stat().st_mtime_ns, path))
            except FileNotFoundError:  # another worker pruned it
                continue
        self._written = 0
        if len(dated) <= self.max_entries:
            return
        dated.sort()
        for _, path in dated[: len(dated) - int(self.max_entries * 0.9)]:
            path.unlink(missing_ok=True)

    def settings(self) -> dict[str, Any]:
        return self.source.settings()

    def path_for(self, image: np.ndarray) -> Path:
        key = hashlib.sha1(f"{image_sha1(image)}|{self.settings_sha1}".encode()).hexdigest()
        return self.cache_dir / key[:2] / f"{key}.npy"

    def propose(self, image: np.ndarray | Tensor, image_id: Hashable | None = None) -> Tensor:
        image = _as_image(image)
        path = self.path_for(image)
        if path.is_file():
            try:
                boxes = np.load(path, allow_pickle=False)
                self.hits += 1
                _touch(path)  # recently used: the last to be pruned
                return torch.from_numpy(boxes.astype(np.float32).reshape(-1, 4))
            except (OSError, ValueError):
                pass  # a damaged entry (disk full, killed writer on a non-atomic FS) is simply recomputed
        boxes = self.source.propose(image, image_id)
        self.misses += 1
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".", suffix=".npy", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            np.save(f, boxes.numpy().astype(np.float32))
        _touch(tmp)
        os.replace(tmp, path)
        self._written += 1
        if self._written >= self._recount_every:
            self._prune()
        return boxes


def _touch(path: str | os.PathLike) -> None:
    """Stamp ``path`` as used now, to the nanosecond (see CachedSource)."""
    now = time.time_ns()
    os.utime(path, ns=(now, now))


@dataclass
class ProposalConfig:
    """Where a detector's external proposals come from (R-CNN, Fast R-CNN); a model config section.

    method: "selective_search" (``mode``, ``max_boxes``, ``min_size``, ``max_side``) or "file" (``file``,
    ``max_boxes``). ``cache_dir``: store computed proposals there (a second epoch, model or run reuses
    them); training data caches selective search in ``vision.cache.cache_dir("proposals")`` when it is None.
    ``cache_max_entries`` bounds the folder (least recently used entries go first).
    """

    method: Literal["selective_search", "file"] = "selective_search"
    mode: Literal["fast", "quality"] = "fast"
    max_boxes: int | None = 2000
    min_size: float = 0.0
    max_side: int | None = None
    file: str | None = None
    cache_dir: str | None = None
    cache_max_entries: int = DEFAULT_CACHE_ENTRIES


def build_proposal_source(cfg: ProposalConfig) -> ProposalSource:
    """The source ``cfg`` describes, wrapped in a ``CachedSource`` when ``cfg.cache_dir`` is set."""
    if cfg.method == "selective_search":
        source: ProposalSource = SelectiveSearch(
            mode=cfg.mode, max_boxes=cfg.max_boxes, min_size=cfg.min_size, max_side=cfg.max_side
        )
    elif cfg.method == "file":
        if not cfg.file:
            raise ProposalError("proposals.method 'file' needs proposals.file (a .json or .npz path)")
        source = ProposalFile(cfg.file, max_boxes=cfg.max_boxes)
    else:
        raise ProposalError(f"proposals.method: unknown {cfg.method!r}; use 'selective_search' or 'file'")
    return CachedSource(source, cfg.cache_dir, max_entries=cfg.cache_max_entries) if cfg.cache_dir else source


class RPNProposals(ProposalSource):
    """The proposals of a trained detector's Region Proposal Network (Faster R-CNN's parts), as a source for
    another detector (e.g. Fast R-CNN trained on RPN proposals, the paper's 4-step alternating training) or
    for ``proposal_recall``.

    ``detector``: a ``detection.models.TwoStageDetector`` whose ``proposal_generator`` is an RPN. Proposals
    come from the RPN's test settings (top-k after NMS), ranked by objectness, in the input image's pixels.
    """

    def __init__(self, detector: torch.nn.Module) -> None:
        if not isinstance(getattr(detector, "proposal_generator", None), RegionProposalNetwork):
            raise ValueError("RPNProposals needs a detector that has a RegionProposalNetwork")
        self.detector = detector
        digest = hashlib.sha1()
        for name, tensor in detector.state_dict().items():
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        self.weights_sha1 = digest.hexdigest()

    def settings(self) -> dict[str, Any]:
        rpn = self.detector.proposal_generator
        return {"source": "rpn", "weights_sha1": self.weights_sha1,
                "post_nms_top_n": getattr(rpn, "post_nms_top_n_test", None),
                "nms_thresh": getattr(rpn, "nms_thresh", None)}

    @torch.no_grad()
    def propose(self, image: np.ndarray | Tensor, image_id: Hashable | None = None) -> Tensor:
        if isinstance(image, np.ndarray):
            image = torch.from_numpy(_as_image(image)).permute(2, 0, 1).float() / 255
        device = next(self.detector.parameters()).device
        was_training = self.detector.training
        self.detector.eval()
        try:
            batch, _, _ = self.detector.transform([image.to(device)])
            features = self.detector.backbone(batch.tensors)
            (proposals,), _ = self.detector.proposal_generator(batch, features)
        finally:
            self.detector.train(was_training)
        return scale_boxes(proposals.boxes, batch.image_sizes[0], batch.original_sizes[0]).float().cpu()
