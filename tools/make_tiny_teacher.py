#!/usr/bin/env python
"""Write a tiny random two-expert Wan2.2 teacher (diffusers folder) for CPU runs and tests."""

import argparse

from pdmd.tiny_models import write_tiny_wan22_teacher

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--text-dim", type=int, default=24, help="must match the prompt shards' embedding width")
    a = p.parse_args()
    print(write_tiny_wan22_teacher(a.out, seed=a.seed, text_dim=a.text_dim))
