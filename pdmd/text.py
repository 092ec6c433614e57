"""Prompt embeddings with their padding mask, as ONE tensor the method can pass around.

Qwen-Image's transformer needs the text mask (prompts are right-padded to the batch's longest); Wan's
does not (its prompts are zero-padded to 512 and the zeros are part of what it saw). The mask must follow
the *text*, not the batch: the negative prompt of CFG has its own length and mask, while image
conditioning (``cond``) is shared by the conditional and unconditional passes. Every operation the
method and the backend apply to text -- ``shape[0]``, batch indexing, ``expand``, ``.to(device/dtype)``
-- keeps a trailing channel intact, so the mask rides along as the last channel of the embeddings:
``[B, L, D] + [B, L] -> [B, L, D + 1]``. 0/1 are exact in every float dtype (bf16 included).
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
