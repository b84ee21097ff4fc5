"""Data loading for the loop: reproducible per-sample randomness and resumable batch order.

* Every item is produced under a seed derived from ``(seed, epoch, index)``: Python, NumPy and torch
  generators and the dataset's albumentations pipeline (which keeps its own generator) are reseeded for
  that one call. Augmentations therefore depend neither on the number of workers, nor on which worker
  loads an item, nor on where a run was resumed (and forked workers no longer repeat each other's
  augmentations). The caller's own generator states are restored afterwards.
* The epoch's batches are a fixed list computed from a DistributedSampler (also with one process, so the
  order depends only on seed and epoch); resuming mid-epoch simply starts later in that list.
* Batches come with the dataset indices of their items, so warnings can name the images.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from apps.engine.distributed import ShardSampler

__all__ = ["SeededItems", "IndexedCollate", "FixedBatches", "epoch_batches", "make_loader", "eval_loader"]


def sample_seed(seed: int, epoch: int, index: int) -> int:
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1)[0])


def _seed_transforms(dataset: Any, seed: int) -> None:
    # albumentations.Compose ignores the global generators; reseed it where datasets keep it.
    for holder in (dataset, getattr(dataset, "dataset", None)):
        transforms = getattr(holder, "transforms", None)
        if transforms is not None and hasattr(transforms, "set_random_seed"):
            transforms.set_random_seed(seed)


class SeededItems(Dataset):
    """``dataset[i]`` -> ``(i, item)``, computed under the seed of ``(seed, epoch, i)``."""

    def __init__(self, dataset: Dataset, seed: int, epoch: int = 0) -> None:
        self.dataset = dataset
        self.seed = seed
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[int, Any]:
        seed = sample_seed(self.seed, self.epoch, index)
        py_state, np_state = random.getstate(), np.random.get_state()
        cpu_state = torch.random.get_rng_state()
        try:
            random.seed(seed)
            np.random.seed(seed)
            torch.random.default_generator.manual_seed(seed)
            _seed_transforms(self.dataset, seed)
            return index, self.dataset[index]
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)
            torch.random.set_rng_state(cpu_state)


class IndexedCollate:
    """``[(i, item), ...]`` -> ``(indices, collate(items))``."""

    def __init__(self, collate: Callable[[list[Any]], Any]) -> None:
        self.collate = collate

    def __call__(self, pairs: list[tuple[int, Any]]) -> tuple[list[int], Any]:
        return [i for i, _ in pairs], self.collate([item for _, item in pairs])


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
                workers: int, pin_memory: bool, seed: int) -> DataLoader:
    """Loader over fixed ``batches`` yielding ``(indices, batch)``. Its own generator keeps the global one
    untouched (a DataLoader draws a seed from the global generator otherwise, which resuming would not
    replay)."""
    return DataLoader(items, batch_sampler=FixedBatches(batches), collate_fn=IndexedCollate(collate),
                      num_workers=workers, pin_memory=pin_memory,
                      generator=torch.Generator().manual_seed(seed))


def eval_loader(dataset: Dataset, collate: Callable[[list[Any]], Any], *, batch_size: int, workers: int,
                pin_memory: bool = False) -> DataLoader:
    """This rank's shard of ``dataset`` in order, every item once over all ranks."""
    return DataLoader(dataset, batch_size=batch_size, sampler=ShardSampler(len(dataset)),  # type: ignore
                      collate_fn=collate, num_workers=workers, pin_memory=pin_memory,
                      generator=torch.Generator().manual_seed(0))
