"""Tiny random diffusers models and whole pipelines for CPU runs (`pdmd tiny`, the tests, the Slurm test, the
demo): no hub, no downloads."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from data.tiny_encoders import QWEN_DIM, UMT5_DIM, tiny_parts

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


# --- whole tiny pipelines (text encoder, tokenizer, VAE, scheduler): `pdmd tiny`, the tests ---------
def tiny_vae(seed: int = 0):
    from diffusers import AutoencoderKLWan

    torch.manual_seed(seed)
    return AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1, attn_scales=[],
                            temperal_downsample=[False, True, True], latents_mean=[0.1, -0.2, 0.05, 0.0],
                            latents_std=[1.5, 0.8, 1.0, 1.2]).eval()

def write_base_pipeline(out: Path) -> Path:
    """A complete tiny Wan2.2 pipeline folder (the teacher the run distils, and the export's base)."""
    from diffusers import UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel


    teacher = write_tiny_wan22_teacher(out.parent / "teacher_parts", text_dim=UMT5_DIM)
    tokenizer, text_encoder = tiny_parts("umt5")
    pipe = WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=tiny_vae(),
                       scheduler=UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                                         flow_shift=12.0),
                       transformer=WanTransformer3DModel.from_pretrained(teacher / "transformer"),
                       transformer_2=WanTransformer3DModel.from_pretrained(teacher / "transformer_2"),
                       boundary_ratio=0.875)
    pipe.save_pretrained(out)
    return out

def tiny_vae_ti2v(seed: int = 0):
    """A tiny Wan2.2-style residual AutoencoderKLWan (16x spatial with a 2x2 patch, as TI2V-5B's VAE)."""
    from diffusers import AutoencoderKLWan

    torch.manual_seed(seed)
    return AutoencoderKLWan(base_dim=8, decoder_base_dim=8, z_dim=4, is_residual=True, in_channels=12,
                            out_channels=12, patch_size=2, scale_factor_spatial=16, latents_mean=[0.1, -0.2, 0.05, 0.0],
                            latents_std=[1.5, 0.8, 1.0, 1.2]).eval()

def write_image_pipeline(out: Path, kind: str = "i2v", seed: int = 0) -> Path:
    """A complete tiny WanImageToVideoPipeline folder shaped like the released models, as a teacher.

    ``i2v`` (Wan2.2 I2V-A14B): two experts reading cat([x, mask, image latents]) (in 4 + 4 + 4 = 12, out 4),
    boundary_ratio 0.9, expand_timesteps false, the 8x tiny VAE. ``ti2v`` (TI2V-5B): one transformer
    (in = out = 4), expand_timesteps true, the 16x residual VAE. No CLIP image encoder (image_dim None)."""
    from diffusers import UniPCMultistepScheduler, WanImageToVideoPipeline, WanTransformer3DModel


    cfg = {**TINY_WAN, "text_dim": UMT5_DIM, "in_channels": 12 if kind == "i2v" else 4, "out_channels": 4}
    experts = []
    for i in range(2 if kind == "i2v" else 1):
        torch.manual_seed(seed + i)
        experts.append(WanTransformer3DModel(**cfg).eval())
    tokenizer, text_encoder = tiny_parts("umt5")
    pipe = WanImageToVideoPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=tiny_vae() if kind == "i2v" else tiny_vae_ti2v(),
        scheduler=UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=5.0),
        transformer=experts[0], transformer_2=experts[1] if kind == "i2v" else None,
        boundary_ratio=0.9 if kind == "i2v" else None, expand_timesteps=kind == "ti2v")
    pipe.save_pretrained(out)
    return out

def write_test_image(path: Path, width: int = 90, height: int = 70, seed: int = 0) -> Path:
    """A smooth random RGB picture, not of any bucket's size (the crop-resize is exercised)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (height // 8, width // 8, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(small).resize((width, height), Image.BILINEAR).save(path)
    return path

def tiny_qwen_vae(seed: int = 0):
    """A tiny AutoencoderKLQwenImage (z_dim 4, 8x spatial like Qwen-Image's)."""
    from diffusers import AutoencoderKLQwenImage

    torch.manual_seed(seed)
    return AutoencoderKLQwenImage(base_dim=8, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                                  latents_mean=[0.1, -0.2, 0.05, 0.0], latents_std=[1.5, 0.8, 1.0, 1.2]).eval()

def write_qwen_base_pipeline(out: Path) -> Path:
    """A whole tiny QwenImagePipeline folder (the teacher a Qwen-Image run distils, and what its export
    copies): pdmd.bench.tiny_models' tiny transformer, the tiny Qwen2.5-VL text encoder and tokenizer, a tiny VAE."""
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImagePipeline, QwenImageTransformer2DModel


    parts = write_tiny_qwen_image_teacher(out.parent / "teacher_parts", text_dim=QWEN_DIM)
    tokenizer, text_encoder = tiny_parts("qwen2.5-vl")
    scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9,
                                                shift_terminal=0.02)  # Qwen-Image's own kind of schedule
    QwenImagePipeline(scheduler=scheduler, vae=tiny_qwen_vae(), text_encoder=text_encoder, tokenizer=tokenizer,
                      transformer=QwenImageTransformer2DModel.from_pretrained(parts / "transformer")).save_pretrained(out)
    return out
