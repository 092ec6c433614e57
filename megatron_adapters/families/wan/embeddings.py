"""Wan's non-block pieces: timestep/text/image embedders, 3-D rotary angles, (un)patchify.

These are small and replicated on every TP rank (and, for the condition embedder, on every pipeline
stage). Parameter names follow diffusers so their conversion is the identity.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def sinusoidal_timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """[N] -> [N, dim] as cat(cos, sin) (diffusers Timesteps with flip_sin_to_cos=True, shift 0)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    angles = t[:, None].float() * freqs[None, :]
    emb = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class _MLP2(nn.Module):
    """linear_1 -> activation -> linear_2 (diffusers TimestepEmbedding / PixArtAlphaTextProjection)."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int, act: str) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, hidden)
        self.linear_2 = nn.Linear(hidden, out_dim)
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.linear_1(x)
        h = F.silu(h) if self.act == "silu" else F.gelu(h, approximate="tanh")
        return self.linear_2(h)


class _FeedForward(nn.Module):
    """diffusers FeedForward(mult=1, activation 'gelu'): net.0.proj -> GELU -> net.2."""

    def __init__(self, dim: int, out_dim: int) -> None:
        super().__init__()
        self.net = nn.ModuleList([nn.Module(), nn.Identity(), nn.Linear(dim, out_dim)])
        self.net[0].proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net[2](F.gelu(self.net[0].proj(x)))


class ImageEmbedder(nn.Module):
    """CLIP image features -> model width (Wan2.1 I2V; Wan2.2 A14B I2V has none)."""

    def __init__(self, in_dim: int, dim: int, pos_embed_seq_len: int | None, eps: float = 1e-5) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(in_dim, eps=eps)
        self.ff = _FeedForward(in_dim, dim)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.pos_embed = nn.Parameter(torch.zeros(1, pos_embed_seq_len, in_dim)) if pos_embed_seq_len else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pos_embed is not None:
            b, s, d = x.shape
            x = x.view(-1, 2 * s, d) + self.pos_embed
        h = F.layer_norm(x.float(), self.norm1.normalized_shape, self.norm1.weight.float(),
                         self.norm1.bias.float(), self.norm1.eps).to(x.dtype)
        h = self.ff(h)
        return F.layer_norm(h.float(), self.norm2.normalized_shape, self.norm2.weight.float(),
                            self.norm2.bias.float(), self.norm2.eps).to(h.dtype)


class ConditionEmbedder(nn.Module):
    """Timestep -> (temb [.., D], time projection [.., 6, D]); text -> context; image -> context."""

    def __init__(self, dim: int, freq_dim: int, text_dim: int, image_dim: int | None,
                 pos_embed_seq_len: int | None) -> None:
        super().__init__()
        self.freq_dim = freq_dim
        self.time_embedder = _MLP2(freq_dim, dim, dim, "silu")
        self.time_proj = nn.Linear(dim, 6 * dim)
        self.text_embedder = _MLP2(text_dim, dim, dim, "gelu_tanh")
        self.image_embedder = ImageEmbedder(image_dim, dim, pos_embed_seq_len) if image_dim else None

    def forward(self, timestep: torch.Tensor, text: torch.Tensor, image: torch.Tensor | None = None):
        """timestep [B] or [B, S] (per token) -> temb [B(, S), D], proj [B(, S), 6, D]."""
        shape = timestep.shape
        freq = sinusoidal_timestep_embedding(timestep.flatten(), self.freq_dim)
        freq = freq.to(self.time_embedder.linear_1.weight.dtype)
        temb = self.time_embedder(freq).type_as(text)
        proj = self.time_proj(F.silu(temb))
        temb = temb.view(*shape, -1)
        proj = proj.view(*shape, 6, -1)
        context = self.text_embedder(text)
        image_context = self.image_embedder(image) if (image is not None and self.image_embedder) else None
        return temb, proj, context, image_context


def rope_angles(grid: tuple[int, int, int], head_dim: int, theta: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [f*h*w, 1, 1, head_dim/2] of Wan's 3-D RoPE: the head dim splits into t/h/w parts of
    d - 4(d//6), 2(d//6), 2(d//6) channels; channel pair i of a part of width n turns by
    pos * theta^(-2i/n), pos being the token's frame, row or column index."""
    f, h, w = grid
    hw_dim = 2 * (head_dim // 6)
    parts = []
    for n, length, shape in ((head_dim - 2 * hw_dim, f, (f, 1, 1)), (hw_dim, h, (1, h, 1)), (hw_dim, w, (1, 1, w))):
        inv = 1.0 / theta ** (torch.arange(0, n, 2, dtype=torch.float64) / n)
        ang = torch.arange(length, dtype=torch.float64)[:, None] * inv[None, :]
        parts.append(ang.view(*shape, -1).expand(f, h, w, -1))
    angles = torch.cat(parts, dim=-1).reshape(f * h * w, 1, 1, -1)
    return angles.cos().float(), angles.sin().float()


def patchify_grid(latent_shape: torch.Size, patch: tuple[int, int, int]) -> tuple[int, int, int]:
    _, _, frames, height, width = latent_shape
    pt, ph, pw = patch
    if frames % pt or height % ph or width % pw:
        raise ValueError(f"latents of {frames}x{height}x{width} (f x h x w) do not divide into patches {patch}")
    return frames // pt, height // ph, width // pw


def unpatchify(x: torch.Tensor, grid: tuple[int, int, int], patch: tuple[int, int, int]) -> torch.Tensor:
    """[S, B, pt*ph*pw*C] tokens -> [B, C, F, H, W] (diffusers' order)."""
    f, h, w = grid
    pt, ph, pw = patch
    b = x.shape[1]
    x = x.transpose(0, 1).reshape(b, f, h, w, pt, ph, pw, -1)
    return x.permute(0, 7, 1, 4, 2, 5, 3, 6).flatten(6, 7).flatten(4, 5).flatten(2, 3)
