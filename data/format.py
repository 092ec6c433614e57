"""The on-disk format of a prompt dataset: sample encoding, the index, and its hash.

A dataset directory holds ``shard-NNNNNN.tar`` (WebDataset tars), ``negative.safetensors`` (the encoded
negative prompt, once per dataset), ``index.json`` and the writer's bookkeeping (``build.json``,
``shard-NNNNNN.json``). One sample is three tar members sharing the key ``{global index:09d}``:

- ``KEY.txt``          the prompt, UTF-8, exactly as read from the prompt file;
- ``KEY.safetensors``  safetensors bytes with one tensor ``text_embeds`` ``[L, D]``, trimmed to its true length;
- ``KEY.json``         ``{"index": i, "line": source line, "length": L}``.

Image-conditioned datasets (index field ``conditioning``, see data/conditioning.py) add a fourth member,
``KEY.cond.safetensors``, holding the conditioning tensors of ``COND_KEYS[kind]`` (latents in the stored
dtype, masks uint8), and ``image``, ``bucket``, ``height``, ``width`` in ``KEY.json``.

No pickles anywhere: safetensors (which also holds bf16, unlike npy) and JSON only.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

FORMAT = "phased-dmd-prompts"
VERSION = 1
INDEX = "index.json"
NEGATIVE = "negative.safetensors"
BUILD = "build.json"
EMBED_KEY = "text_embeds"
DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float32: "float32"}
COND_MEMBER = "cond.safetensors"
# Conditioning tensors per kind: (latents, mask). i2v = Wan2.2 I2V-A14B, ti2v = Wan2.2 TI2V-5B.
COND_KEYS = {"i2v": ("cond_latents", "cond_mask"), "ti2v": ("first_frame_latents", "first_frame_mask")}


def shard_name(i: int) -> str:
    return f"shard-{i:06d}.tar"


def sample_key(index: int) -> str:
    return f"{index:09d}"


def embeds_to_bytes(embeds: torch.Tensor, metadata: dict[str, str] | None = None) -> bytes:
    """Serialize one ``[L, D]`` embedding as safetensors bytes."""
    return st_save({EMBED_KEY: embeds.contiguous()}, metadata=metadata)


def embeds_from_bytes(data: bytes) -> torch.Tensor:
    """Inverse of :func:`embeds_to_bytes`; raises ValueError on anything but one 2-D ``text_embeds``."""
    tensors = st_load(data)
    t = tensors.get(EMBED_KEY)
    if t is None or t.dim() != 2 or len(tensors) != 1:
        raise ValueError(f"expected one 2-D tensor {EMBED_KEY!r}, got {[(k, tuple(v.shape)) for k, v in tensors.items()]}")
    return t


def cond_from_bytes(data: bytes, kind: str) -> dict[str, torch.Tensor]:
    """Decode a ``cond.safetensors`` member; raises ValueError unless it holds exactly ``COND_KEYS[kind]``."""
    tensors = st_load(data)
    if set(tensors) != set(COND_KEYS[kind]):
        raise ValueError(f"expected conditioning tensors {list(COND_KEYS[kind])}, got {sorted(tensors)}")
    return tensors


def encode_sample(index: int, prompt: str, line: int, embeds: torch.Tensor,
                  cond: dict[str, torch.Tensor] | None = None, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The tar members of one sample, as a WebDataset writer dict (``cond``: image conditioning tensors)."""
    meta = {"index": index, "line": line, "length": int(embeds.shape[0]), **(extra or {})}
    sample = {"__key__": sample_key(index), "txt": prompt.encode("utf-8"), "safetensors": embeds_to_bytes(embeds),
              "json": json.dumps(meta).encode("utf-8")}
    if cond is not None:
        sample[COND_MEMBER] = st_save({k: v.contiguous() for k, v in cond.items()})
    return sample


def canonical_json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def index_hash(index: dict[str, Any]) -> str:
    """sha256 of the index without its ``hash`` field: it covers every shard's sha256, so it names the data."""
    return hashlib.sha256(canonical_json({k: v for k, v in index.items() if k != "hash"})).hexdigest()


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_json_atomic(path: str | Path, obj: Any) -> None:
    """Write then rename, so a crash never leaves a half-written JSON file behind."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, ensure_ascii=False, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def check_index(index: Any, where: str) -> dict[str, Any]:
    """Validate an index's structure and hash; raise ValueError saying what to do if it is wrong."""
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise ValueError(f"{where} is not a {FORMAT} index: build the dataset with tools/make_prompt_shards.py")
    if index.get("version") != VERSION:
        raise ValueError(f"{where} has format version {index.get('version')}, this code reads {VERSION}: "
                         "rebuild the shards with this version of tools/make_prompt_shards.py")
    missing = [k for k in ("count", "encoder", "model", "dim", "dtype", "shards", "hash", "longest") if k not in index]
    if missing:
        raise ValueError(f"{where} lacks {missing}: it is incomplete; re-run tools/make_prompt_shards.py on its folder")
    if index_hash(index) != index["hash"]:
        raise ValueError(f"{where}: hash mismatch (stored {index['hash'][:12]}..., content {index_hash(index)[:12]}"
                         "...): the index was edited or damaged; re-run tools/make_prompt_shards.py on its folder "
                         "to rewrite it")
    return index
