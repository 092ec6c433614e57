"""Image-conditioned distillation on CPU: tiny I2V-A14B-like and TI2V-5B-like teachers distilled from
shards with images (two resolution buckets for I2V), the conditioning carried by every role; for TI2V
the first latent frame stays exactly the image latent through rollouts and re-noising."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT, read_manifest, read_metrics, subprocess_env
from tests.multirank import run_ranks

pytestmark = pytest.mark.multirank


@pytest.fixture(scope="module")
def data(tiny_image_runs):
    """kind -> (overrides naming the run's teacher pipeline and image shards, the finished run): conftest's
    tiny I2V and TI2V runs (configs/tiny_wan22_{kind}.yaml, 4 steps a phase; I2V with previews)."""
    return {kind: ([f"model.teacher.path={root / 'base'}", f"data.shards={root / 'shards'}"], root / "run")
            for kind, (root, _) in tiny_image_runs.items()}


def _train(run_dir: Path, recipe: str, overrides: list[str]) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "pdmd.cli", "train", str(ROOT / "configs" / recipe), "--run-dir", str(run_dir),
           *overrides]
    return subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(), timeout=600)


@pytest.mark.parametrize("kind", ["i2v", "ti2v"])
def test_tiny_image_conditioned_two_phase_run_completes(data, kind):
    _, run_dir = data[kind]
    manifest = read_manifest(run_dir)
    assert [p["status"] for p in manifest["phases"]] == ["done", "done"]
    assert [p["student_expert"] for p in manifest["phases"]] == ([0, 1] if kind == "i2v" else [0, 0])
    rows = read_metrics(run_dir)
    for k in (1, 2):
        losses = [r[f"phase{k}/generator_loss"] for r in rows if f"phase{k}/generator_loss" in r]
        assert len(losses) == 4 and all(v is not None for v in losses)
    if kind == "i2v":  # previews run the conditioned roles too (first batch's images), decoded by the VAE
        assert sorted(p.name for p in (run_dir / "samples").iterdir()) == [
            f"phase{k}_step4_{i}.gif" for k in (1, 2) for i in (0, 1)]


def test_text_to_video_shards_with_an_i2v_teacher_are_refused(data, tmp_path):
    teacher = data["i2v"][0][0]
    proc = _train(tmp_path / "run", "tiny_wan22_i2v.yaml", [teacher, "data.conditioning=none", data["ti2v"][0][1]])
    assert proc.returncode == 2
    assert "image-to-video" in proc.stderr and "data.conditioning=i2v" in proc.stderr


def _ti2v_frames(rank, world_size, overrides):
    from data.loader import PromptDataConfig, PromptLoader
    from megatron_adapters.backend import MegatronBackend
    from pdmd.core.conditioning import Conditioning
    from pdmd.core.config import load_config
    from pdmd.core.method import PhaseTrainer, make_generator

    cfg = load_config(ROOT / "configs" / "tiny_wan22_ti2v.yaml", overrides)
    backend = MegatronBackend(cfg)
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
    (out,) = run_ranks(_ti2v_frames, 1, data["ti2v"][0])
    assert out["rollout"] and out["renoised"] and out["rest_moves"]
    for row, t in zip(out["per_token"], out["t"]):  # 2 latent frames x 2x2 tokens: frame 0 at t = 0
        assert row[:4] == [0.0] * 4 and row[4:] == pytest.approx([t] * 4)
