"""`pdmd demo`: the whole pipeline on a CPU in about a minute, from nothing.

Until the demo issue's Gaussian-mixture benchmark lands, this runs the real product path on tiny random
models: a two-expert Wan2.2-shaped teacher, a tiny UMT5 text encoder, the shipped prompt list written to
WebDataset shards, and a two-phase Phased DMD distillation (4 steps, shift 5, SGTS, CFG, LoRA student)
through the Megatron backend, with manifest, checkpoints, metrics.jsonl and an offline W&B run.
Everything it builds is cached in ``--out``; rerunning resumes or reports the finished run.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

DEMO_RECIPE = {
    "seed": 0,
    "model": {"kind": "wan", "spec": "local", "dtype": "fp32",
              "teacher": {"subfolders": ["transformer", "transformer_2"], "boundary": 0.875}},
    "plan": {"num_steps": 4, "shift": 5.0, "num_phases": 2, "renoise_clamp": [[0.875, 1.0], None]},
    "method": {"sgts": True, "dmd_form": "velocity", "cfg_scale": 4.0, "fake_loss": "subinterval", "fake_ratio": 2},
    "student": {"lr": 1e-4, "lora": {"rank": 4, "alpha": 8.0}},
    "fake": {"lr": 1e-4, "lora": None},
    "train": {"steps": 6, "micro_batch_size": 2, "latent_shape": [4, 2, 8, 8], "checkpoint_every": 3, "keep_last": 1},
    "data": {"model": "wan", "max_length": 32},
    "wandb": {"mode": "offline", "project": "phased-dmd-demo"},
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="outputs/demo", help="where the tiny teacher, shards and run go")
    p.add_argument("overrides", nargs="*", help="dotted overrides of the embedded recipe, e.g. train.steps=10")


def prepare(out: Path) -> tuple[Path, Path]:
    """The tiny teacher and the prompt shards (built once, then reused)."""
    from data.encoders import load_prompt_encoder
    from data.prompts import demo_prompts_path, read_prompts
    from data.tiny_encoders import UMT5_DIM, save_tiny_encoder
    from data.writer import write_prompt_shards
    from pdmd.tiny_models import write_tiny_wan22_teacher

    teacher = out / "teacher"
    if not (teacher / "model_index.json").is_file():
        write_tiny_wan22_teacher(teacher, text_dim=UMT5_DIM)
    shards = out / "shards"
    if not (shards / "index.json").is_file():
        encoder = out / "encoder"
        if not (encoder / "model_index.json").is_file():
            save_tiny_encoder("umt5", encoder)
        enc = load_prompt_encoder("umt5", encoder, dtype="fp32", max_length=32)
        write_prompt_shards(read_prompts(demo_prompts_path()), shards, enc, samples_per_shard=8, progress=False)
    return teacher, shards


def run(args: argparse.Namespace) -> int:
    import torch

    from pdmd.config import load_config
    from pdmd.train import train

    torch.set_num_threads(1)
    out = Path(args.out)
    teacher, shards = prepare(out)
    cfg = load_config(DEMO_RECIPE, [f"model.teacher.path={teacher}", f"data.shards={shards}", *args.overrides])
    code = train(cfg, str(out / "run"))
    if code:
        return code
    manifest = json.loads((out / "run" / "manifest.json").read_text())
    rows = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    print("\nphase  status  steps  last generator_loss  last fake_loss")
    for p in manifest["phases"]:
        k = p["index"]
        last = [r for r in rows if f"phase{k}/generator_loss" in r][-1:]
        g = last[0][f"phase{k}/generator_loss"] if last else float("nan")
        f = last[0][f"phase{k}/fake_loss"] if last else float("nan")
        print(f"{k:>5}  {p['status']:<6}  {p['step']:>5}  {g:>19.4g}  {f:>14.4g}")
    print(f"\nrun directory: {out / 'run'} (manifest.json, metrics.jsonl, checkpoints/, wandb/)")
    return 0
