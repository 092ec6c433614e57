"""The worker side of the loader: an IterableDataset that turns one rank's plan into collated batches.

Each DataLoader worker serves every ``num_workers``-th batch starting from the resume point (see
:func:`data.plan.worker_batches`), reads only the shards its batches touch, and emits batches in order.
A corrupt shard's samples are replaced by a *filler* (the first sample of the lowest-numbered readable
shard, marked ``is_padding``) so every rank still yields the same number of full batches (a rank that
yielded fewer would leave the others waiting in a collective); the shard's name and the reason travel
to the main process in the batch's ``corrupt_shards`` list.
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
from data.plan import EpochPlan, ResamplePlan, local_indices, worker_batches
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


def make_plan(spec: StreamSpec) -> EpochPlan | ResamplePlan:
    counts = [s.count for s in spec.shards]
    if spec.mode == "epoch":
        return EpochPlan(counts, seed=spec.seed, epoch=spec.epoch, dp_size=spec.dp_size,
                         batch_size=spec.batch_size, shuffle=spec.shuffle)
    return ResamplePlan(counts, seed=spec.seed, batch_size=spec.batch_size)


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
        self._filler: dict[str, Any] | None = None

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
                        sample = {**self._fill(), "is_padding": True}
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
        try:
            return read_shard(ref, locs.tolist(), self.spec.dim)
        except CorruptShard as e:
            self.corrupt[shard] = str(e)
            self.new_corrupt.append((ref.name, str(e)))
            return None

    def _fill(self) -> dict[str, Any]:
        """The stand-in for a sample of a corrupt shard: the same one whatever the resume point."""
        if self._filler is None:
            for i in range(len(self.spec.shards)):
                got = self._read(i, np.zeros(1, dtype=np.int64))
                if got is not None:
                    self._filler = got[0]
                    break
            else:
                first = next(iter(self.corrupt.items()))
                raise RuntimeError(f"every shard of the dataset is unreadable (shard {first[0]}: {first[1]}): check "
                                   "the paths or URLs, or rebuild the dataset with tools/make_prompt_shards.py")
        return self._filler


def set_worker_threads(_: int) -> None:
    """DataLoader worker_init_fn: one thread per worker (reading and padding do not need more)."""
    torch.set_num_threads(1)
