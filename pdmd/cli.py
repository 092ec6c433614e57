"""The `pdmd` command line.

Subcommands are registered in ``SUBCOMMANDS`` as (name, module, help). Each module provides
``add_arguments(parser)`` and ``run(args) -> int``; modules are imported only when their subcommand
runs (or when ``--help`` of that subcommand is asked for), so ``pdmd --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from data.reader import CorruptShard
from pdmd import __version__
from pdmd.core.errors import UserError
from pdmd.run.console import quiet_known_warnings, report_user_error

SUBCOMMANDS: list[tuple[str, str, str]] = [
    ("demo", "pdmd.bench.demo", "run the whole method on CPU with tiny models (the README's first command)"),
    ("tiny", "pdmd.bench.tiny", "write a tiny pipeline and prompt shards for a tiny recipe: pdmd tiny [--kind t2v|i2v|ti2v|qwen-image]"),
    ("train", "pdmd.train", "run the phases of a distillation: pdmd train CONFIG --run-dir DIR [key=value ...]"),
    ("export", "pdmd.export.convert", "a finished run as a diffusers pipeline (or LoRA files): pdmd export --run DIR --out DIR"),
    ("sample", "pdmd.sample", "few-step samples from a run or an export: pdmd sample --run DIR --embeds F --out F"),
    ("eval", "pdmd.eval.command", "diversity across seeds, motion and colour of a generator's videos: pdmd eval --export DIR --prompts F --out DIR"),
    ("bench", "pdmd.bench.cli", "benchmarks of the method: pdmd bench toy (Phased DMD vs DMD2+SGTS on exact ground truth)"),
    ("toy-1d", "pdmd.bench.toy1d", "the paper's 1-D toy: subinterval vs naive fake-score target (table + PNG)"),
    ("plan", "pdmd.plan.planner", "memory per GPU and step time of a recipe at each parallel layout: pdmd plan CONFIG --gpus N"),
]


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """Build the parser; only the chosen subcommand's module is imported."""
    parser = argparse.ArgumentParser(
        prog="pdmd",
        description="Phased DMD: distill flow-matching diffusion transformers into few-step generators.",
    )
    parser.add_argument("--version", action="version", version=f"phased-dmd {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    chosen = next((a for a in (argv or []) if not a.startswith("-")), None)
    for name, module, help_text in SUBCOMMANDS:
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:
            mod = importlib.import_module(module)
            mod.add_arguments(p)
            p.set_defaults(_run=mod.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    quiet_known_warnings()
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    args, extra = parser.parse_known_args(argv)
    if extra:
        # Dotted overrides (key=value) may come after options; subcommands that take them say so.
        if hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides = list(args.overrides) + extra
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if getattr(args, "_run", None) is None:
        parser.print_help()
        return 0 if not argv else 2
    try:
        return int(args._run(args) or 0)
    except (UserError, CorruptShard) as exc:  # every command's user errors: one line, exit 2 (never retried)
        return report_user_error(f"pdmd {args.command}", exc)


if __name__ == "__main__":
    sys.exit(main())
