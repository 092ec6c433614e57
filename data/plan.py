"""Which sample goes into which batch of which data-parallel rank: pure index arithmetic, no I/O.

A plan turns shard sample counts into one *stream* per data-parallel rank: an ordered sequence of
positions, cut into consecutive batches of ``batch_size``. The stream is described as segments (a
run of consecutive positions served by one shard), so readers can load a shard once for a whole run.
Everything derives from integers (seed, epoch, rank, round) through numpy SeedSequence, so every
process computes the same plan without talking to the others, TP/PP/CP peers (same dp_rank) get the
same stream, and a resumed run can jump straight to a batch index.

Epoch mode: the shards are visited in an order drawn from (seed, epoch), each shard's samples in an
order drawn from (seed, epoch, shard). The resulting sequence of N samples is extended to
M = ceil(N / (dp_size * batch_size)) * dp_size * batch_size positions by wrapping around to its start
(positions >= N are marked ``padding``), and rank r gets the contiguous chunk [r*M/dp_size, (r+1)*M/dp_size).
So every sample is served exactly once per epoch as a non-padding sample, every rank has the same
number of batches (no rank waits in a collective for a batch that never comes), and a rank reads only
about 1/dp_size of the shards.

Resample mode: an endless stream per rank; round k of rank r picks a shard with probability
proportional to its sample count, from (seed, r, k), and serves all its samples in an order drawn from
the same key. Shards are drawn with replacement (WebDataset's "resampled"); no epochs.

Grouped (image-conditioned datasets, one resolution bucket per shard): a batch must hold one bucket.
Epoch mode runs one EpochPlan per group (each with its own wrap-around padding) and interleaves whole
batches of the groups in an order drawn from (seed, epoch), the same on every rank, so all ranks train
the same bucket at the same step. Resample mode serves each drawn shard in whole batches (wrapping its
own order, the wrapped samples marked ``padding``), so a batch never spans two shards.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace

import numpy as np

_RESAMPLE_TAG = 0x5E5A  # separates resample-mode random streams from epoch-mode ones
_GROUP_TAG = 0x6B0C  # separates the group interleaving (and per-group shard orders) from the rest


@dataclass(frozen=True)
class Segment:
    """Stream positions ``[position, position + stop - start)`` of one rank are samples ``order[start:stop]``
    of shard ``shard``, where ``order`` is the shard's permutation drawn from ``key`` (identity if None)."""

    position: int
    shard: int
    start: int
    stop: int
    padding: bool
    key: tuple[int, ...] | None

    @property
    def end(self) -> int:
        return self.position + self.stop - self.start


def shard_order(count: int, key: tuple[int, ...] | None) -> np.ndarray:
    """The order in which a shard's samples (by local index) are served."""
    if key is None:
        return np.arange(count, dtype=np.int64)
    return np.random.default_rng(np.random.SeedSequence(list(key))).permutation(count).astype(np.int64)


def local_indices(seg: Segment, counts: Sequence[int]) -> np.ndarray:
    """Local sample indices (position in the shard) served by ``seg``, in stream order."""
    return shard_order(counts[seg.shard], seg.key)[seg.start:seg.stop]


