"""`pdmd bench toy`: the demo's exact-ground-truth benchmark with the task's parameters exposed.

Other mixtures, step counts and phase counts can be tried; the same stages, caching and outputs as
`pdmd demo` (pdmd/bench/toy.py), plus the choice of real score (``--teacher exact``: the closed-form
velocity, a perfect teacher) and the ablation rows. Model-speed benchmarks live in tools/bench.py.
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
    p.add_argument("--shift", type=float, help="time shift of the students' few-step schedule (default 1: steps at "
                   "t = 1, 0.75, 0.5, 0.25; Wan's 5 leaves more samples between modes: docs/benchmarks.md, issue 17)")
    p.add_argument("--renoise-shift", type=float, help="time shift of the re-noise draws (default 0.5: towards small t, "
                   "where the within-mode width shows; the trainer's own default is the step shift)")
    p.add_argument("--distill-steps", type=int, help="generator updates per method (default 600)")
    p.add_argument("--samples", type=int, help="samples per prompt and method (default 256)")
    p.add_argument("--groups", type=int, help="far-apart mode groups per prompt (default 1; 2: the task where phase 1 "
                                             "matters)")
    p.add_argument("--teacher", choices=["trained", "exact"],
                   help="the real score: the trained teacher network (default) or the closed-form mixture velocity")
    p.add_argument("--teacher-fit", choices=["exact", "flow"],
                   help="how the teacher network learns: regression on the exact velocity (default) or flow matching")
    p.add_argument("--reference-steps", type=int, help="steps of the converged reference sampler (default 200)")
    p.add_argument("--distill-batch", type=int, dest="batch", help="samples per generator / fake update (default 8)")
    p.add_argument("--student-lr", type=float, help="student learning rate (default 3e-5)")
    p.add_argument("--fake-lr", type=float, help="fake score learning rate (default 1e-4)")
    p.add_argument("--fake-ratio", type=int, help="fake updates per generator update (default 5)")
    p.add_argument("--workers", type=int, help="distillations run at once, one process and core each (default 2)")
    p.add_argument("--network", metavar="HEADSxHEAD_DIMxFFN",
                   help="the teacher / student / fake network, e.g. 16x32x2048 (default), 8x32x1024, 8x16x512 (2 layers)")
    p.add_argument("--ablations", action="store_true",
                   help="also the ablation rows: SGTS from step 2, last step only, naive fake target, trained teacher")
    p.add_argument("--no-gate", action="store_true", help="report the teacher gate without stopping on a failure")
    p.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                   help="extra trainer overrides for every distillation (e.g. student.beta1=0.9)")
    p.add_argument("--fast", action="store_true", help="start from the smoke-test settings of pdmd demo --fast")
    p.add_argument("--json", help="also write the results JSON here")
    p.add_argument("--wandb", choices=["disabled", "offline", "online"], default="disabled",
                   help="also log the results table and the figures to W&B (project phased-dmd-bench)")


OPTIONS = ("prompts", "modes", "groups", "latent_shape", "task_seed", "seeds", "num_steps", "phases", "shift", "renoise_shift", "distill_steps",
           "samples", "teacher", "teacher_fit", "reference_steps", "batch", "student_lr", "fake_lr", "fake_ratio", "workers")


def run(args: argparse.Namespace) -> int:
    from pdmd.bench.toy import BenchSettings, run_and_report  # lazy: --help stays fast

    settings = BenchSettings.fast() if args.fast else BenchSettings()
    for name in OPTIONS:
        value = getattr(args, name)
        if value is not None:
            setattr(settings, name, tuple(value) if isinstance(value, list) else value)
    settings.ablations = args.ablations
    if args.network:
        try:
            heads, head_dim, ffn = (int(v) for v in args.network.lower().split("x"))
        except ValueError:
            print(f"pdmd bench toy: --network {args.network!r}: give HEADSxHEAD_DIMxFFN, e.g. 16x32x2048", file=sys.stderr)
            return 2
        settings.wan = {**settings.wan, "num_attention_heads": heads, "attention_head_dim": head_dim, "ffn_dim": ffn}
    settings.enforce_gate = settings.enforce_gate and not args.no_gate
    settings.overrides = tuple(args.set)
    bad = [o for o in args.set if "=" not in o]
    try:
        if bad:
            raise ValueError(f"--set {bad[0]!r} is not KEY=VALUE (e.g. student.beta1=0.9)")
        settings.check()
    except ValueError as exc:
        print(f"pdmd bench toy: {exc}", file=sys.stderr)
        return 2
    result = run_and_report(Path(args.out), settings, "pdmd bench toy", args.wandb)
    if result is None:
        return 1
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1, default=float))
    return 0
