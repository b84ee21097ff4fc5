"""Data loading for the loop: reproducible per-sample randomness and resumable batch order.

* Every item is produced under a seed derived from ``(seed, epoch, index)``: Python, NumPy and torch
  generators and the dataset's albumentations pipeline (which keeps its own generator) are reseeded for
  that one call. Augmentations therefore depend neither on the number of workers, nor on which worker
  loads an item, nor on where a run was resumed (and forked workers no longer repeat each other's
  augmentations). The caller's own generator states are restored afterwards.
* The epoch's batches are a fixed list computed from a DistributedSampler (also with one process, so the
  order depends only on seed and epoch); resuming mid-epoch simply starts later in that list.
* Batches come with the dataset indices of their items, so warnings can name the images.
* A file that cannot be decoded never reaches the main process as a worker traceback: the worker returns
  it as a value (:class:`Unreadable`) and the loader raises :class:`UnreadableImageError`, whose message is
  one line naming the file and the reason. With ``skip_unreadable`` the file is left out instead (training:
  the next readable item of the dataset takes its place, so batches keep their size and DDP ranks stay in
  step; evaluation: it is dropped) and reported through ``on_skip``.
* Warnings raised while an item is read (a size that differs from the JSON, say) travel with the item
  and are counted by pattern in :class:`DataWarnings`: one line per pattern, with the count and the first
  example, instead of one per image (and one per worker process).
* Workers end with their parent process, even when it is killed with SIGKILL (:func:`tie_to_parent`).
"""

from __future__ import annotations

import ctypes
import functools
import os
import random
import re
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from apps.engine.distributed import ShardSampler
from vision.data.images import ImageError

__all__ = ["SeededItems", "IndexedCollate", "FixedBatches", "epoch_batches", "make_loader", "eval_loader",
           "DataWarnings", "Unreadable", "UnreadableImageError", "tie_to_parent", "parent_bound_init"]

# How many following items a training item may try in place of an unreadable one before giving up.
_MAX_SUBSTITUTES = 16
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


# ---- workers that do not outlive their parent -------------------------------------------------------------


def tie_to_parent(parent: int, worker_id: int = 0) -> None:
    """``worker_init_fn``: end this worker process when process ``parent`` dies, however it dies.

    A DataLoader worker notices a dead parent only between items, and one blocked on a full result pipe
    may never notice: after ``kill -9`` of the main process, workers holding decoded images stayed alive
    for minutes. Linux: the kernel sends SIGKILL on the parent's death (prctl PR_SET_PDEATHSIG; strictly, on
    the end of the parent thread that started the worker, which is fine for loaders iterated in the thread
    that made them, as all of visiondet's are). Anywhere (and as a fallback): a daemon thread polls the parent
    once a second.
    """
    direct = os.getppid() == parent
    if direct and sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        except (OSError, AttributeError):
            pass  # the watchdog below still works
    if _parent_gone(parent, direct):  # died before prctl took effect
        os._exit(1)
    threading.Thread(target=_watch_parent, args=(parent, direct), name="parent-watchdog", daemon=True).start()


def parent_bound_init(worker_init_fn: Callable[[int], None] | None = None) -> Callable[[int], None]:
    """A picklable ``worker_init_fn`` tying the workers to this process, then calling ``worker_init_fn``."""
    return functools.partial(_init_worker, os.getpid(), worker_init_fn)


def _init_worker(parent: int, then: Callable[[int], None] | None, worker_id: int) -> None:
    tie_to_parent(parent, worker_id)
    if then is not None:
        then(worker_id)


