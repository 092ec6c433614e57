#!/usr/bin/env python
"""Encode a prompt list into WebDataset shards with precomputed text embeddings (see docs/data.md).

    python tools/make_prompt_shards.py --prompts prompts.txt --out shards/ --encoder umt5 \\
        --encoder-path /models/Wan2.2-T2V-A14B-Diffusers

Re-running on the same --out folder resumes: finished shards are skipped.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from data.encoders import DEFAULT_MAX_LENGTH, DEFAULT_NEGATIVE, ENCODER_MODEL, load_prompt_encoder
from data.prompts import read_prompts
from data.writer import write_prompt_shards


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompts", required=True, help="text file (one prompt a line) or .jsonl ({\"prompt\": ...} a line)")
    p.add_argument("--out", required=True, help="output folder (created; re-running resumes)")
    p.add_argument("--encoder", required=True, choices=sorted(ENCODER_MODEL),
                   help="umt5 for Wan2.2, qwen2.5-vl for Qwen-Image")
    p.add_argument("--encoder-path", required=True,
                   help="LOCAL diffusers pipeline folder (tokenizer/ + text_encoder/) or a folder with both")
    p.add_argument("--samples-per-shard", type=int, default=256)
    p.add_argument("--negative-prompt", default=None,
                   help=f"encoded once per dataset (default: {DEFAULT_NEGATIVE!r} per encoder, as the pipelines)")
    p.add_argument("--max-length", type=int, default=None,
                   help=f"token limit (default: {DEFAULT_MAX_LENGTH} per encoder, as the pipelines)")
    p.add_argument("--batch-size", type=int, default=16, help="prompts per text-encoder forward")
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16", help="encoder and stored embedding dtype")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    prompts = read_prompts(args.prompts)
    encoder = load_prompt_encoder(args.encoder, args.encoder_path, dtype=args.dtype, device=args.device,
                                  max_length=args.max_length)
    negative = DEFAULT_NEGATIVE[args.encoder] if args.negative_prompt is None else args.negative_prompt
    index = write_prompt_shards(
        prompts, args.out, encoder, samples_per_shard=args.samples_per_shard, negative_prompt=negative,
        batch_size=args.batch_size, progress=not args.no_progress,
        source={"prompts": str(Path(args.prompts).resolve()), "encoder_path": str(Path(args.encoder_path).resolve())},
    )
    print(f"wrote {index['count']} prompts ({index['blank_lines']} blank lines skipped) in {len(index['shards'])} "
          f"shards to {args.out}: {index['encoder']} dim {index['dim']} {index['dtype']}, hash {index['hash'][:12]}",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