class EpochPlan:
    """Every sample exactly once per epoch across all ranks (plus marked wrap-around padding)."""

    def __init__(self, counts: Sequence[int], *, seed: int, epoch: int, dp_size: int, batch_size: int,
                 shuffle: bool = True, shard_ids: Sequence[int] | None = None, tag: tuple[int, ...] = ()):
        """``shard_ids``: the ids segments report for ``counts``' shards (a group's global shard ids; then
        look counts up in the caller's list); ``tag`` is mixed into the shard-order seed."""
        self.counts = [int(c) for c in counts]
        self.shard_ids = list(range(len(self.counts))) if shard_ids is None else [int(i) for i in shard_ids]
        self.num_samples = sum(self.counts)
        if self.num_samples == 0:
            raise ValueError("an epoch plan needs at least one sample")
        self.seed, self.epoch, self.dp_size, self.batch_size, self.shuffle = seed, epoch, dp_size, batch_size, shuffle
        global_batch = dp_size * batch_size
        self.batches_per_rank = -(-self.num_samples // global_batch)
        if shuffle:
            rng = np.random.default_rng(np.random.SeedSequence([seed, epoch, *tag]))
            self.order = [int(s) for s in rng.permutation(len(self.counts))]
        else:
            self.order = list(range(len(self.counts)))
        self.offsets = np.cumsum([0] + [self.counts[s] for s in self.order]).tolist()  # sequence start per slot

    @property
    def padding_per_epoch(self) -> int:
        return self.batches_per_rank * self.dp_size * self.batch_size - self.num_samples

    def segments(self, dp_rank: int) -> Iterator[Segment]:
        """The rank's stream: positions ``0 .. batches_per_rank * batch_size`` (finite)."""
        chunk = self.batches_per_rank * self.batch_size
        pos, end = dp_rank * chunk, (dp_rank + 1) * chunk  # positions in the wrapped epoch sequence
        while pos < end:
            base = pos % self.num_samples
            slot = bisect.bisect_right(self.offsets, base) - 1
            shard = self.order[slot]
            start = base - self.offsets[slot]
            stop = min(self.counts[shard], start + end - pos)
            sid = self.shard_ids[shard]
            key = (self.seed, self.epoch, sid) if self.shuffle else None
            yield Segment(pos - dp_rank * chunk, sid, start, stop, pos >= self.num_samples, key)
            pos += stop - start


class GroupedEpochPlan:
    """EpochPlan per group of shards (e.g. resolution buckets); every batch holds samples of one group."""

    def __init__(self, counts: Sequence[int], groups: Sequence[int], *, seed: int, epoch: int, dp_size: int,
                 batch_size: int, shuffle: bool = True):
        if len(groups) != len(counts):
            raise ValueError(f"{len(groups)} group labels for {len(counts)} shards")
        self.counts = [int(c) for c in counts]
        self.batch_size, self.dp_size = batch_size, dp_size
        self.num_samples = sum(self.counts)
        if self.num_samples == 0:
            raise ValueError("an epoch plan needs at least one sample")
        self.plans: dict[int, EpochPlan] = {}
        for g in sorted(set(groups)):
            ids = [i for i, x in enumerate(groups) if x == g]
            if sum(self.counts[i] for i in ids):
                self.plans[g] = EpochPlan([self.counts[i] for i in ids], seed=seed, epoch=epoch, dp_size=dp_size,
                                          batch_size=batch_size, shuffle=shuffle, shard_ids=ids,
                                          tag=(_GROUP_TAG, int(g)))
        labels = np.concatenate([np.full(p.batches_per_rank, g, dtype=np.int64) for g, p in self.plans.items()])
        if shuffle:
            labels = np.random.default_rng(np.random.SeedSequence([seed, epoch, _GROUP_TAG])).permutation(labels)
        self.labels = labels  # group of each batch of every rank's stream
        self.batches_per_rank = len(labels)

    @property
    def padding_per_epoch(self) -> int:
        return sum(p.padding_per_epoch for p in self.plans.values())

    def segments(self, dp_rank: int) -> Iterator[Segment]:
        """The rank's stream: each group's segments cut at batch boundaries, placed at its batches' slots."""
        B = self.batch_size
        streams = {g: _Cutter(p.segments(dp_rank)) for g, p in self.plans.items()}
        for k, g in enumerate(self.labels.tolist()):
            offset = 0
            for piece in streams[g].take(B):
                yield replace(piece, position=k * B + offset)
                offset += piece.stop - piece.start


class _Cutter:
    """Hands out a segment stream in pieces of exactly ``n`` positions (splitting segments as needed)."""

    def __init__(self, segments: Iterator[Segment]):
        self.segments, self.rest = segments, None

    def take(self, n: int) -> Iterator[Segment]:
        while n > 0:
            seg = self.rest if self.rest is not None else next(self.segments)
            m = min(n, seg.stop - seg.start)
            yield replace(seg, stop=seg.start + m)
            self.rest = replace(seg, start=seg.start + m, position=seg.position + m) if m < seg.stop - seg.start else None
            n -= m


class ResamplePlan:
    """An endless per-rank stream of whole shards drawn with replacement, weighted by sample count."""

    def __init__(self, counts: Sequence[int], *, seed: int, batch_size: int, whole_batches: bool = False):
        """``whole_batches``: serve each drawn shard as whole batches (its order wrapped, extra marked padding),
        so no batch spans two shards (grouped datasets)."""
        self.counts = [int(c) for c in counts]
        self.whole_batches = whole_batches
        total = sum(self.counts)
        if total == 0:
            raise ValueError("a resample plan needs at least one sample")
        self.p = np.asarray(self.counts, dtype=np.float64) / total
        self.seed, self.batch_size = seed, batch_size
        self.batches_per_rank = None

    def segments(self, dp_rank: int) -> Iterator[Segment]:
        pos, k = 0, 0
        while True:
            key = (self.seed, _RESAMPLE_TAG, dp_rank, k)
            shard = int(np.random.default_rng(np.random.SeedSequence(list(key))).choice(len(self.counts), p=self.p))
            n = self.counts[shard]
            total = -(-n // self.batch_size) * self.batch_size if self.whole_batches else n
            served = 0
            while served < total:  # the shard once, then (whole_batches) its start again as padding
                m = min(n, total - served)
                yield Segment(pos + served, shard, 0, m, served > 0, key + (1,))
                served += m
            pos += total
            k += 1


def worker_batches(start: int, worker: int, num_workers: int) -> tuple[int, int]:
    """Batches ``first, first + step, ...`` of a DataLoader worker when iteration starts at batch ``start``.

    Round-robin from ``start`` matches the order in which torch's DataLoader collects results from its
    workers (worker 0 first), so the batch sequence the trainer sees does not depend on ``num_workers``.
    """
    return start + worker, num_workers
