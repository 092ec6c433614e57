"""Writing a prompt dataset: encode prompts, write WebDataset tar shards, the negative prompt and the index.

Resumable: shard ``i`` always holds prompts ``[i*S, (i+1)*S)``, is written to a temporary name and
renamed when complete, then described by a ``shard-NNNNNN.json`` sidecar. A re-run with the same
settings skips every shard whose tar and sidecar agree, so an interrupted encoding job (hours of GPU
time for millions of prompts) loses at most one shard. ``build.json`` pins the settings: re-running
with different ones is refused instead of silently mixing two encodings in one dataset.

Image-conditioned datasets (``conditioning=``, see data/conditioning.py) are laid out by bucket: the
scanned samples are grouped by resolution bucket and each bucket's run is cut into shards, so every
shard holds one bucket (the loader builds single-bucket batches from that); each sample also carries
its VAE-encoded conditioning.
"""

from __future__ import annotations

import json
import os
import sys
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import webdataset as wds
from tqdm import tqdm

from data.encoders import PromptEncoder
from data.format import (
    BUILD,
    DTYPE_NAMES,
    FORMAT,
    INDEX,
    NEGATIVE,
    VERSION,
    embeds_from_bytes,
    embeds_to_bytes,
    encode_sample,
    file_sha256,
    index_hash,
    shard_name,
    write_json_atomic,
)
from data.prompts import PromptList

if TYPE_CHECKING:
    from data.conditioning import ImageConditioning


def write_prompt_shards(
    prompts: PromptList,
    out_dir: str | Path,
    encoder: PromptEncoder,
    *,
    samples_per_shard: int = 256,
    negative_prompt: str = "",
    batch_size: int = 16,
    progress: bool = True,
    source: dict[str, str] | None = None,
    conditioning: ImageConditioning | None = None,
) -> dict[str, Any]:
    """Encode ``prompts`` into shards under ``out_dir`` (skipping finished ones) and return the index.

    With ``conditioning``, ``prompts`` must be ``conditioning.prompt_list()`` (the kept rows in bucket order).
    """
    if len(prompts) == 0:
        raise ValueError(f"no prompts to write ({prompts.blank_lines} blank lines only): check the --prompts file")
    if samples_per_shard < 1 or batch_size < 1:
        raise ValueError(f"--samples-per-shard ({samples_per_shard}) and --batch-size ({batch_size}) must be >= 1")
    if encoder.dtype not in DTYPE_NAMES:
        raise ValueError(f"encoder dtype {encoder.dtype} is not storable: load it as bf16 or fp32")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    settings = {
        "format": FORMAT, "version": VERSION, "encoder": encoder.info(), "dtype": DTYPE_NAMES[encoder.dtype],
        "samples_per_shard": samples_per_shard, "negative_prompt": negative_prompt,
        "count": len(prompts), "blank_lines": prompts.blank_lines, "prompts_sha256": prompts.sha256(),
    }
    if conditioning is not None:
        if len(conditioning.rows) != len(prompts):
            raise ValueError("prompts must be conditioning.prompt_list(): one prompt per kept image row")
        settings["conditioning"] = conditioning.settings()
    build = _check_or_write_build(out, settings, source or {})

    negative = _write_negative(out, encoder, negative_prompt)
    if conditioning is not None:
        ranges = conditioning.shard_ranges(samples_per_shard)
    else:
        ranges = [(s, min(s + samples_per_shard, len(prompts))) for s in range(0, len(prompts), samples_per_shard)]
    shards: list[dict[str, Any]] = [_finished_shard(out, i, *r) for i, r in enumerate(ranges)]
    done = sum(s["count"] for s in shards if s)
    bar = tqdm(total=len(prompts), initial=done, unit="prompt", desc=f"encoding into {out}",
               disable=not progress, file=sys.stderr)
    with bar:
        for i, (start, stop) in enumerate(ranges):
            if not shards[i]:
                shards[i] = _write_shard(out, i, prompts, start, stop, encoder, batch_size, bar, conditioning)

    index = {
        "format": FORMAT, "version": VERSION, "count": len(prompts), "blank_lines": prompts.blank_lines,
        "encoder": encoder.name, "model": encoder.model, "encoder_info": encoder.info(),
        "dim": negative["dim"], "dtype": settings["dtype"], "max_length": encoder.max_length,
        "longest": max(s["longest"] for s in shards), "samples_per_shard": samples_per_shard,
        "negative": negative, "shards": shards, "prompts_sha256": settings["prompts_sha256"],
        "source": build["source"], "created_with": build["created_with"],
    }
    if conditioning is not None:
        index["conditioning"] = conditioning.index_section(shards)
    dims = {s["dim"] for s in shards} | {negative["dim"]}
    if len(dims) != 1:
        raise RuntimeError(f"shards in {out} have different embedding dims {sorted(dims)}: delete the folder and rebuild")
    index["hash"] = index_hash(index)
    write_json_atomic(out / INDEX, index)
    return index


