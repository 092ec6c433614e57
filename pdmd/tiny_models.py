"""Tiny random diffusers models for CPU runs (tests, the Slurm test, the demo): no hub, no downloads."""

from __future__ import annotations

import json
from pathlib import Path

import torch

TINY_WAN = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
                text_dim=24, freq_dim=32, ffn_dim=48, num_layers=2, rope_max_seq_len=64)


def write_tiny_wan22_teacher(out: str | Path, *, seed: int = 0, boundary: float = 0.875,
                             text_dim: int = 24, **overrides) -> Path:
    """A two-expert Wan2.2-A14B-shaped teacher folder (transformer = high noise, transformer_2 = low)."""
    from diffusers import WanTransformer3DModel

    out = Path(out)
    cfg = {**TINY_WAN, "text_dim": text_dim, **overrides}
    for i, sub in enumerate(("transformer", "transformer_2")):
        torch.manual_seed(seed + i)
        WanTransformer3DModel(**cfg).save_pretrained(out / sub)
    (out / "model_index.json").write_text(json.dumps({
        "_class_name": "WanPipeline", "boundary_ratio": boundary, "expand_timesteps": False,
        "transformer": ["diffusers", "WanTransformer3DModel"], "transformer_2": ["diffusers", "WanTransformer3DModel"],
    }, indent=2))
    return out
