"""The epoch sampler: seeded, class-balanced on request, sharded without overlap across ranks."""
from collections import Counter

from flannel.train.distributed import DistInfo, EpochSampler


def test_same_seed_and_epoch_give_the_same_order_and_epochs_differ():
    targets = [0] * 10 + [1] * 10
    a, b = EpochSampler(targets, seed=3), EpochSampler(targets, seed=3)
    a.set_epoch(1), b.set_epoch(1)
    assert list(a) == list(b) and sorted(a) == list(range(20))
    b.set_epoch(2)
    assert list(a) != list(b)


def test_balanced_sampler_draws_classes_equally():
    targets = [0] * 90 + [1] * 10
    s = EpochSampler(targets, seed=0, balanced=True)
    counts = Counter()
    for epoch in range(20):
        s.set_epoch(epoch)
        counts.update(targets[i] for i in s)
    assert abs(counts[0] - counts[1]) / sum(counts.values()) < 0.05


def test_ranks_get_disjoint_equal_shards_covering_the_epoch():
    targets = list(range(3)) * 7  # 21 items, 2 ranks: 11 each, one wraps around
    shards = []
    for rank in (0, 1):
        s = EpochSampler(targets, seed=5, info=DistInfo(rank=rank, world_size=2))
        s.set_epoch(4)
        shards.append(list(s))
    assert len(shards[0]) == len(shards[1]) == 11
    assert set(shards[0]) | set(shards[1]) == set(range(21))
    assert len(set(shards[0]) & set(shards[1])) <= 1  # only the wrapped-around item repeats
