"""Padding per-sample embeddings into the batch each model's transformer expects.

Wan: zero-padded to ``max_length`` (512), as WanPipeline does; Wan's cross-attention has no text mask,
so the zeros are part of what the teacher saw. Qwen-Image: right-padded to the longest prompt of the
batch with a 0/1 mask, as QwenImagePipeline.encode_prompt does (or to ``max_length`` with
``pad_to_max_length``, for fixed shapes), and truncated to ``max_length`` like its
``max_sequence_length``.

Image-conditioned samples (data/conditioning.py) add their conditioning tensors, stacked: a batch holds
one resolution bucket only (the loader's plan guarantees it; collate refuses a mix).
"""

from __future__ import annotations

from typing import Any

import torch

from data.format import COND_KEYS

MODELS = ("wan", "qwen-image")


def collate(samples: list[dict[str, Any]], model: str, max_length: int, pad_to_max_length: bool = False
            ) -> dict[str, Any]:
    """Samples ``{index, key, prompt, text_embeds [L, D], is_padding}`` -> one batch dict.

    Keys: ``text_embeds`` [B, T, D], ``text_mask`` [B, T] int64 (1 = real token), ``text_lens`` [B],
    ``is_padding`` [B] bool (wrap-around or corrupt-shard fillers), ``index`` [B] (global sample id),
    ``key`` and ``prompt`` (lists of str). Image-conditioned samples add their ``COND_KEYS`` tensors
    stacked to ``[B, ...]`` (latents in the stored dtype, masks as float32 0/1, as the pipeline's),
    ``height`` / ``width`` ``[B]`` int64, ``bucket`` and ``image`` (lists of str).
    """
    if model not in MODELS:
        raise ValueError(f"model {model!r}: use one of {MODELS}")
    embeds = [s["text_embeds"][:max_length] for s in samples]
    lens = torch.tensor([e.shape[0] for e in embeds], dtype=torch.int64)
    width = max_length if (model == "wan" or pad_to_max_length) else int(lens.max())
    out = embeds[0].new_zeros(len(embeds), width, embeds[0].shape[1])
    for i, e in enumerate(embeds):
        out[i, : e.shape[0]] = e
    batch = {
        "text_embeds": out,
        "text_mask": (torch.arange(width)[None, :] < lens[:, None]).long(),
        "text_lens": lens,
        "is_padding": torch.tensor([bool(s.get("is_padding", False)) for s in samples]),
        "index": torch.tensor([int(s["index"]) for s in samples], dtype=torch.int64),
        "key": [s["key"] for s in samples],
        "prompt": [s["prompt"] for s in samples],
    }
    keys = next((k for k in COND_KEYS.values() if k[0] in samples[0]), None)
    if keys is not None:
        buckets = {s.get("bucket") for s in samples}
        if len(buckets) != 1:
            raise ValueError(f"a batch mixes resolution buckets {sorted(map(str, buckets))}: image-conditioned "
                             "batches must hold one bucket (use PromptLoader, which plans them so)")
        latents, mask = keys
        batch[latents] = torch.stack([s[latents] for s in samples])
        batch[mask] = torch.stack([s[mask] for s in samples]).to(torch.float32)
        batch["height"] = torch.tensor([int(s["height"]) for s in samples], dtype=torch.int64)
        batch["width"] = torch.tensor([int(s["width"]) for s in samples], dtype=torch.int64)
        batch["bucket"] = [s["bucket"] for s in samples]
        batch["image"] = [s["image"] for s in samples]
    return batch
