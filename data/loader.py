"""The trainer-facing prompt loader: config, checks at open, iteration, checkpointable position.

    loader = PromptLoader(PromptDataConfig(shards="shards/", batch_size=4, model="wan", text_dim=4096),
                          dp_rank=mpu.get_data_parallel_rank(), dp_size=mpu.get_data_parallel_world_size())
    for batch in loader:                 # epoch mode: the rest of the current epoch
        ...                              # batch["text_embeds"], ["text_mask"], ["is_padding"], ...
        ckpt["data"] = loader.state_dict()
    loader.load_state_dict(ckpt["data"])  # the next batches are the ones an unstopped run would get

Pass the DATA-parallel rank and size (TP/PP/CP ranks of one replica must read the same prompts);
without them the loader uses torch.distributed's rank and world size, which is right only without
model parallelism. The state dict is the same on every rank, so saving it from one rank is enough.

Image-conditioned shards (``tools/make_prompt_shards.py --conditioning i2v|ti2v``) add their tensors to
each batch (``cond_latents`` / ``cond_mask`` or ``first_frame_latents`` / ``first_frame_mask``, see
data/collate.py); every batch then holds one resolution bucket (data/plan.py, GroupedEpochPlan).
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields, replace
from typing import Any

import torch

from data.collate import MODELS, collate
from data.format import embeds_from_bytes
from data.locate import is_url, join, read_bytes, resolve_dataset
from data.reader import CorruptShard
from data.stream import PromptStream, StreamSpec, make_plan, set_worker_threads

log = logging.getLogger("data")
MODEL_ENCODER = {"wan": "umt5", "qwen-image": "qwen2.5-vl"}
MODEL_MAX_LENGTH = {"wan": 512, "qwen-image": 1024}
STATE_VERSION = 1


@dataclass
class PromptDataConfig:
    """What the trainer's YAML ``data:`` section holds (see docs/data.md for each field)."""

    shards: str | list[str]  # dataset folder, index.json path/URL, or shard paths/URLs (brace patterns allowed)
    batch_size: int  # per data-parallel rank
    model: str  # wan | qwen-image
    max_length: int | None = None  # wan: pad length (512); qwen-image: truncation (1024)
    seed: int = 0
    mode: str = "epoch"  # epoch | resample
    shuffle: bool = True  # epoch mode: False serves shards and samples in stored order
    num_workers: int = 0
    text_dim: int | None = None  # the transformer's text input dim (Wan text_dim, Qwen joint_attention_dim)
    pad_to_max_length: bool = False  # qwen-image: fixed [B, max_length, D] instead of the batch's longest
    max_bad_shard_fraction: float = 0.05  # fail once more than this fraction of shards is corrupt
    url_template: str | None = None  # e.g. "pipe:aws s3 cp s3://bucket/ds/{name} -" to fetch shards remotely
    expected_hash: str | None = None  # refuse a dataset whose index hash differs (e.g. the one a run started on)
    prefetch_factor: int = 2
    pin_memory: bool = False
    worker_start_method: str | None = None  # DataLoader workers: None = torch's default (fork on Linux), or spawn
    conditioning: str | None = None  # i2v | ti2v | none: the shards must hold this (None: whatever they hold)
    num_frames: int | None = None  # image-conditioned shards must have been encoded for this many frames

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PromptDataConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"data config: unknown key(s) {unknown}; known keys: {sorted(known)}")
        return cls(**d)

    def validate(self) -> None:
        def bad(key: str, why: str) -> ValueError:
            return ValueError(f"data config: {key}={getattr(self, key)!r} {why}")

        if self.model not in MODELS:
            raise bad("model", f"is not one of {list(MODELS)}")
        if self.mode not in ("epoch", "resample"):
            raise bad("mode", "must be 'epoch' or 'resample'")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise bad("batch_size", "must be a positive integer (samples per data-parallel rank)")
        if self.num_workers < 0:
            raise bad("num_workers", "must be >= 0")
        if not 0.0 <= self.max_bad_shard_fraction <= 1.0:
            raise bad("max_bad_shard_fraction", "must lie in [0, 1]")
        if self.max_length is not None and self.max_length < 1:
            raise bad("max_length", "must be positive")
        if self.worker_start_method not in (None, "fork", "spawn", "forkserver"):
            raise bad("worker_start_method", "must be fork, spawn or forkserver (or unset)")
        if self.conditioning not in (None, "none", "i2v", "ti2v"):
            raise bad("conditioning", "must be i2v, ti2v or none (or unset: accept what the shards hold)")
        if self.url_template is not None and "{name}" not in self.url_template:
            raise bad("url_template", "must contain {name}, replaced by each shard's file name")


