"""The method's tensors <-> what a model family takes, without Megatron (the backend, the export and the
sampler share these).

Text. Prompt embeddings travel with their padding mask as ONE tensor the method can pass around.

Qwen-Image's transformer needs the text mask (prompts are right-padded to the batch's longest); Wan's
does not (its prompts are zero-padded to 512 and the zeros are part of what it saw). The mask must follow
the *text*, not the batch: the negative prompt of CFG has its own length and mask, while image
conditioning (``cond``) is shared by the conditional and unconditional passes. Every operation the
method and the backend apply to text -- ``shape[0]``, batch indexing, ``expand``, ``.to(device/dtype)``
-- keeps a trailing channel intact, so the mask rides along as the last channel of the embeddings:
``[B, L, D] + [B, L] -> [B, L, D + 1]``. 0/1 are exact in every float dtype (bf16 included).

Latents. The method works on ``[B, C, F, H, W]``; Qwen-Image's transformer reads one frame as 2x2 patches
packed into tokens ``[B, (H/2)(W/2), 4C]`` in QwenImagePipeline's ``_pack_latents`` order, and returns
velocities in the same layout.
"""

from __future__ import annotations

import torch


def pack_text(embeds: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B, L, D] embeddings and a [B, L] 0/1 mask -> [B, L, D + 1] (mask last)."""
    if mask.shape != embeds.shape[:2]:
        raise ValueError(f"text mask {tuple(mask.shape)} does not fit embeddings {tuple(embeds.shape)}")
    return torch.cat([embeds, mask.to(embeds.dtype).unsqueeze(-1)], dim=-1)


def unpack_text(text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, L, D + 1] -> ([B, L, D] embeddings, [B, L] int64 mask, 1 = real token), as the pipelines pass it."""
    return text[..., :-1], (text[..., -1] > 0.5).long()


def pack_latents(x: torch.Tensor, p: int = 2) -> torch.Tensor:
    """[B, C, 1, H, W] -> [B, (H/p)(W/p), C p p]: QwenImagePipeline._pack_latents' token order."""
    b, c, _, h, w = x.shape
    return x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // p) * (w // p), c * p * p)


def unpack_latents(tokens: torch.Tensor, h: int, w: int, p: int = 2) -> torch.Tensor:
    """[B, (H/p)(W/p), C p p] -> [B, C, 1, H, W]: QwenImagePipeline._unpack_latents."""
    b, _, d = tokens.shape
    c = d // (p * p)
    return tokens.reshape(b, h // p, w // p, c, p, p).permute(0, 3, 1, 4, 2, 5).reshape(b, c, 1, h, w)
