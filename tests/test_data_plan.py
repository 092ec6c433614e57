"""Plan arithmetic: every sample exactly once per epoch over all ranks, equal batch counts, determinism."""

from collections import Counter

import numpy as np
import pytest

from data.plan import EpochPlan, ResamplePlan, local_indices, worker_batches


def _rank_stream(plan, counts, starts, rank):
    """[(global index, padding)] of one rank's stream, in order."""
    out = []
    for seg in plan.segments(rank):
        assert seg.position == len(out), "segments must tile the stream without gaps"
        out += [(starts[seg.shard] + int(i), seg.padding) for i in local_indices(seg, counts)]
    return out


@pytest.mark.parametrize("counts", [[5, 5, 5, 5, 5, 5, 5, 2], [1], [3, 0, 4], [7, 1, 9, 2, 11]])
@pytest.mark.parametrize("dp_size, batch_size", [(1, 1), (2, 3), (3, 2), (4, 5), (2, 64)])
def test_epoch_exactly_once_and_balanced(counts, dp_size, batch_size):
    starts = np.cumsum([0] + counts[:-1]).tolist()
    n = sum(counts)
    for epoch in (0, 1):
        plan = EpochPlan(counts, seed=3, epoch=epoch, dp_size=dp_size, batch_size=batch_size)
        streams = [_rank_stream(plan, counts, starts, r) for r in range(dp_size)]
        assert {len(s) for s in streams} == {plan.batches_per_rank * batch_size}
        real = Counter(i for s in streams for i, pad in s if not pad)
        assert real == Counter(range(n)), "each sample exactly once as a real sample"
        assert sum(pad for s in streams for _, pad in s) == plan.padding_per_epoch < dp_size * batch_size


def test_epoch_order_depends_on_seed_and_epoch_only():
    counts = [5] * 7 + [2]
    def order(seed, epoch, dp_size=1):
        return [x for r in range(dp_size) for x in _rank_stream(
            EpochPlan(counts, seed=seed, epoch=epoch, dp_size=dp_size, batch_size=2), counts, list(range(0, 40, 5)), r)]
    assert order(0, 0) == order(0, 0)
    assert order(0, 0) != order(0, 1) and order(0, 0) != order(1, 0)
    assert [i for i, _ in order(0, 0)] != sorted(i for i, _ in order(0, 0))  # shuffled within shards too
    plain = EpochPlan(counts, seed=0, epoch=0, dp_size=1, batch_size=2, shuffle=False)
    assert [i for i, pad in _rank_stream(plain, counts, list(range(0, 40, 5)), 0) if not pad] == list(range(37))


@pytest.mark.parametrize("start", [0, 1, 5])
@pytest.mark.parametrize("num_workers", [1, 2, 3])
def test_round_robin_workers_reproduce_the_batch_order(start, num_workers):
    """torch's DataLoader takes one batch from each live worker in turn, starting with worker 0."""
    total = 11
    queues = []
    for w in range(num_workers):
        first, step = worker_batches(start, w, num_workers)
        queues.append(list(range(first, total, step)))
    seen, w = [], 0
    while any(queues):
        if queues[w]:
            seen.append(queues[w].pop(0))
        w = (w + 1) % num_workers
    assert seen == list(range(start, total))


def test_resample_deterministic_per_rank_and_weighted():
    counts = [1, 99]
    def shards(seed, rank, n=200):
        it = ResamplePlan(counts, seed=seed, batch_size=4).segments(rank)
        return [next(it).shard for _ in range(n)]
    assert shards(0, 0) == shards(0, 0)
    assert shards(0, 0) != shards(0, 1) != shards(1, 0)
    assert shards(0, 0).count(1) > 180  # drawn in proportion to sample count
    seg = next(ResamplePlan([6], seed=0, batch_size=4).segments(0))
    assert sorted(local_indices(seg, [6]).tolist()) == list(range(6))
