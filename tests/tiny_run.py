"""A finished tiny two-phase run and everything exported and sampled from it, built once per test session.

``python -m tests.tiny_run ROOT`` (one process: Megatron is imported once) writes under ROOT:
``base/`` (a whole tiny WanPipeline: two random experts, tiny UMT5 + tokenizer, tiny AutoencoderKLWan
z_dim 4, a UniPC scheduler as the real repos have), ``run/`` (pdmd train, 2 phases, LoRA student with a
large learning rate so the adapters matter), the exports and `pdmd sample` outputs named in CASES, and
``results.json`` (exit code and output of every command). Tests get it through :func:`tiny_run`.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["a cat on a sofa", "a red car in the rain"]
PHASE3 = ["plan.num_steps=3", "plan.num_phases=3", "plan.renoise_clamp=[[0.875,1.0],null,null]"]


def cases(root: Path) -> dict[str, list[str]]:
    """name -> argv of `convert` (tools/convert_to_diffusers.py) or `sample` (pdmd sample)."""
    r, b = str(root / "run"), str(root / "base")
    emb, lat = str(root / "embeds.safetensors"), str(root / "latents.safetensors")
    return {
        "export_full": ["convert", "--run", r, "--out", str(root / "export_full"), "--verify"],
        "export_lora": ["convert", "--run", r, "--out", str(root / "export_lora"), "--lora-only", "--verify"],
        "export_wrong_teacher": ["convert", "--run", r, "--out", str(root / "export_bad"), "--teacher", str(root / "wrong")],
        "sample_embeds": ["sample", "--run", r, "--embeds", emb, "--latents", lat, "--out", str(root / "s_embeds.safetensors")],
        "sample_prompts": ["sample", "--run", r, *sum((["--prompt", p] for p in PROMPTS), []), "--seed", "3",
                           "--vae", b, "--out", str(root / "s_prompts.safetensors")],
        "sample_cfg": ["sample", "--run", r, "--embeds", emb, "--latents", lat, "--guidance-scale", "3",
                       "--out", str(root / "s_cfg.safetensors")],
        "export3": ["convert", "--run", str(root / "run3"), "--out", str(root / "export3"), "--verify"],
        "sample3": ["sample", "--run", str(root / "run3"), "--embeds", emb, "--latents", lat,
                    "--out", str(root / "s3.safetensors")],
    }


def tiny_vae(seed: int = 0):
    from diffusers import AutoencoderKLWan

    torch.manual_seed(seed)
    return AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1, attn_scales=[],
                            temperal_downsample=[False, True, True], latents_mean=[0.1, -0.2, 0.05, 0.0],
                            latents_std=[1.5, 0.8, 1.0, 1.2]).eval()


def write_base_pipeline(out: Path) -> Path:
    """A complete tiny Wan2.2 pipeline folder (the teacher the run distils, and the export's base)."""
    from diffusers import UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel

    from data.tiny_encoders import UMT5_DIM, tiny_parts
    from pdmd.tiny_models import write_tiny_wan22_teacher

    teacher = write_tiny_wan22_teacher(out.parent / "teacher_parts", text_dim=UMT5_DIM)
    tokenizer, text_encoder = tiny_parts("umt5")
    pipe = WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=tiny_vae(),
                       scheduler=UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                                         flow_shift=12.0),
                       transformer=WanTransformer3DModel.from_pretrained(teacher / "transformer"),
                       transformer_2=WanTransformer3DModel.from_pretrained(teacher / "transformer_2"),
                       boundary_ratio=0.875)
    pipe.save_pretrained(out)
    return out


def _train(root: Path, name: str, extra: list[str]) -> None:
    from data.encoders import load_prompt_encoder
    from data.prompts import PromptList, demo_prompts_path, read_prompts
    from data.writer import write_prompt_shards
    from pdmd.config import load_config
    from pdmd.demo import DEMO_RECIPE
    from pdmd.train import train

    shards = root / "shards"
    if not (shards / "index.json").is_file():
        enc = load_prompt_encoder("umt5", root / "base", dtype="fp32", max_length=32)
        prompts = read_prompts(demo_prompts_path())
        prompts = PromptList(prompts.prompts[:8], prompts.lines[:8])
        write_prompt_shards(prompts, shards, enc, samples_per_shard=8, progress=False)
    cfg = load_config(DEMO_RECIPE, [f"model.teacher.path={root / 'base'}", f"data.shards={shards}", "train.steps=1",
                                    "train.checkpoint_every=1", "method.fake_ratio=1", "student.lr=0.01",
                                    "wandb.mode=disabled", *extra])
    if train(cfg, str(root / name)) != 0:
        raise RuntimeError(f"training {name} failed")


def _call(kind: str, argv: list[str]) -> dict:
    out, err = io.StringIO(), io.StringIO()
    tic = time.perf_counter()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            if kind == "convert":
                from pdmd.export import main

                code = main(argv)
            else:
                from pdmd.cli import main

                code = main(["sample", *argv])
        except BaseException as exc:  # noqa: BLE001 - recorded for the test to show
            import traceback

            code, err = 99, io.StringIO(err.getvalue() + traceback.format_exc() + repr(exc))
    return {"code": code, "stdout": out.getvalue(), "stderr": err.getvalue()[-4000:],
            "seconds": round(time.perf_counter() - tic, 2)}


def build(root: Path) -> None:
    from data.tiny_encoders import UMT5_DIM
    from pdmd.tiny_models import write_tiny_wan22_teacher

    torch.set_num_threads(1)
    root.mkdir(parents=True, exist_ok=True)
    write_base_pipeline(root / "base")
    write_tiny_wan22_teacher(root / "wrong", text_dim=UMT5_DIM, ffn_dim=40)  # same names, other shapes
    g = torch.Generator().manual_seed(1)
    from safetensors.torch import save_file

    save_file({"prompt_embeds": torch.randn(2, 16, UMT5_DIM, generator=g),
               "negative_prompt_embeds": torch.randn(2, 16, UMT5_DIM, generator=g)}, str(root / "embeds.safetensors"))
    save_file({"latents": torch.randn(2, 4, 2, 8, 8, generator=g)}, str(root / "latents.safetensors"))
    timings = {}
    tic = time.perf_counter()
    _train(root, "run", [])
    timings["train"] = round(time.perf_counter() - tic, 2)
    tic = time.perf_counter()
    _train(root, "run3", PHASE3)
    timings["train3"] = round(time.perf_counter() - tic, 2)
    results = {name: _call(argv[0], argv[1:]) for name, argv in cases(root).items()}
    results["_timings"] = timings
    (root / "results.json").write_text(json.dumps(results, indent=2))


def tiny_run(tmp_path_factory) -> tuple[Path, dict]:
    """The built tiny run (built on first use in this pytest session, in a subprocess)."""
    from tests.multirank import free_port

    root = tmp_path_factory.getbasetemp() / "pdmd_tiny_export"
    if not (root / "results.json").is_file():
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "WANDB_MODE": "disabled",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
        for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS"):
            env.pop(key, None)
        proc = subprocess.run([sys.executable, "-m", "tests.tiny_run", str(root)], capture_output=True, text=True,
                              env=env, timeout=600, cwd=ROOT)
        if proc.returncode != 0:
            raise RuntimeError(f"building the tiny run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return root, json.loads((root / "results.json").read_text())


if __name__ == "__main__":
    build(Path(sys.argv[1]))