def _parent_gone(parent: int, direct: bool) -> bool:
    if direct:  # a dead parent's children are re-parented at once (to init or a subreaper)
        return os.getppid() != parent
    try:
        os.kill(parent, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _watch_parent(parent: int, direct: bool) -> None:
    while not _parent_gone(parent, direct):
        time.sleep(1.0)
    os.kill(os.getpid(), signal.SIGKILL)  # not sys.exit: a worker blocked on a full pipe would never leave


# ---- unreadable files --------------------------------------------------------------------------------------


class Unreadable(NamedTuple):
    """A file a worker could not decode (returned as a value: a raised error would come back to the main
    process as a worker traceback)."""

    path: str
    reason: str


class UnreadableImageError(RuntimeError):
    """A training or evaluation image that cannot be decoded; ``str()`` is one line naming the file, the
    reason and what to do."""

    def __init__(self, path: str, reason: str, hint: str = "") -> None:
        self.path, self.reason, self.hint = path, reason, hint
        super().__init__(f"{path}: {reason}" + (f"; {hint}" if hint else ""))

    def __reduce__(self):
        return type(self), (self.path, self.reason, self.hint)


# ---- warnings while reading, summarised --------------------------------------------------------------------


class DataWarnings:
    """Warnings raised while items were read, counted by pattern (the message without its leading file name,
    numbers left out): ``lines()`` gives one line per pattern with the count and the first message."""

    def __init__(self) -> None:
        self.patterns: dict[str, list[Any]] = {}  # pattern -> [count, first message]

    @staticmethod
    def pattern(message: str) -> str:
        head, sep, rest = message.partition(": ")
        text = rest if sep and " " not in head else message  # "<file>: what is wrong" -> what is wrong
        return re.sub(r"\d+", "#", text)

    def add(self, messages: Sequence[str]) -> None:
        for message in messages:
            entry = self.patterns.setdefault(self.pattern(message), [0, message])
            entry[0] += 1

    def merge(self, patterns: dict[str, list[Any]]) -> None:
        """Add another process's ``patterns`` (DDP: each rank reads its own share)."""
        for pattern, (count, first) in patterns.items():
            self.patterns.setdefault(pattern, [0, first])[0] += count

    def lines(self) -> list[str]:
        """One line per pattern, and forget them (the next call reports what came after)."""
        out = [first if count == 1 else f"{count} warnings like this one while reading the data: {first}"
               for count, first in self.patterns.values()]
        self.patterns = {}
        return out


class Sample(NamedTuple):
    """What a guarded dataset returns: the item (None when it could not be read), the files that could
    not be read on the way and the warnings reading it raised."""

    index: int
    item: Any
    unreadable: tuple[Unreadable, ...] = ()
    warned: tuple[str, ...] = ()


def _read(dataset: Dataset, index: int) -> tuple[Any, Unreadable | None, tuple[str, ...]]:
    """(item or None, the unreadable file or None, the warnings raised), in a worker or in the process."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            item, bad = dataset[index], None
        except ImageError as exc:
            item, bad = None, Unreadable(exc.path, exc.reason)
    return item, bad, tuple(str(w.message) for w in caught)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1)[0])


def _seed_transforms(dataset: Any, seed: int) -> None:
    # albumentations.Compose ignores the global generators; reseed it where datasets keep it.
    for holder in (dataset, getattr(dataset, "dataset", None)):
        transforms = getattr(holder, "transforms", None)
        if transforms is not None and hasattr(transforms, "set_random_seed"):
            transforms.set_random_seed(seed)


class SeededItems(Dataset):
    """``dataset[i]`` -> :class:`Sample` ``(i, item, unreadable)``, computed under the seed of
    ``(seed, epoch, i)``.

    A file that cannot be decoded gives ``item=None``; with ``skip_unreadable`` the following items
    (``i + 1``, ``i + 2``, ... under their own seeds) are tried in its place, so a batch keeps its size.
    """

    def __init__(self, dataset: Dataset, seed: int, epoch: int = 0, *, skip_unreadable: bool = False) -> None:
        self.dataset = dataset
        self.seed = seed
        self.epoch = epoch
        self.skip_unreadable = skip_unreadable

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Sample:
        failed: list[Unreadable] = []
        warned: tuple[str, ...] = ()
        tries = min(_MAX_SUBSTITUTES, len(self)) if self.skip_unreadable else 1
        for k in range(tries):
            item, bad, more = self._seeded((index + k) % len(self))
            warned += more
            if bad is None:
                return Sample(index, item, tuple(failed), warned)
            failed.append(bad)
        return Sample(index, None, tuple(failed), warned)

    def _seeded(self, index: int) -> tuple[Any, Unreadable | None, tuple[str, ...]]:
        seed = sample_seed(self.seed, self.epoch, index)
        py_state, np_state = random.getstate(), np.random.get_state()
        cpu_state = torch.random.get_rng_state()
        try:
            random.seed(seed)
            np.random.seed(seed)
            torch.random.default_generator.manual_seed(seed)
            _seed_transforms(self.dataset, seed)
            return _read(self.dataset, index)
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)
            torch.random.set_rng_state(cpu_state)


class GuardedItems(Dataset):
    """``dataset[i]`` -> :class:`Sample` (evaluation: no seeding, no substitutes). ``dataset`` stays
    reachable as ``.dataset`` (evaluators look for the COCO object under it)."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Sample:
        item, bad, warned = _read(self.dataset, index)
        return Sample(index, item, (bad,) if bad else (), warned)


class Batch(NamedTuple):
    indices: list[int]
    data: Any  # None: an item could not be read (and is not skipped), or none could
    unreadable: tuple[Unreadable, ...]
    warned: tuple[str, ...] = ()


class IndexedCollate:
    """``[Sample, ...]`` -> :class:`Batch` ``(indices, collate(items), unreadable)``, in the worker.

    ``drop_unreadable``: collate the readable items only (evaluation with skipping); otherwise any item
    that could not be read leaves ``data`` None, and the main process raises.
    """

    def __init__(self, collate: Callable[[list[Any]], Any], *, drop_unreadable: bool = False) -> None:
        self.collate = collate
        self.drop_unreadable = drop_unreadable

    def __call__(self, samples: list[Sample]) -> Batch:
        unreadable = tuple(u for s in samples for u in s.unreadable)
        warned = tuple(w for s in samples for w in s.warned)
        good = [s for s in samples if s.item is not None]
        if not good or (len(good) < len(samples) and not self.drop_unreadable):
            return Batch([s.index for s in samples], None, unreadable, warned)
        return Batch([s.index for s in good], self.collate([s.item for s in good]), unreadable, warned)


class GuardedLoader(DataLoader):
    """A DataLoader of :class:`Batch` items that yields ``(indices, data)`` (or ``data`` alone when
    ``with_indices`` is false), reports skipped files to ``on_skip`` and turns an unreadable file into
    :class:`UnreadableImageError` in the main process.

    Warnings raised while reading are counted in ``data_warnings``; without one given, the loader keeps its
    own and warns once per pattern (count and first example) when a pass over it ends."""

    def __init__(self, *args: Any, skip_unreadable: bool, hint: str, with_indices: bool,
                 on_skip: Callable[[list[Unreadable]], None] | None,
                 data_warnings: DataWarnings | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.skip_unreadable, self.hint, self.with_indices, self.on_skip = (skip_unreadable, hint,
                                                                             with_indices, on_skip)
        self.owns_warnings = data_warnings is None
        self.data_warnings = DataWarnings() if data_warnings is None else data_warnings

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        yield from self._batches()
        if self.owns_warnings:
            for line in self.data_warnings.lines():
                warnings.warn(line, stacklevel=2)

    def _batches(self) -> Iterator[Any]:
        for batch in super().__iter__():
            if batch.warned:
                self.data_warnings.add(batch.warned)
            if batch.data is None and not self.skip_unreadable:
                first = batch.unreadable[0]
                raise UnreadableImageError(first.path, first.reason, self.hint)
            if batch.unreadable and self.on_skip is not None:
                self.on_skip(list(batch.unreadable))
            if batch.data is None:  # every item of the batch unreadable (evaluation) or all substitutes
                if not self.with_indices:
                    continue
                first = batch.unreadable[0]
                raise UnreadableImageError(first.path, f"{first.reason} (and the {_MAX_SUBSTITUTES - 1} "
                                           "items after it could not be read either)", self.hint)
            yield (batch.indices, batch.data) if self.with_indices else batch.data


class FixedBatches(Sampler[list[int]]):
    """A precomputed list of batches (of dataset indices)."""

    def __init__(self, batches: Sequence[list[int]]) -> None:
        self.batches = list(batches)

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def epoch_batches(task: Any, dataset: Dataset, *, batch_size: int, seed: int, epoch: int, rank: int,
                  world: int) -> list[list[int]]:
    """This rank's batches for ``epoch``: shuffled by ``(seed, epoch)``, grouped by the task.

    The last incomplete batch is dropped when the shard has at least one full batch (a batch of one
    image breaks BatchNorm, and equal batch counts keep DDP ranks in step).
    """
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed)
    sampler.set_epoch(epoch)
    drop_last = len(sampler) >= batch_size
    return [list(b) for b in task.batch_sampler(dataset, sampler, batch_size, drop_last=drop_last)]


def make_loader(items: SeededItems, batches: Sequence[list[int]], collate: Callable[[list[Any]], Any], *,
                workers: int, pin_memory: bool, seed: int, hint: str = "",
                on_skip: Callable[[list[Unreadable]], None] | None = None,
                data_warnings: DataWarnings | None = None) -> DataLoader:
    """Loader over fixed ``batches`` yielding ``(indices, batch)``. Its own generator keeps the global one
    untouched (a DataLoader draws a seed from the global generator otherwise, which resuming would not
    replay). ``hint`` ends the message of an unreadable file; ``on_skip`` hears of skipped ones."""
    return GuardedLoader(items, batch_sampler=FixedBatches(batches), collate_fn=IndexedCollate(collate),
                         num_workers=workers, pin_memory=pin_memory,
                         generator=torch.Generator().manual_seed(seed),
                         worker_init_fn=parent_bound_init() if workers else None,
                         skip_unreadable=items.skip_unreadable, hint=hint, with_indices=True, on_skip=on_skip,
                         data_warnings=data_warnings)


def eval_loader(dataset: Dataset, collate: Callable[[list[Any]], Any], *, batch_size: int, workers: int,
                pin_memory: bool = False, skip_unreadable: bool = False, hint: str = "",
                on_skip: Callable[[list[Unreadable]], None] | None = None,
                data_warnings: DataWarnings | None = None) -> DataLoader:
    """This rank's shard of ``dataset`` in order, every item once over all ranks; ``.dataset`` wraps
    ``dataset`` (as ``.dataset.dataset``). With ``skip_unreadable`` files that cannot be decoded are left
    out of their batch (and reported to ``on_skip``)."""
    return GuardedLoader(GuardedItems(dataset), batch_size=batch_size, sampler=ShardSampler(len(dataset)),
                         collate_fn=IndexedCollate(collate, drop_unreadable=skip_unreadable),
                         num_workers=workers, pin_memory=pin_memory,
                         generator=torch.Generator().manual_seed(0),
                         worker_init_fn=parent_bound_init() if workers else None,
                         skip_unreadable=skip_unreadable, hint=hint, with_indices=False, on_skip=on_skip,
                         data_warnings=data_warnings)

