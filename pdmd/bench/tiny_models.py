"""Tiny random diffusers models for CPU runs (tests, the Slurm test, the demo): no hub, no downloads."""

from __future__ import annotations

import json
from pathlib import Path

import torch

TINY_WAN = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
                text_dim=24, freq_dim=32, ffn_dim=48, num_layers=2, rope_max_seq_len=64)


def write_tiny_wan22_teacher(out: str | Path, *, seed: int = 0, boundary: float = 0.875,
                             text_dim: int = 24, experts: int = 2, pipeline: str = "WanPipeline",
                             expand_timesteps: bool = False, **overrides) -> Path:
    """A Wan2.2-shaped teacher folder: two experts like A14B (transformer = high noise, transformer_2 =
    low), or one like TI2V-5B. ``pipeline`` names the model_index class (WanImageToVideoPipeline for
    I2V / TI2V teachers, whose transformers read ``in_channels`` = out + 4 + z, or per-token timesteps)."""
    from diffusers import WanTransformer3DModel

    out = Path(out)
    cfg = {**TINY_WAN, "text_dim": text_dim, **overrides}
    subs = ("transformer", "transformer_2")[:experts]
    for i, sub in enumerate(subs):
        torch.manual_seed(seed + i)
        WanTransformer3DModel(**cfg).save_pretrained(out / sub)
    index = {"_class_name": pipeline, "expand_timesteps": expand_timesteps,
             **{sub: ["diffusers", "WanTransformer3DModel"] for sub in subs}}
    if experts == 2:
        index["boundary_ratio"] = boundary
    else:
        index["transformer_2"] = [None, None]
    if pipeline == "WanImageToVideoPipeline":  # Wan2.2's I2V models have no CLIP image encoder
        index.update(image_encoder=[None, None], image_processor=[None, None])
    (out / "model_index.json").write_text(json.dumps(index, indent=2))
    return out


# RoPE axes sum to the head dim; in_channels = 4 x out_channels (2x2 packed latent patches).
TINY_QWEN_IMAGE = dict(patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16,
                       num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=(4, 6, 6))


def write_tiny_qwen_image_teacher(out: str | Path, *, seed: int = 0, text_dim: int = 32, **overrides) -> Path:
    """A Qwen-Image-shaped teacher folder (``transformer/`` + a QwenImagePipeline model_index.json).
    diffusers' init leaves norm weights at 1 and some projections at 0: every parameter is nudged so that
    the tiny teacher, its students and their gradients are all non-trivial."""
    from diffusers import QwenImageTransformer2DModel

    out = Path(out)
    torch.manual_seed(seed)
    model = QwenImageTransformer2DModel(**{**TINY_QWEN_IMAGE, "joint_attention_dim": text_dim, **overrides})
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    model.save_pretrained(out / "transformer")
    index = {"_class_name": "QwenImagePipeline", "transformer": ["diffusers", "QwenImageTransformer2DModel"],
             "scheduler": [None, None], "text_encoder": [None, None], "tokenizer": [None, None], "vae": [None, None]}
    (out / "model_index.json").write_text(json.dumps(index, indent=2))
    return out
