"""Reading one shard (local path or any URL webdataset's gopen opens: pipe:, http(s), ...) into samples.

A shard is all or nothing: it is streamed once, its bytes hashed on the way, and only if the tar
parses, every needed sample is complete and the sha256 matches the index does the reader return its
samples. Anything else raises :class:`CorruptShard`, which the loader counts and skips. Treating a
shard as a unit keeps the data order a pure function of the plan, so a resumed run sees the same
batches whether or not a shard broke half-way through a previous read.
"""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
from collections.abc import Iterable
from typing import Any

from data.format import COND_MEMBER, cond_from_bytes, embeds_from_bytes, sample_key
from data.locate import ShardRef, is_url


class CorruptShard(Exception):
    """A shard could not be read completely and correctly; the message says why."""


class _HashingReader:
    """A read-only stream wrapper that hashes what passes through (tarfile streams with read() only)."""

    def __init__(self, stream: Any):
        self.stream, self.sha = stream, hashlib.sha256()

    def read(self, n: int = -1) -> bytes:
        data = self.stream.read(n)
        self.sha.update(data)
        return data

    def drain(self) -> None:
        while self.read(1 << 20):
            pass


def _open(url: str):
    import webdataset as wds

    return wds.gopen(url, "rb")


CondSpec = tuple[str, dict[str, list[int]]]  # (kind, per-sample tensor shapes of the shard's bucket)


def read_shard(ref: ShardRef, wanted: Iterable[int], dim: int, cond: CondSpec | None = None
               ) -> dict[int, dict[str, Any]]:
    """Read samples with the given local indices; returns ``{local: sample}`` or raises CorruptShard.

    ``cond``: the dataset is image-conditioned; each sample must carry exactly these tensors and shapes.
    """
    wanted = set(int(i) for i in wanted)
    if not is_url(ref.url):
        try:
            size = os.path.getsize(ref.url)
        except OSError as e:
            raise CorruptShard(f"cannot open: {e}") from e
        if size != ref.bytes:
            raise CorruptShard(f"{size} bytes, the index says {ref.bytes} (truncated or replaced)")
    members: dict[int, dict[str, bytes]] = {}
    try:
        with _open(ref.url) as raw:
            stream = _HashingReader(raw)
            with tarfile.open(fileobj=stream, mode="r|") as tar:
                for info in tar:
                    if not info.isreg():
                        continue
                    key, _, ext = info.name.rpartition("/")[2].partition(".")
                    local = int(key) - ref.start
                    if not 0 <= local < ref.count:
                        raise CorruptShard(f"member {info.name} is outside this shard's index range")
                    if local in wanted:  # others are skipped (still read through, so still hashed)
                        members.setdefault(local, {})[ext] = tar.extractfile(info).read()
            stream.drain()  # the tar end blocks and any trailing bytes belong to the hashed file
    except CorruptShard:
        raise
    except Exception as e:  # tarfile, I/O, pipe and int() errors all mean the same: unusable shard
        raise CorruptShard(f"{type(e).__name__}: {e}") from e
    if stream.sha.hexdigest() != ref.sha256:
        raise CorruptShard(f"sha256 {stream.sha.hexdigest()[:12]}... does not match the index ({ref.sha256[:12]}...)")
    return {local: _decode(ref, local, members.get(local), dim, cond) for local in sorted(wanted)}


def _decode(ref: ShardRef, local: int, parts: dict[str, bytes] | None, dim: int, cond: CondSpec | None
            ) -> dict[str, Any]:
    index = ref.start + local
    needed = {"txt", "safetensors", "json"} | ({COND_MEMBER} if cond is not None else set())
    if not parts or not needed <= set(parts):
        raise CorruptShard(f"sample {index} is missing or incomplete (members: {sorted(parts or {})})")
    try:
        embeds = embeds_from_bytes(parts["safetensors"])
        meta = json.loads(parts["json"])
        prompt = parts["txt"].decode("utf-8")
    except Exception as e:
        raise CorruptShard(f"sample {index}: {type(e).__name__}: {e}") from e
    if embeds.shape[1] != dim or embeds.shape[0] != meta.get("length") or meta.get("index") != index:
        raise CorruptShard(f"sample {index}: embeddings {tuple(embeds.shape)} / metadata {meta} disagree with "
                           f"the index (dim {dim})")
    sample = {"index": index, "key": sample_key(index), "prompt": prompt, "text_embeds": embeds, "line": meta.get("line")}
    if cond is not None:
        sample.update(_decode_cond(ref, index, parts[COND_MEMBER], meta, cond))
    return sample


def _decode_cond(ref: ShardRef, index: int, data: bytes, meta: dict[str, Any], cond: CondSpec) -> dict[str, Any]:
    kind, shapes = cond
    try:
        tensors = cond_from_bytes(data, kind)
    except Exception as e:
        raise CorruptShard(f"sample {index}: conditioning: {type(e).__name__}: {e}") from e
    got = {k: list(v.shape) for k, v in tensors.items()}
    if got != shapes or meta.get("bucket") != ref.bucket:
        raise CorruptShard(f"sample {index}: conditioning {got} of bucket {meta.get('bucket')} disagrees with the "
                           f"index (bucket {ref.bucket}: {shapes})")
    return {**tensors, "image": meta.get("image"), "bucket": meta["bucket"], "height": meta.get("height"),
            "width": meta.get("width")}
