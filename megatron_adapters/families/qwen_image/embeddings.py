"""Qwen-Image's non-block pieces: timestep embedder, output norm, and the 3-axis RoPE of [text; image].

These are small and replicated on every TP rank (the timestep embedder on every pipeline stage too).
Module and parameter names follow diffusers so their conversion is the identity. Arithmetic follows
diffusers' order of operations so fp32 results agree to rounding.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from megatron_adapters.families.qwen_image.config import EPS, TIMESTEP_CHANNELS

Segments = tuple[tuple[int, int, int], ...]


def timestep_embedding(sigma: torch.Tensor, dim: int = TIMESTEP_CHANNELS, scale: float = 1000.0) -> torch.Tensor:
    """[N] sigmas -> [N, dim] as cat(cos, sin) of 1000 * sigma * freqs (diffusers Timesteps(flip_sin_to_cos,
    shift 0, scale=1000)): the model takes sigma in [0, 1] and scales it itself."""
    half = dim // 2
    exponent = -math.log(10000) * torch.arange(half, dtype=torch.float32, device=sigma.device) / half
    freqs = torch.exp(exponent)  # fp32 whatever the timestep's dtype (diffusers' embeddings.Timesteps)
    angles = scale * (sigma[:, None].float() * freqs[None, :])
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


class TimestepEmbedder(nn.Module):
    """diffusers TimestepEmbedding: linear_1 -> SiLU -> linear_2."""

    def __init__(self, in_dim: int, dim: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class TimeTextEmbed(nn.Module):
    """sigma [B] -> temb [B, D] (diffusers QwenTimestepProjEmbeddings, keys time_text_embed.*)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.timestep_embedder = TimestepEmbedder(TIMESTEP_CHANNELS, dim)

    def forward(self, sigma: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        # diffusers casts the timestep to the activations' dtype before embedding it.
        freq = timestep_embedding(sigma.to(dtype))
        return self.timestep_embedder(freq.to(dtype))


class NormOut(nn.Module):
    """diffusers AdaLayerNormContinuous(elementwise_affine=False): LN(x) * (1 + scale) + shift, where
    (scale, shift) = linear(SiLU(temb)) -- scale first, unlike the blocks' (shift, scale, gate)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, 2 * dim)

    def forward(self, x: torch.Tensor, temb_act: torch.Tensor) -> torch.Tensor:
        """x [s, B, D], temb_act = SiLU(temb) [B, D]."""
        scale, shift = self.linear(temb_act.to(x.dtype)).chunk(2, dim=-1)
        return F.layer_norm(x, (x.shape[-1],), eps=EPS) * (1 + scale[None]) + shift[None]


def image_segments(img_shapes, num_tokens: int) -> Segments:
    """The (frames, height, width) token grids of the image sequence, shared by the batch.

    Accepts a list of (f, h, w) or diffusers' per-sample form [[(f, h, w), ...], ...] (which must
    then be the same for every sample: diffusers would silently use the first one's).
    """
    if img_shapes is None:
        raise ValueError("img_shapes is required: the (frames, height, width) token grid(s), e.g. [(1, H/16, W/16)]")
    shapes = list(img_shapes)
    if shapes and isinstance(shapes[0], (list, tuple)) and shapes[0] and isinstance(shapes[0][0], (list, tuple)):
        if any(list(map(tuple, s)) != list(map(tuple, shapes[0])) for s in shapes):
            raise ValueError(f"img_shapes differ between samples ({shapes}): batch images of one size together")
        shapes = list(shapes[0])
    segments = tuple((int(f), int(h), int(w)) for f, h, w in shapes)
    total = sum(f * h * w for f, h, w in segments)
    if total != num_tokens:
        raise ValueError(f"img_shapes {list(segments)} hold {total} tokens but the image sequence has {num_tokens}")
    return segments


def _inv_freq(dim: int, theta: float = 10000.0) -> torch.Tensor:
    return 1.0 / torch.pow(theta, torch.arange(0, dim, 2).to(torch.float32).div(dim))


def _axis_angles(positions: torch.Tensor, dim: int) -> torch.Tensor:
    return torch.outer(positions, _inv_freq(dim))  # [n, dim / 2], float32 as diffusers computes it


@functools.lru_cache(maxsize=32)
def _rope_phasors(segments: Segments, text_len: int, axes: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    image_parts, max_index = [], 0
    for idx, (f, h, w) in enumerate(segments):
        # scale_rope: rows/columns are centred, positions -(n - n//2) .. n//2 - 1; segment idx's frames
        # start at frame idx (diffusers' convention for several images, e.g. an edit's condition image).
        fa = _axis_angles(torch.arange(idx, idx + f), axes[0])
        ha = _axis_angles(torch.arange(h) - (h - h // 2), axes[1])
        wa = _axis_angles(torch.arange(w) - (w - w // 2), axes[2])
        grid = torch.cat([fa.view(f, 1, 1, -1).expand(f, h, w, -1), ha.view(1, h, 1, -1).expand(f, h, w, -1),
                          wa.view(1, 1, w, -1).expand(f, h, w, -1)], dim=-1)
        image_parts.append(grid.reshape(f * h * w, -1))
        max_index = max(max_index, h // 2, w // 2)
    # Text tokens come after the image on every axis: positions max_index, max_index + 1, ...
    text_pos = torch.arange(max_index, max_index + text_len)
    text = torch.cat([_axis_angles(text_pos, a) for a in axes], dim=-1)

    def phasors(angles: torch.Tensor) -> torch.Tensor:
        return torch.polar(torch.ones_like(angles), angles)[:, None, None, :]

    return phasors(torch.cat(image_parts)), phasors(text)


def rope(segments: Segments, text_len: int, axes: Sequence[int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit phasors (complex64, [n, 1, 1, head_dim / 2]) of the image tokens and of the text tokens,
    for ``apply_rope_complex`` (interleaved channel pairs, as diffusers rotates them)."""
    image, text = _rope_phasors(tuple(segments), int(text_len), tuple(axes))
    return image.to(device), text.to(device)
