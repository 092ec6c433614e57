"""The worker side of the loader: an IterableDataset that turns one rank's plan into collated batches.

Each DataLoader worker serves every ``num_workers``-th batch starting from the resume point (see
:func:`data.plan.worker_batches`), reads only the shards its batches touch, and emits batches in order.
A corrupt shard's samples are replaced by a *filler* (the first sample of the lowest-numbered readable
shard, marked ``is_padding``) so every rank still yields the same number of full batches (a rank that
yielded fewer would leave the others waiting in a collective); the shard's name and the reason travel
to the main process in the batch's ``corrupt_shards`` list. In a grouped (image-conditioned) dataset
the filler comes from a readable shard of the SAME group (bucket), so batch shapes stay uniform.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from data.collate import collate
from data.locate import ShardRef
from data.plan import EpochPlan, GroupedEpochPlan, ResamplePlan, local_indices, worker_batches
from data.reader import CorruptShard, read_shard


@dataclass
class StreamSpec:
    """Everything a worker needs (picklable: workers may be spawned)."""

    shards: list[ShardRef]
    dim: int
    model: str
    max_length: int
    pad_to_max_length: bool
    batch_size: int
    mode: str
    seed: int
    dp_rank: int
    dp_size: int
    shuffle: bool = True
    epoch: int = 0
    start: int = 0  # first batch (of this rank's stream) to serve
    stop: int | None = None  # one past the last batch; None: endless (resample mode)
    corrupt: dict[int, str] = field(default_factory=dict)  # shards the main process already knows are bad
    groups: list[int] | None = None  # per shard: its bucket's number (image datasets); batches stay in one group
    cond_kind: str | None = None  # i2v | ti2v: samples carry conditioning tensors
    cond_shapes: dict[str, dict[str, list[int]]] = field(default_factory=dict)  # bucket -> tensor -> shape


def make_plan(spec: StreamSpec) -> EpochPlan | GroupedEpochPlan | ResamplePlan:
    counts = [s.count for s in spec.shards]
    if spec.mode == "epoch" and spec.groups is not None:
        return GroupedEpochPlan(counts, spec.groups, seed=spec.seed, epoch=spec.epoch, dp_size=spec.dp_size,
                                batch_size=spec.batch_size, shuffle=spec.shuffle)
    if spec.mode == "epoch":
        return EpochPlan(counts, seed=spec.seed, epoch=spec.epoch, dp_size=spec.dp_size,
                         batch_size=spec.batch_size, shuffle=spec.shuffle)
    return ResamplePlan(counts, seed=spec.seed, batch_size=spec.batch_size, whole_batches=spec.groups is not None)


class PromptStream(IterableDataset):
    """Batches ``spec.start, spec.start + 1, ...`` of one rank; with DataLoader workers, split round-robin."""

    def __init__(self, spec: StreamSpec):
        super().__init__()
        self.spec = spec

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        return _Worker(self.spec, worker, num_workers).batches()


class _Worker:
    def __init__(self, spec: StreamSpec, worker: int, num_workers: int):
        self.spec, self.worker, self.num_workers = spec, worker, num_workers
        self.corrupt = dict(spec.corrupt)  # shard id -> reason
        self.new_corrupt: list[tuple[str, str]] = []
        self._fillers: dict[int, dict[str, Any]] = {}  # group -> filler sample

    def batches(self) -> Iterator[dict[str, Any]]:
        spec, B = self.spec, self.spec.batch_size
        plan = make_plan(spec)
        first, step = worker_batches(spec.start, self.worker, self.num_workers)
        stop = spec.stop if spec.stop is not None else np.iinfo(np.int64).max
        pending: dict[int, list[dict[str, Any] | None]] = {}
        nxt = first
        if nxt >= stop:
            return
        for seg in plan.segments(spec.dp_rank):
            if seg.end <= first * B:
                continue
            if seg.position >= stop * B:
                break
            pos = np.arange(seg.position, seg.end)
            k = pos // B
            mine = (k >= first) & ((k - first) % step == 0) & (k < stop)
            if mine.any():
                locs = local_indices(seg, plan.counts)[mine]
                samples = self._read(seg.shard, locs)
                for p, local in zip(pos[mine].tolist(), locs.tolist()):
                    if samples is None:
                        sample = {**self._fill(seg.shard), "is_padding": True}
                    else:
                        sample = {**samples[local], "is_padding": seg.padding}
                    pending.setdefault(p // B, [None] * B)[p % B] = sample
            while nxt < min(seg.end // B, stop):
                yield self._collate(pending.pop(nxt))
                nxt += step

    def _collate(self, samples: list[dict[str, Any] | None]) -> dict[str, Any]:
        spec = self.spec
        batch = collate(samples, spec.model, spec.max_length, spec.pad_to_max_length)  # type: ignore[arg-type]
        batch["corrupt_shards"], self.new_corrupt = self.new_corrupt, []
        return batch

    def _read(self, shard: int, locs: np.ndarray) -> dict[int, dict[str, Any]] | None:
        if shard in self.corrupt:
            return None
        ref = self.spec.shards[shard]
        cond = (self.spec.cond_kind, self.spec.cond_shapes[ref.bucket]) if self.spec.cond_kind else None
        try:
            return read_shard(ref, locs.tolist(), self.spec.dim, cond)
        except CorruptShard as e:
            self.corrupt[shard] = str(e)
            self.new_corrupt.append((ref.name, str(e)))
            return None

    def _fill(self, shard: int) -> dict[str, Any]:
        """The stand-in for a sample of corrupt ``shard``: the same one whatever the resume point (per group)."""
        groups = self.spec.groups
        group = groups[shard] if groups is not None else 0
        if group not in self._fillers:
            for i in range(len(self.spec.shards)):
                if groups is not None and groups[i] != group:
                    continue
                got = self._read(i, np.zeros(1, dtype=np.int64))
                if got is not None:
                    self._fillers[group] = got[0]
                    break
            else:
                first = next(iter(self.corrupt.items()))
                what = "the dataset" if groups is None else f"bucket {self.spec.shards[shard].bucket}"
                raise CorruptShard(f"every shard of {what} is unreadable (shard {first[0]}: {first[1]}): check "
                                   "the paths or URLs, or rebuild the dataset with tools/make_prompt_shards.py")
        return self._fillers[group]


def set_worker_threads(_: int) -> None:
    """DataLoader worker_init_fn: one thread per worker (reading and padding do not need more)."""
    torch.set_num_threads(1)