def default_dp() -> tuple[int, int]:
    """torch.distributed rank/world size if initialised, else (0, 1). Only right without model parallelism."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class PromptLoader:
    """Batches of prompts and their text embeddings for one data-parallel rank; checkpointable."""

    def __init__(self, config: PromptDataConfig, *, dp_rank: int | None = None, dp_size: int | None = None,
                 on_corrupt_shard: Callable[[str, str], None] | None = None):
        config.validate()
        self.config = config
        if dp_rank is None or dp_size is None:
            d_rank, d_size = default_dp()
            dp_rank = d_rank if dp_rank is None else dp_rank
            dp_size = d_size if dp_size is None else dp_size
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank={dp_rank} must lie in [0, dp_size={dp_size})")
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.max_length = config.max_length or MODEL_MAX_LENGTH[config.model]
        self.on_corrupt_shard = on_corrupt_shard
        self.index, self.shards, self._base = resolve_dataset(config.shards, config.url_template)
        self._check_dataset()
        self.hash: str = self.index["hash"]
        self.num_samples = sum(s.count for s in self.shards)
        self.corrupt_shards: dict[str, str] = {}  # name -> reason, for the trainer's W&B counter
        self.epoch, self.batch = 0, 0
        self._spec = StreamSpec(self.shards, self.index["dim"], config.model, self.max_length, config.pad_to_max_length,
                                config.batch_size, config.mode, config.seed, dp_rank, dp_size, config.shuffle,
                                **self._cond_spec())
        self.batches_per_epoch: int | None = make_plan(self._spec).batches_per_rank
        self.negative = self._load_negative()

    # ---- checks at open -------------------------------------------------------------------------
    def _check_dataset(self) -> None:
        c, idx = self.config, self.index
        if idx["model"] != c.model:
            raise ValueError(f"the shards were encoded with {idx['encoder']} for {idx['model']!r}, but the config's model "
                             f"is {c.model!r}: re-encode with --encoder {MODEL_ENCODER[c.model]} or fix data.model")
        if c.expected_hash is not None and c.expected_hash != idx["hash"]:
            raise ValueError(f"dataset hash {idx['hash'][:12]}... differs from data.expected_hash "
                             f"{c.expected_hash[:12]}...: these are not the shards this run was set up with")
        if c.text_dim is not None and idx["dim"] != c.text_dim:
            raise ValueError(f"the shards hold {idx['dim']}-dim embeddings but the model expects text_dim {c.text_dim}: "
                             "they were encoded with another text encoder; re-encode with the model's own encoder")
        if c.model == "wan" and idx["longest"] > self.max_length:
            raise ValueError(f"the longest prompt embedding has {idx['longest']} tokens, more than data.max_length "
                             f"{self.max_length} that Wan pads to: raise max_length or re-encode with --max-length")
        kind = (idx.get("conditioning") or {}).get("kind", "none")
        if c.conditioning is not None and c.conditioning != kind:
            raise ValueError(f"the shards hold {kind!r} conditioning but data.conditioning is {c.conditioning!r}: "
                             "build shards for this model with tools/make_prompt_shards.py --conditioning, or fix "
                             "data.conditioning")
        if c.num_frames is not None and kind != "none" and idx["conditioning"]["num_frames"] != c.num_frames:
            raise ValueError(f"the shards' conditioning was encoded for {idx['conditioning']['num_frames']} frames but "
                             f"data.num_frames is {c.num_frames}: re-encode with --num-frames {c.num_frames}")
        if not self.shards or sum(s.count for s in self.shards) == 0:
            raise ValueError(f"the dataset at {c.shards!r} is empty: no shards or no samples")
        missing = [s.url for s in self.shards if not is_url(s.url) and not os.path.isfile(s.url)]
        if missing:
            raise FileNotFoundError(f"{len(missing)} of {len(self.shards)} shards are missing, e.g. {missing[:3]}: "
                                    "copy them, or re-run tools/make_prompt_shards.py on the folder to rewrite them")

    def _cond_spec(self) -> dict[str, Any]:
        """StreamSpec fields of an image-conditioned dataset: bucket group per shard, kind, tensor shapes."""
        cond = self.index.get("conditioning")
        if not cond:
            return {}
        order = {b["name"]: i for i, b in enumerate(cond["buckets"])}
        unknown = sorted({str(s.bucket) for s in self.shards if s.bucket not in order})
        if unknown:
            raise ValueError(f"shards of buckets {unknown} are not among the index's buckets {list(order)}: the index "
                             "is inconsistent; re-run tools/make_prompt_shards.py on the folder")
        return {"groups": [order[s.bucket] for s in self.shards], "cond_kind": cond["kind"],
                "cond_shapes": {b["name"]: b["shapes"] for b in cond["buckets"]}}

    def _load_negative(self) -> dict[str, Any]:
        neg = self.index["negative"]
        data = read_bytes(join(self._base, neg["file"]))
        if hashlib.sha256(data).hexdigest() != neg["sha256"]:
            raise ValueError(f"{neg['file']} in {self._base} does not match the index's sha256: re-run "
                             "tools/make_prompt_shards.py on the folder")
        embeds = embeds_from_bytes(data)
        sample = {"index": -1, "key": "negative", "prompt": neg["prompt"], "text_embeds": embeds}
        return collate([sample], self.config.model, self.max_length, self.config.pad_to_max_length)

    # ---- iteration ------------------------------------------------------------------------------
    def __len__(self) -> int:
        if self.batches_per_epoch is None:
            raise TypeError("a resample-mode loader is endless: it has no length")
        return self.batches_per_epoch

    def __iter__(self) -> Iterator[dict[str, Any]]:
        """Epoch mode: the rest of the current epoch (then the position moves to the next). Resample: endless.

        One iterator at a time: each batch handed out advances the loader's position.
        """
        spec = replace(self._spec, epoch=self.epoch, start=self.batch, stop=self.batches_per_epoch,
                       corrupt={i: self.corrupt_shards[s.name] for i, s in enumerate(self.shards)
                                if s.name in self.corrupt_shards})
        for batch in self._batches(PromptStream(spec)):
            self._record_corrupt(batch.pop("corrupt_shards"))
            self.batch += 1
            if self.batches_per_epoch is not None and self.batch == self.batches_per_epoch:
                self.epoch, self.batch = self.epoch + 1, 0
            yield batch

    def forever(self) -> Iterator[dict[str, Any]]:
        """Batches across epoch boundaries without end (the trainer's step loop)."""
        while True:
            yield from self

    def _batches(self, stream: PromptStream) -> Iterator[dict[str, Any]]:
        c = self.config
        if c.num_workers == 0:
            return iter(stream)
        loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=c.num_workers,
                                             prefetch_factor=c.prefetch_factor, pin_memory=c.pin_memory,
                                             worker_init_fn=set_worker_threads,
                                             multiprocessing_context=c.worker_start_method)
        return iter(loader)

    def _record_corrupt(self, reports: list[tuple[str, str]]) -> None:
        for name, reason in reports:
            if name in self.corrupt_shards:
                continue
            self.corrupt_shards[name] = reason
            log.warning("data: skipping corrupt shard %s (%s); %d of %d shards corrupt so far (dp rank %d)",
                        name, reason, len(self.corrupt_shards), len(self.shards), self.dp_rank)
            if self.on_corrupt_shard is not None:
                self.on_corrupt_shard(name, reason)
            if len(self.corrupt_shards) > self.config.max_bad_shard_fraction * len(self.shards):
                raise CorruptShard(
                    f"{len(self.corrupt_shards)} of {len(self.shards)} shards are corrupt "
                    f"({sorted(self.corrupt_shards)[:5]}), more than data.max_bad_shard_fraction="
                    f"{self.config.max_bad_shard_fraction}: delete the bad shards and their .json sidecars and re-run "
                    "tools/make_prompt_shards.py on the folder, or raise the fraction")

    def metrics(self) -> dict[str, float]:
        """Numbers for the trainer's W&B log (this rank's view)."""
        return {"data/epoch": float(self.epoch), "data/batch_in_epoch": float(self.batch),
                "data/corrupt_shards": float(len(self.corrupt_shards))}

    # ---- checkpointing --------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The position (same on every data-parallel rank) plus what must not change for it to mean the same."""
        c = self.config
        return {"version": STATE_VERSION, "epoch": self.epoch, "batch": self.batch, "dataset_hash": self.hash,
                "mode": c.mode, "seed": c.seed, "shuffle": c.shuffle, "batch_size": c.batch_size,
                "dp_size": self.dp_size, "selection": self._selection_hash()}

    def _selection_hash(self) -> str:
        """Which of the dataset's shards this loader reads, in order (a subset can be configured)."""
        return hashlib.sha256("\n".join(s.name for s in self.shards).encode()).hexdigest()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at a saved position; refuse if the data order it refers to would differ."""
        mine = self.state_dict()
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"data state version {state.get('version')} is not {STATE_VERSION}")
        diff = [k for k in ("dataset_hash", "mode", "seed", "shuffle", "batch_size", "dp_size", "selection")
                if state.get(k) != mine[k]]
        if diff:
            what = "; ".join(f"{k}: checkpoint {_short(state.get(k))} vs now {_short(mine[k])}" for k in diff)
            raise ValueError(f"cannot resume the data position exactly ({what}): the same shards, seed, mode, "
                             "batch size and data-parallel size are needed; drop the data state to start the "
                             "epoch over instead")
        limit = self.batches_per_epoch if self.batches_per_epoch is not None else float("inf")
        if not 0 <= state["batch"] < limit or state["epoch"] < 0:
            raise ValueError(f"data state (epoch {state['epoch']}, batch {state['batch']}) is outside the dataset's "
                             f"epochs of {self.batches_per_epoch} batches")
        self.epoch, self.batch = int(state["epoch"]), int(state["batch"])


def _short(v: Any) -> str:
    s = repr(v)
    return s if len(s) <= 40 else s[:37] + "..."


__all__ = ["PromptDataConfig", "PromptLoader", "default_dp", "resolve_dataset"]
