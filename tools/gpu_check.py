#!/usr/bin/env python
"""Helpers of tools/gpu_check.sh, one subcommand each; every one prints a last ``SUMMARY: ...`` line that
the script puts in its table.

- ``env``: GPU, torch/CUDA, megatron-core, Transformer Engine and which project modules import;
  prints ``missing=a,b`` and ``te=0|1`` for the script; exit 3 without CUDA.
- ``matmul``: the dense bf16 matmul rate of this GPU (the yardstick for the block benchmark's TFLOP/s).
- ``metrics RUN_DIR``: a finished ``pdmd train`` run in one line (steps, last losses, step time, peak
  GPU memory); exit 1 when a loss is not finite.
"""

from __future__ import annotations

import importlib
import json
import math
import sys
import time
from importlib import metadata
from pathlib import Path

MODULES = ["torch", "megatron.core", "diffusers", "transformers", "omegaconf", "webdataset", "safetensors", "wandb",
           "pytest", "psutil", "sentencepiece", "peft", "accelerate"]


def env() -> int:
    missing = []
    for name in MODULES:
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001 - any failure means the check that needs it cannot run
            missing.append(name)
    print("missing=" + ",".join(missing))
    import torch

    cuda = torch.cuda.is_available()
    gpu = torch.cuda.get_device_name(0) if cuda else "no CUDA device"
    mem = f" ({torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB)" if cuda else ""
    try:
        import transformer_engine
        import transformer_engine.pytorch  # noqa: F401

        te = f"Transformer Engine {getattr(transformer_engine, '__version__', '?')}"
        print("te=1")
    except Exception as exc:  # noqa: BLE001 - a half-installed TE fails in many ways
        te = f"Transformer Engine missing ({type(exc).__name__}: {str(exc)[:80]}): its checks are skipped"
        print("te=0")
    try:
        mcore = f"megatron-core {metadata.version('megatron-core')}"
    except metadata.PackageNotFoundError:
        mcore = "megatron-core missing"
    print(f"SUMMARY: {gpu}{mem}, torch {torch.__version__} (CUDA {torch.version.cuda}), {mcore}, {te}"
          + (f"; not importable: {', '.join(missing)}" if missing else ""))
    return 0 if cuda else 3


def matmul(n: int = 8192, reps: int = 50) -> int:
    import torch

    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(5):
        a @ b
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    torch.cuda.synchronize()
    rate = 2 * n**3 * reps / (time.perf_counter() - start) / 1e12
    print(f"SUMMARY: {rate:.0f} TFLOP/s dense bf16 ({n}^3 matmul x {reps})")
    return 0


def metrics(run_dir: str) -> int:
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if line.strip()]
    last = {k: v for r in rows for k, v in r.items()}
    losses = {k: v for k, v in last.items() if k.endswith(("generator_loss", "fake_loss"))}
    bad = sorted(k for k, v in losses.items() if not math.isfinite(v))
    peak = max((v for k, v in last.items() if k.endswith("peak_memory_gb")), default=float("nan"))
    steps = [v for k, v in last.items() if k.endswith("step_time_s")]
    print(f"SUMMARY: {len(rows)} steps, last " + ", ".join(f"{k}={v:.3g}" for k, v in sorted(losses.items()))
          + (f"; last step {steps[-1]:.2f}s" if steps else "") + f"; peak {peak:.2f} GiB"
          + (f"; NON-FINITE {bad}" if bad else ""))
    return 1 if bad or not losses else 0


def main(argv: list[str]) -> int:
    if argv[:1] == ["env"]:
        return env()
    if argv[:1] == ["matmul"]:
        return matmul()
    if argv[:1] == ["metrics"] and len(argv) == 2:
        return metrics(argv[1])
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
