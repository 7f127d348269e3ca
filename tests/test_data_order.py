"""ShardedSampler: one permutation per (seed, epoch), split over ranks without overlap, resumable mid-epoch."""
import torch

from data import ShardedSampler


def test_each_epoch_is_a_fresh_permutation_that_the_seed_fixes():
    sampler = ShardedSampler(100, batch_size=10, seed=3)
    first = list(sampler)
    assert sorted(first) == list(range(100)) and sampler.batches == 10
    assert first == list(ShardedSampler(100, batch_size=10, seed=3))
    sampler.set_epoch(1)
    assert sorted(sampler) == list(range(100)) and list(sampler) != first
    assert list(ShardedSampler(100, batch_size=10, seed=4)) != first


def test_ranks_split_an_epoch_into_equal_disjoint_shares_and_drop_the_remainder():
    shares = [list(ShardedSampler(103, batch_size=5, seed=0, rank=r, world=3)) for r in range(3)]
    assert [len(s) for s in shares] == [30, 30, 30]  # 103 // 3 = 34 per rank, 6 batches of 5
    assert len(set().union(*map(set, shares))) == 90


def test_a_resumed_epoch_skips_the_batches_already_trained_on():
    whole = ShardedSampler(64, batch_size=8, seed=1)
    whole.set_epoch(2)
    resumed = ShardedSampler(64, batch_size=8, seed=1)
    resumed.set_epoch(2, start_batch=3)
    assert len(resumed) == 40 and list(resumed) == list(whole)[24:]
    batches = list(torch.utils.data.BatchSampler(resumed, 8, drop_last=True))
    assert len(batches) == 5
