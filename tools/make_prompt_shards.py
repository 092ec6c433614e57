#!/usr/bin/env python
"""Encode a prompt list into WebDataset shards with precomputed text embeddings (see docs/data.md).

    python tools/make_prompt_shards.py --prompts prompts.txt --out shards/ --encoder umt5 \\
        --encoder-path /models/Wan2.2-T2V-A14B-Diffusers

With images (Wan2.2 I2V-A14B / TI2V-5B), a .jsonl or .csv of {prompt, image} rows:

    python tools/make_prompt_shards.py --prompts pairs.jsonl --images /data/imgs --out shards/ \
        --encoder umt5 --encoder-path /models/Wan2.2-I2V-A14B-Diffusers \
        --conditioning i2v --vae /models/Wan2.2-I2V-A14B-Diffusers --buckets 480x832,832x480,624x624

Re-running on the same --out folder resumes: finished shards are skipped.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from data.encoders import (
    DEFAULT_MAX_LENGTH,
    DEFAULT_NEGATIVE,
    ENCODER_MODEL,
    load_prompt_encoder,
    parse_dtype,
)
from data.prompts import read_prompts
from data.writer import write_prompt_shards
from pdmd.run.console import report_user_error


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
    g = p.add_argument_group("image conditioning (Wan2.2 I2V-A14B / TI2V-5B; see docs/data.md)")
    g.add_argument("--conditioning", choices=["i2v", "ti2v"], default=None,
                   help="i2v: I2V-A14B's mask + zero-padded video latent; ti2v: TI2V-5B's first-frame latent. "
                        "--prompts is then a .jsonl/.csv with prompt and image fields")
    g.add_argument("--images", default=None,
                   help="folder that relative image paths are relative to (default: the --prompts file's folder)")
    g.add_argument("--vae", default=None, help="LOCAL diffusers folder with vae/ (AutoencoderKLWan), or the vae folder")
    g.add_argument("--buckets", default=None,
                   help="HEIGHTxWIDTH resolutions, comma separated, e.g. 480x832,832x480,624x624; each image goes "
                        "to the bucket with the closest aspect ratio, centre-cropped and resized")
    g.add_argument("--num-frames", type=int, default=81, help="video length the conditioning is built for (4k+1)")
    g.add_argument("--aspect-tolerance", type=float, default=0.25,
                   help="skip images whose aspect ratio is off the closest bucket's by more than this (0.25 = 25%%)")
    g.add_argument("--min-image-fraction", type=float, default=0.5,
                   help="skip images that would need upscaling by more than 1/this to cover their bucket")
    g.add_argument("--vae-dtype", choices=["bf16", "fp32"], default="fp32", help="dtype the VAE runs in")
    g.add_argument("--cond-dtype", choices=["bf16", "fp32"], default="fp32",
                   help="stored conditioning latents (fp32 = the pipeline's; bf16 halves the shards)")
    return p


def _image_conditioning(args: argparse.Namespace):
    """Scan the image list (skips counted, not fatal) and load the VAE; returns ImageConditioning."""
    from data.conditioning import ConditionEncoder, ImageConditioning, load_vae
    from data.images import parse_buckets, read_image_list, scan_images

    if not args.vae or not args.buckets:
        raise ValueError("--conditioning needs --vae (a local Wan diffusers folder) and --buckets (e.g. 480x832,832x480)")
    buckets = parse_buckets(args.buckets)
    vae, vae_info = load_vae(args.vae, dtype=args.vae_dtype, device=args.device)
    encoder = ConditionEncoder(vae, args.conditioning, args.num_frames, dtype=parse_dtype(args.cond_dtype),
                               vae_info=vae_info)
    encoder.check_buckets(buckets)
    images = read_image_list(args.prompts, args.images)
    scan = scan_images(images, buckets, aspect_tolerance=args.aspect_tolerance,
                       min_image_fraction=args.min_image_fraction, cache_dir=args.out, progress=not args.no_progress)
    if not scan.samples:
        raise ValueError(f"no usable images in {args.prompts} ({len(images.rows)} rows, {images.blank_lines} without "
                         f"a prompt)\n{scan.summary()}")
    return ImageConditioning(encoder, images, scan, buckets)


def main(argv: Sequence[str] | None = None) -> int:
    """Exit 0 done; 2 a mistake in the inputs (one line naming it; PDMD_DEBUG=1 shows the traceback)."""
    args = build_parser().parse_args(argv)
    try:
        return _write(args)
    except (ValueError, OSError, UnicodeDecodeError) as exc:  # data/ reports every input problem as one of these
        return report_user_error("make_prompt_shards", exc)


def _write(args: argparse.Namespace) -> int:
    if not args.conditioning and (args.vae or args.buckets or args.images):
        raise ValueError("--vae, --buckets and --images only apply with --conditioning i2v|ti2v")
    conditioning = _image_conditioning(args) if args.conditioning else None
    prompts = conditioning.prompt_list() if conditioning else read_prompts(args.prompts)
    encoder = load_prompt_encoder(args.encoder, args.encoder_path, dtype=args.dtype, device=args.device,
                                  max_length=args.max_length)
    negative = DEFAULT_NEGATIVE[args.encoder] if args.negative_prompt is None else args.negative_prompt
    source = {"prompts": str(Path(args.prompts).resolve()), "encoder_path": str(Path(args.encoder_path).resolve())}
    if conditioning:
        source.update(images=str(Path(args.images).resolve()) if args.images else "", vae=str(Path(args.vae).resolve()))
    index = write_prompt_shards(
        prompts, args.out, encoder, samples_per_shard=args.samples_per_shard, negative_prompt=negative,
        batch_size=args.batch_size, progress=not args.no_progress, source=source, conditioning=conditioning,
    )
    print(f"wrote {index['count']} prompts ({index['blank_lines']} blank lines skipped) in {len(index['shards'])} "
          f"shards to {args.out}: {index['encoder']} dim {index['dim']} {index['dtype']}, hash {index['hash'][:12]}",
          file=sys.stderr)
    if conditioning:
        cond = index["conditioning"]
        per_bucket = ", ".join(f"{b['name']}: {b['count']}" for b in cond["buckets"])
        print(f"{cond['kind']} conditioning for {cond['num_frames']} frames; samples per bucket: {per_bucket}\n"
              f"{conditioning.scan.summary()}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