def _check_or_write_build(out: Path, settings: dict[str, Any], source: dict[str, str]) -> dict[str, Any]:
    path = out / BUILD
    if path.exists():
        build = json.loads(path.read_text(encoding="utf-8"))
        old = build.get("settings", {})
        diff = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
        if diff:
            changes = "; ".join(f"{k}: {old.get(k)!r} -> {settings.get(k)!r}" for k in diff)
            raise ValueError(f"{out} was started with other settings ({changes}); use a new --out folder, or delete "
                             f"{out} to rebuild it from scratch")
        return build
    if any(out.glob("shard-*.tar")):
        raise ValueError(f"{out} holds shard-*.tar files but no {BUILD}: it was not written by this tool; use an "
                         "empty --out folder")
    build = {"settings": settings, "source": source,
             "created_with": {p: _version(p) for p in ("torch", "transformers", "diffusers", "webdataset")}}
    write_json_atomic(path, build)
    return build


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def _write_negative(out: Path, encoder: PromptEncoder, negative_prompt: str) -> dict[str, Any]:
    """Encode the negative prompt once per dataset (the trainer's CFG needs it on every step)."""
    path = out / NEGATIVE
    if not path.exists():
        (embeds,) = encoder.encode([negative_prompt])
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(embeds_to_bytes(embeds, metadata={"prompt": negative_prompt}))
        os.replace(tmp, path)
    embeds = embeds_from_bytes(path.read_bytes())
    return {"file": NEGATIVE, "prompt": negative_prompt, "length": int(embeds.shape[0]), "dim": int(embeds.shape[1]),
            "sha256": file_sha256(path)}


def _finished_shard(out: Path, i: int, start: int, stop: int) -> dict[str, Any] | None:
    """The sidecar of shard ``i`` if the shard was completely written for samples ``[start, stop)``, else None."""
    tar, side = out / shard_name(i), out / shard_name(i).replace(".tar", ".json")
    if not (tar.exists() and side.exists()):
        return None
    info = json.loads(side.read_text(encoding="utf-8"))
    same = (info.get("bytes"), info.get("start"), info.get("count")) == (tar.stat().st_size, start, stop - start)
    return info if same else None


def _write_shard(out: Path, i: int, prompts: PromptList, start: int, stop: int, encoder: PromptEncoder,
                 batch_size: int, bar: tqdm, conditioning: ImageConditioning | None = None) -> dict[str, Any]:
    name = shard_name(i)
    tmp = out / (name + ".tmp")
    longest, dims = 0, set()
    with open(tmp, "wb") as f:
        with wds.TarWriter(f, mtime=0.0) as sink:  # fixed mtime: the same prompts give byte-identical shards
            for b in range(start, stop, batch_size):
                idx = range(b, min(b + batch_size, stop))
                for j, emb in zip(idx, encoder.encode([prompts.prompts[j] for j in idx])):
                    cond, extra = conditioning.encode(j) if conditioning is not None else (None, None)
                    sink.write(encode_sample(j, prompts.prompts[j], prompts.lines[j], emb, cond, extra))
                    longest, dims = max(longest, emb.shape[0]), dims | {int(emb.shape[1])}
                bar.update(len(idx))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, out / name)
    info = {"name": name, "start": start, "count": stop - start, "bytes": (out / name).stat().st_size,
            "sha256": file_sha256(out / name), "longest": longest, "dim": dims.pop()}
    if conditioning is not None:
        info["bucket"] = conditioning.sample_buckets[start].name
    write_json_atomic(out / name.replace(".tar", ".json"), info)
    return info
