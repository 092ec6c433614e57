"""`pdmd tiny [--kind t2v|i2v|ti2v|qwen-image] [--out DIR]`: everything a tiny recipe needs, in seconds.

Writes ``DIR/teacher`` (a whole random tiny pipeline: experts, text encoder + tokenizer, VAE, scheduler;
``WanPipeline`` / ``WanImageToVideoPipeline`` / ``QwenImagePipeline.from_pretrained`` load it as it is) and
``DIR/shards`` (the shipped demo prompts, encoded by that pipeline's own text encoder through the real shard
writer; I2V/TI2V shards also hold image conditioning of generated pictures). The default DIR is where the
tiny recipe of the kind looks, so that from the repository root

    pdmd tiny && pdmd train configs/tiny_wan22.yaml --run-dir runs/tiny

works on a fresh clone. No hub, no downloads: every network is random.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from data.conditioning import ConditionEncoder, ImageConditioning, load_vae
from data.encoders import load_prompt_encoder
from data.images import parse_buckets, read_image_list, scan_images
from data.prompts import PromptList, demo_prompts_path, read_prompts
from data.writer import write_prompt_shards
from pdmd.bench.tiny_models import (
    write_base_pipeline,
    write_image_pipeline,
    write_qwen_base_pipeline,
    write_test_image,
)

# kind -> (default folder, recipe, text encoder kind); the folders are the recipes' model.teacher.path / data.shards
KINDS = {
    "t2v": ("outputs/tiny", "configs/tiny_wan22.yaml", "umt5"),
    "i2v": ("outputs/tiny_i2v", "configs/tiny_wan22_i2v.yaml", "umt5"),
    "ti2v": ("outputs/tiny_ti2v", "configs/tiny_wan22_ti2v.yaml", "umt5"),
    "qwen-image": ("outputs/tiny_qwen", "configs/tiny_qwen_image.yaml", "qwen2.5-vl"),
}
RUN_DIRS = {"t2v": "runs/tiny", "i2v": "runs/tiny_i2v", "ti2v": "runs/tiny_ti2v", "qwen-image": "runs/tiny_qwen"}
NUM_PROMPTS = 16
IMAGE_SIDE = {"i2v": 32, "ti2v": 64}  # pixels of the recipes' latents [4, 2, 4, 4] (8x VAE; TI2V's 16x)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kind", choices=sorted(KINDS), default="t2v", help="which tiny recipe to set up (default t2v)")
    p.add_argument("--out", help="folder for teacher/ and shards/ (default: where the kind's tiny recipe looks)")
    p.add_argument("--force", action="store_true", help="write again over an existing folder")


def write_tiny(kind: str, out: Path) -> dict[str, Path]:
    """The tiny pipeline and prompt shards of ``kind`` under ``out``; returns their paths."""
    torch.set_num_threads(1)
    teacher, shards = out / "teacher", out / "shards"
    if kind == "t2v":
        write_base_pipeline(teacher)
    elif kind == "qwen-image":
        write_qwen_base_pipeline(teacher)
    else:
        write_image_pipeline(teacher, kind)
    prompts = read_prompts(demo_prompts_path())
    prompts = PromptList(prompts.prompts[:NUM_PROMPTS], prompts.lines[:NUM_PROMPTS])
    encoder_kind = KINDS[kind][2]
    if kind in IMAGE_SIDE:
        _image_shards(kind, teacher, shards, prompts, out)
    else:
        encoder = load_prompt_encoder(encoder_kind, teacher, dtype="fp32", device="cpu", max_length=32)
        write_prompt_shards(prompts, shards, encoder, samples_per_shard=4, progress=False,
                            source={"prompts": str(demo_prompts_path()), "encoder_path": str(teacher.resolve())})
    return {"teacher": teacher, "shards": shards}


def _image_shards(kind: str, teacher: Path, shards: Path, prompts: PromptList, out: Path) -> None:
    """Generated pictures (two aspect ratios for I2V's two buckets) paired with the prompts, through
    tools/make_prompt_shards.py's own path (scan, bucket, VAE-encode)."""

    side = IMAGE_SIDE[kind]
    images = out / "images"
    rows = []
    for i, prompt in enumerate(prompts.prompts):
        wide = kind == "i2v" and i % 2
        write_test_image(images / f"{i}.png", 2 * side if wide else side, side, seed=10 + i)
        rows.append({"prompt": prompt, "image": f"{i}.png"})
    pairs = out / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    buckets = parse_buckets(f"{side}x{side},{side}x{2 * side}" if kind == "i2v" else f"{side}x{side}")
    vae, vae_info = load_vae(str(teacher), dtype="fp32", device="cpu")
    encoder = ConditionEncoder(vae, kind, 5, dtype=torch.float32, vae_info=vae_info)
    encoder.check_buckets(buckets)
    image_list = read_image_list(str(pairs), str(images))
    scan = scan_images(image_list, buckets, aspect_tolerance=0.25, min_image_fraction=0.5, cache_dir=str(shards),
                       progress=False)
    cond = ImageConditioning(encoder, image_list, scan, buckets)
    text = load_prompt_encoder("umt5", teacher, dtype="fp32", device="cpu", max_length=32)
    write_prompt_shards(cond.prompt_list(), shards, text, samples_per_shard=4, progress=False, conditioning=cond,
                        source={"prompts": str(pairs.resolve()), "encoder_path": str(teacher.resolve()),
                                "images": str(images.resolve()), "vae": str(teacher.resolve())})


def run(args: argparse.Namespace) -> int:
    default, recipe, _ = KINDS[args.kind]
    out = Path(args.out or default)
    if out.exists() and any(out.iterdir()) and not args.force:
        print(f"pdmd tiny: {out} exists; pass --force to write it again (or --out another folder)", file=sys.stderr)
        return 2
    paths = write_tiny(args.kind, out)
    overrides = "" if args.out is None else f" model.teacher.path={paths['teacher']} data.shards={paths['shards']}"
    print(f"pdmd tiny: wrote {paths['teacher']} (a whole tiny {args.kind} pipeline) and {paths['shards']}\n"
          f"next: pdmd train {recipe} --run-dir {RUN_DIRS[args.kind]}{overrides}")
    return 0
