#!/usr/bin/env python
"""Write a tiny random Wan2.2 teacher (diffusers folder: T2V/I2V-A14B-like or TI2V-5B-like) for CPU runs and tests."""

import argparse

from pdmd.bench.tiny_models import write_tiny_qwen_image_teacher, write_tiny_wan22_teacher

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--text-dim", type=int, default=24, help="must match the prompt shards' embedding width")
    p.add_argument("--kind", choices=["t2v", "i2v", "ti2v", "qwen-image"], default="t2v",
                   help="t2v: two experts (A14B); i2v: two experts reading 4 + 4 + 4 channels, boundary 0.9; "
                   "ti2v: one expert, per-token timesteps (TI2V-5B); qwen-image: one Qwen-Image transformer "
                   "(--text-dim 32 for the tiny Qwen2.5-VL shards)")
    a = p.parse_args()
    kinds = {"t2v": {}, "i2v": dict(in_channels=12, boundary=0.9, pipeline="WanImageToVideoPipeline"),
             "ti2v": dict(experts=1, pipeline="WanImageToVideoPipeline", expand_timesteps=True)}
    if a.kind == "qwen-image":
        print(write_tiny_qwen_image_teacher(a.out, seed=a.seed, text_dim=a.text_dim))
    else:
        print(write_tiny_wan22_teacher(a.out, seed=a.seed, text_dim=a.text_dim, **kinds[a.kind]))
