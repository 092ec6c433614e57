"""`pdmd demo`: the whole method on a laptop in minutes, against exact ground truth.

Runs the diversity benchmark of pdmd/bench/toy.py with fixed settings (``BenchSettings.demo``): for
each of 4 demo prompts a known Gaussian mixture over small Wan-shaped latents, a two-expert teacher
network fit to it (our Megatron Wan model, by regression on the exact velocity) that must pass the
teacher gate, Phased DMD (4 steps, 2 phases) and DMD2+SGTS (4 steps, one expert) distilled from it
through the real shard writer, trainer and exporter, and every method scored against the exact mixture
beside exact samples and the teacher's converged and 4-step samples. Writes
``results.md``, ``results.json``, PNG plots and the exported diffusers folders under ``--out``;
everything is cached there, so a rerun only redoes what is missing.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="outputs/demo", help="where the teacher, shards, runs, exports and results go")
    p.add_argument("--fast", action="store_true", help="smoke-test size (CI): every stage runs, the numbers are rough")
    p.add_argument("--seeds", type=int, nargs="+", help="distillation seeds (default: 0); each method runs once per seed")
    p.add_argument("--wandb", choices=["disabled", "offline", "online"], default="disabled",
                   help="also log the results table and the figures to W&B (project phased-dmd-bench)")


def run(args: argparse.Namespace) -> int:
    from pdmd.bench.toy import BenchSettings, run_and_report  # lazy: --help stays fast

    settings = BenchSettings.fast() if args.fast else BenchSettings.demo()
    if args.seeds:
        settings.seeds = tuple(args.seeds)
    return 0 if run_and_report(Path(args.out), settings, "pdmd demo", args.wandb) is not None else 1
