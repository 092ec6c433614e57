"""Loader throughput at production embedding sizes: samples/s read from tar shards and collated.

No text encoder is involved (that cost is paid once, when the shards are written): a synthetic encoder
writes random embeddings of the real widths (Wan UMT5 4096, Qwen2.5-VL 3584) with prompt lengths
drawn from a realistic range, then the loader reads one epoch. ``tools/bench.py`` may call
:func:`loader_throughput`; ``python -m data.bench`` prints a markdown table row.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from typing import Any

import torch

from data.loader import PromptDataConfig, PromptLoader
from data.prompts import PromptList
from data.writer import write_prompt_shards

DIMS = {"wan": 4096, "qwen-image": 3584}
ENCODER = {"wan": "umt5", "qwen-image": "qwen2.5-vl"}


class SyntheticEncoder:
    """Stands in for a PromptEncoder: random ``[L, D]`` embeddings, L uniform in [min_len, max_len]."""

    def __init__(self, model: str, min_len: int = 60, max_len: int = 250, seed: int = 0):
        self.model, self.name = model, ENCODER[model]
        self.dim, self.dtype, self.max_length = DIMS[model], torch.bfloat16, 512 if model == "wan" else 1024
        self.min_len, self.max_len = min_len, max_len
        self.gen = torch.Generator().manual_seed(seed)

    def info(self) -> dict[str, Any]:
        return {"encoder": self.name, "model": self.model, "synthetic": True}

    def encode(self, prompts: list[str]) -> list[torch.Tensor]:
        lens = torch.randint(self.min_len, self.max_len + 1, (len(prompts),), generator=self.gen)
        return [torch.randn(int(n), self.dim, generator=self.gen).to(self.dtype) for n in lens]


def loader_throughput(model: str = "wan", samples: int = 256, batch_size: int = 4, num_workers: int = 1,
                      samples_per_shard: int = 64, root: str | None = None) -> dict[str, Any]:
    """Write ``samples`` synthetic samples, then time one epoch of the loader (dp_size 1)."""
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        prompts = PromptList([f"synthetic prompt {i}" for i in range(samples)], list(range(1, samples + 1)))
        write_prompt_shards(prompts, tmp, SyntheticEncoder(model), samples_per_shard=samples_per_shard,
                            batch_size=64, progress=False)
        loader = PromptLoader(PromptDataConfig(shards=tmp, batch_size=batch_size, model=model,
                                               num_workers=num_workers), dp_rank=0, dp_size=1)
        start = time.perf_counter()
        it = iter(loader)
        first = next(it)
        t_first = time.perf_counter() - start
        n = len(first["prompt"]) + sum(len(b["prompt"]) for b in it)
        elapsed = time.perf_counter() - start
    return {"model": model, "samples": n, "batch_size": batch_size, "num_workers": num_workers,
            "batch_shape": tuple(first["text_embeds"].shape), "dtype": str(first["text_embeds"].dtype),
            "first_batch_s": t_first, "seconds": elapsed, "samples_per_s": n / elapsed}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=sorted(DIMS), default="wan")
    p.add_argument("--samples", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--num-workers", type=int, default=1)
    args = p.parse_args()
    r = loader_throughput(args.model, args.samples, args.batch_size, args.num_workers)
    print(f"| {platform.node() or 'cpu'} ({torch.get_num_threads()} thread), torch {torch.__version__} | "
          f"`python -m data.bench --model {r['model']} --samples {args.samples} --batch-size {r['batch_size']} "
          f"--num-workers {r['num_workers']}` | batch {r['batch_shape']} {r['dtype']} | "
          f"{r['samples_per_s']:.0f} samples/s (first batch {r['first_batch_s']:.2f} s) |")


if __name__ == "__main__":
    main()
