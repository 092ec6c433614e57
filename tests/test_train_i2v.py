"""Image-conditioned distillation on CPU: tiny I2V-A14B-like and TI2V-5B-like teachers distilled from
shards with images (two resolution buckets for I2V), the conditioning carried by every role; for TI2V
the first latent frame stays exactly the image latent through rollouts and re-noising."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.multirank import run_ranks

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.multirank
KINDS = {"i2v": dict(in_channels=12, boundary=0.9, pipeline="WanImageToVideoPipeline"),
         "ti2v": dict(experts=1, pipeline="WanImageToVideoPipeline", expand_timesteps=True)}
BUCKETS = {"i2v": "32x32,32x64", "ti2v": "64x64"}  # 8x VAE -> 4x4 and 4x8 latents; 16x VAE -> 4x4


def _vae(kind: str):
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    if kind == "i2v":
        return AutoencoderKLWan(base_dim=8, z_dim=4, latents_mean=[0.1, -0.2, 0.05, 0.0],
                                latents_std=[1.5, 0.8, 1.0, 1.2]).eval()
    return AutoencoderKLWan(base_dim=8, decoder_base_dim=8, z_dim=4, is_residual=True, in_channels=12, out_channels=12,
                            patch_size=2, scale_factor_spatial=16, latents_mean=[0.1, -0.2, 0.05, 0.0],
                            latents_std=[1.5, 0.8, 1.0, 1.2]).eval()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from PIL import Image

    from data.tiny_encoders import UMT5_DIM, save_tiny_encoder
    from pdmd.tiny_models import write_tiny_wan22_teacher
    from tools.make_prompt_shards import main

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("i2v")
    rng = np.random.default_rng(0)
    (root / "images").mkdir()
    rows = []
    for i, (w, h) in enumerate([(40, 40), (64, 32), (50, 52), (70, 34), (64, 64), (36, 36)]):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / "images" / f"{i}.png")
        rows.append({"prompt": f"a moving picture number {i}", "image": f"{i}.png"})
    rows.append({"prompt": "an image that is not there", "image": "missing.png"})
    (root / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    save_tiny_encoder("umt5", root / "enc")
    out = {}
    for kind in KINDS:
        _vae(kind).save_pretrained(root / f"vae-{kind}")
        args = ["--out", str(root / f"shards-{kind}"), "--encoder", "umt5", "--encoder-path", str(root / "enc"),
                "--max-length", "32", "--dtype", "fp32", "--samples-per-shard", "2", "--no-progress",
                "--conditioning", kind, "--buckets", BUCKETS[kind], "--num-frames", "5", "--device", "cpu",
                "--vae", str(root / f"vae-{kind}"), "--prompts", str(root / "pairs.jsonl"), "--images",
                str(root / "images")]
        assert main(args) == 0
        teacher = write_tiny_wan22_teacher(root / f"teacher-{kind}", text_dim=UMT5_DIM, **KINDS[kind])
        out[kind] = [f"model.teacher.path={teacher}", f"data.shards={root / f'shards-{kind}'}"]
    return root, out


def _train(run_dir: Path, recipe: str, overrides: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "WANDB_MODE": "offline"}
    cmd = [sys.executable, "-m", "pdmd.cli", "train", str(ROOT / "configs" / recipe), "--run-dir", str(run_dir),
           *overrides]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)


@pytest.mark.parametrize("kind", ["i2v", "ti2v"])
def test_tiny_image_conditioned_two_phase_run_completes(data, kind):
    root, overrides = data
    run_dir = root / f"run-{kind}"
    previews = ["logging.sample_every=4", f"logging.vae={root / 'vae-i2v'}"] if kind == "i2v" else []
    proc = _train(run_dir, f"tiny_wan22_{kind}.yaml", [*overrides[kind], *previews])
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert [p["status"] for p in manifest["phases"]] == ["done", "done"]
    assert [p["student_expert"] for p in manifest["phases"]] == ([0, 1] if kind == "i2v" else [0, 0])
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for k in (1, 2):
        losses = [r[f"phase{k}/generator_loss"] for r in rows if f"phase{k}/generator_loss" in r]
        assert len(losses) == 4 and all(v is not None for v in losses)
    if kind == "i2v":  # previews run the conditioned roles too (first batch's images), decoded by the VAE
        assert sorted(p.name for p in (run_dir / "samples").iterdir()) == [
            f"phase{k}_step4_{i}.gif" for k in (1, 2) for i in (0, 1)]


def test_text_to_video_shards_with_an_i2v_teacher_are_refused(data, tmp_path):
    _, overrides = data
    teacher = overrides["i2v"][0]
    proc = _train(tmp_path / "run", "tiny_wan22_i2v.yaml", [teacher, "data.conditioning=none",
                                                            overrides["ti2v"][1]])
    assert proc.returncode == 2
    assert "image-to-video" in proc.stderr and "data.conditioning=i2v" in proc.stderr


def _ti2v_frames(rank, world_size, overrides):
    from data.loader import PromptDataConfig, PromptLoader
    from megatron_adapters.backend import MegatronWanBackend
    from pdmd.conditioning import Conditioning
    from pdmd.config import load_config
    from pdmd.method import PhaseTrainer, make_generator

    cfg = load_config(ROOT / "configs" / "tiny_wan22_ti2v.yaml", overrides)
    backend = MegatronWanBackend(cfg)
    plan = cfg.phase_plan()
    backend.setup_phase(1, 0, {}, plan.renoise_interval(1))
    loader = PromptLoader(PromptDataConfig.from_dict({**cfg.data, "batch_size": 2}), dp_rank=0, dp_size=1)
    batch = next(iter(loader.forever()))
    cond = Conditioning.from_batch(batch)
    trainer = PhaseTrainer(backend, plan, 1, cfg.method, cfg.train.latent_shape, cfg.seed)
    gen = make_generator(0, 1, 0, "generator", 0)
    r = trainer.rollout(batch["text_embeds"], gen, cond)
    eps, t, x_t = trainer._renoise(r.x_gen, gen, cond)
    first = batch["first_frame_latents"].float()
    return {"rollout": torch.equal(r.x_gen[:, :, :1], first), "renoised": torch.equal(x_t[:, :, :1], first),
            "rest_moves": not torch.equal(x_t[:, :, 1:], r.x_gen[:, :, 1:]),
            "per_token": cond.timesteps(t, (1, 2, 2)).tolist(), "t": t.tolist()}


def test_ti2v_first_frame_stays_the_image_latent(data):
    _, overrides = data
    (out,) = run_ranks(_ti2v_frames, 1, overrides["ti2v"])
    assert out["rollout"] and out["renoised"] and out["rest_moves"]
    for row, t in zip(out["per_token"], out["t"]):  # 2 latent frames x 2x2 tokens: frame 0 at t = 0
        assert row[:4] == [0.0] * 4 and row[4:] == pytest.approx([t] * 4)
