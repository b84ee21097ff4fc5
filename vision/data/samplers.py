"""Batches of images with similar aspect ratios, so detection batches pad less.

A detector pads every image of a batch to the largest height and width in it; a portrait image batched
with a landscape one nearly doubles the pixels computed on padding. Grouping by aspect ratio avoids that
(the grouping of torchvision's and detectron2's detection references; written here as a plain sampler).
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterator, Sequence

from torch.utils.data import Sampler

__all__ = ["AspectRatioGroupedBatchSampler"]


class AspectRatioGroupedBatchSampler(Sampler[list[int]]):
    """Group the indices of ``sampler`` into batches whose images share an aspect-ratio group.

    Indices are taken in the sampler's order; a batch is emitted as soon as its group holds
    ``batch_size`` indices. At the end of the pass the remaining indices (fewer than ``batch_size`` per
    group) are batched together, group by group, so every index is used once per epoch and the number of
    batches is ``ceil(len(sampler) / batch_size)`` (``floor`` with ``drop_last``), the same on every
    rank of a ``DistributedSampler``. The result depends only on the sampler's order.

    Args:
        sampler: any sampler of dataset indices, e.g. ``RandomSampler`` or ``DistributedSampler``.
        aspect_ratios: width / height of every dataset index (``CocoDetection.aspect_ratios()``).
        batch_size: indices per batch.
        drop_last: drop the final incomplete batch.
        group_edges: aspect-ratio boundaries between groups; the default splits portrait (w/h < 1)
            from landscape and square images.
    """

    def __init__(
        self,
        sampler: Sampler[int],
        aspect_ratios: Sequence[float],
        batch_size: int,
        drop_last: bool = False,
        *,
        group_edges: Sequence[float] = (1.0,),
    ):
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if list(group_edges) != sorted(group_edges):
            raise ValueError(f"group_edges must be ascending, got {list(group_edges)}")
        self.sampler = sampler
        self.batch_size = batch_size
        self.drop_last = drop_last
        self.group_ids = [bisect.bisect_right(group_edges, float(r)) for r in aspect_ratios]
        self.num_groups = len(group_edges) + 1

    def set_epoch(self, epoch: int) -> None:
        """Forwarded to the sampler (``DistributedSampler`` reshuffles per epoch)."""
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def __iter__(self) -> Iterator[list[int]]:
        buckets: list[list[int]] = [[] for _ in range(self.num_groups)]
        for index in self.sampler:
            bucket = buckets[self.group_ids[index]]
            bucket.append(index)
            if len(bucket) == self.batch_size:
                yield bucket[:]
                bucket.clear()
        leftovers = [index for bucket in buckets for index in bucket]
        for start in range(0, len(leftovers), self.batch_size):
            batch = leftovers[start : start + self.batch_size]
            if len(batch) == self.batch_size or not self.drop_last:
                yield batch

    def __len__(self) -> int:
        n = len(self.sampler)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)
