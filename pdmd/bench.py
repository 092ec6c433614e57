"""`pdmd bench toy`: the demo's exact-ground-truth benchmark with the task's parameters exposed.

Other mixtures, step counts and phase counts can be tried; the same stages, caching and outputs as
`pdmd demo` (pdmd/mixture_bench.py). Model-speed benchmarks live in tools/bench.py.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("entry", choices=["toy"], help="toy: Phased DMD vs DMD2+SGTS on an exact Gaussian mixture")
    p.add_argument("--out", default="outputs/bench_toy", help="cache and results folder")
    p.add_argument("--prompts", type=int, help="prompts: the first K shipped demo prompts (default 8)")
    p.add_argument("--modes", type=int, help="mixture modes per prompt (default 4)")
    p.add_argument("--latent-shape", type=int, nargs=4, metavar=("C", "F", "H", "W"), help="default 4 1 4 4")
    p.add_argument("--seed", type=int, dest="task_seed", help="seed of the mixture: means, spreads, weights (default 0)")
    p.add_argument("--seeds", type=int, nargs="+", help="distillation seeds (default 0)")
    p.add_argument("--steps", type=int, dest="num_steps", help="few-step sampler steps of the students (default 4)")
    p.add_argument("--phases", type=int, help="Phased DMD's phases (default 2)")
    p.add_argument("--distill-steps", type=int, help="generator updates per method (default 200)")
    p.add_argument("--samples", type=int, help="samples per prompt and method (default 256)")
    p.add_argument("--teacher-steps", type=int, help="steps of the reference teacher sampler (default 40)")
    p.add_argument("--fast", action="store_true", help="start from the smoke-test settings of pdmd demo --fast")
    p.add_argument("--json", help="also write the results JSON here")


OPTIONS = ("prompts", "modes", "latent_shape", "task_seed", "seeds", "num_steps", "phases", "distill_steps", "samples",
           "teacher_steps")


def run(args: argparse.Namespace) -> int:
    from pdmd.mixture_bench import BenchSettings, report, run_benchmark

    settings = BenchSettings.fast() if args.fast else BenchSettings()
    for name in OPTIONS:
        value = getattr(args, name)
        if value is not None:
            setattr(settings, name, tuple(value) if isinstance(value, list) else value)
    try:
        settings.check()
    except ValueError as exc:
        print(f"pdmd bench toy: {exc}", file=sys.stderr)
        return 2
    result = run_benchmark(Path(args.out), settings, progress=sys.stderr.isatty())
    report(result, Path(args.out))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1, default=float))
    return 0
