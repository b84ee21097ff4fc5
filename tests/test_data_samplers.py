"""Aspect-ratio grouped batches and detection collation."""

import pytest
import torch
from torch.utils.data import DistributedSampler, SequentialSampler

from vision.data.collate import detection_collate
from vision.data.samplers import AspectRatioGroupedBatchSampler

# landscape (L, w/h >= 1) and portrait (P) images
RATIOS = [2.0, 1.5, 0.5, 0.7, 1.0, 0.6, 1.3]  # L L P P L P L


def test_batches_group_by_orientation_then_flush_leftovers_by_hand():
    sampler = AspectRatioGroupedBatchSampler(SequentialSampler(RATIOS), RATIOS, batch_size=2)
    # 0,1 fill the landscape bucket; 2,3 the portrait one; 4 waits, 5 waits, 6 completes [4, 6];
    # 5 is left over at the end of the pass
    assert list(sampler) == [[0, 1], [2, 3], [4, 6], [5]]
    assert len(sampler) == 4
    dropped = AspectRatioGroupedBatchSampler(SequentialSampler(RATIOS), RATIOS, batch_size=2, drop_last=True)
    assert list(dropped) == [[0, 1], [2, 3], [4, 6]] and len(dropped) == 3


def test_leftovers_of_different_groups_share_a_batch():
    ratios = [2.0, 0.5, 2.0, 0.5]
    sampler = AspectRatioGroupedBatchSampler(SequentialSampler(ratios), ratios, batch_size=3)
    assert list(sampler) == [[1, 3, 0], [2]]  # no group fills up: portrait leftovers first, then landscape
    assert len(sampler) == 2


def test_custom_group_edges():
    ratios = [0.5, 1.2, 3.0, 0.4, 2.9, 1.1]
    sampler = AspectRatioGroupedBatchSampler(SequentialSampler(ratios), ratios, 2, group_edges=(1.0, 2.0))
    assert list(sampler) == [[0, 3], [2, 4], [1, 5]]  # each batch emitted when its second member arrives


@pytest.mark.parametrize("batch_size", [1, 2, 3, 4])
def test_over_a_distributed_sampler_every_rank_gets_the_same_number_of_batches(batch_size):
    ratios = [2.0 if i % 3 else 0.5 for i in range(11)]
    seen = []
    lengths = []
    for rank in range(2):
        dist = DistributedSampler(ratios, num_replicas=2, rank=rank, shuffle=True, seed=0)
        sampler = AspectRatioGroupedBatchSampler(dist, ratios, batch_size)
        sampler.set_epoch(3)
        batches = list(sampler)
        assert len(batches) == len(sampler)
        lengths.append(len(batches))
        full = [b for b in batches if len(b) == batch_size]
        assert sum(len({ratios[i] >= 1 for i in b}) == 1 for b in full) >= len(full) - 1  # all but a leftover
        seen += [i for b in batches for i in b]
    assert lengths[0] == lengths[1]
    assert set(seen) == set(range(11)) and len(seen) == 12  # DistributedSampler pads 11 to 12


def test_set_epoch_reaches_the_distributed_sampler():
    ratios = [1.0] * 20
    dist = DistributedSampler(ratios, num_replicas=1, rank=0, shuffle=True, seed=0)
    sampler = AspectRatioGroupedBatchSampler(dist, ratios, 4)
    sampler.set_epoch(0)
    first = list(sampler)
    sampler.set_epoch(1)
    assert list(sampler) != first
    sampler.set_epoch(0)
    assert list(sampler) == first  # deterministic given the sampler's order


def test_bad_arguments():
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        AspectRatioGroupedBatchSampler(SequentialSampler(RATIOS), RATIOS, 0)
    with pytest.raises(ValueError, match="ascending"):
        AspectRatioGroupedBatchSampler(SequentialSampler(RATIOS), RATIOS, 2, group_edges=(2.0, 1.0))


def test_detection_collate_keeps_sizes_and_targets():
    a, b = torch.zeros(3, 4, 5), torch.ones(3, 6, 2)
    ta, tb = {"boxes": torch.zeros(0, 4)}, {"boxes": torch.ones(1, 4)}
    images, targets = detection_collate([(a, ta), (b, tb)])
    assert images[0] is a and images[1] is b
    assert targets == [ta, tb]
