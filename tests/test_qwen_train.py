"""Qwen-Image end to end on CPU with tiny models: `pdmd train configs/tiny_qwen_image.yaml` runs both phases
(manifest and metrics contracts), `tools/convert_to_diffusers.py` writes a folder that
`QwenImagePipeline.from_pretrained` loads (with the copied tiny text encoder, tokenizer and VAE) and that
reproduces our sampler over the run's Megatron experts (--verify), routes each step to its phase's expert,
and steps through the distilled schedule. A one-phase run exports as a plain QwenImageTransformer2DModel."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pdmd.phases import tree_hash

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "configs" / "tiny_qwen_image.yaml"
pytestmark = pytest.mark.multirank


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "WANDB_MODE": "offline"}


def _run(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *argv], capture_output=True, text=True, env=_env(), timeout=600)


def tiny_qwen_vae(seed: int = 0):
    """A tiny AutoencoderKLQwenImage (z_dim 4, 8x spatial like Qwen-Image's)."""
    from diffusers import AutoencoderKLQwenImage

    torch.manual_seed(seed)
    return AutoencoderKLQwenImage(base_dim=8, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                                  latents_mean=[0.1, -0.2, 0.05, 0.0], latents_std=[1.5, 0.8, 1.0, 1.2]).eval()


def write_base_pipeline(out: Path) -> Path:
    """A whole tiny QwenImagePipeline folder (the teacher the run distils, and what the export copies)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImagePipeline, QwenImageTransformer2DModel

    from data.tiny_encoders import QWEN_DIM, tiny_parts
    from pdmd.tiny_models import write_tiny_qwen_image_teacher

    parts = write_tiny_qwen_image_teacher(out.parent / "teacher_parts", text_dim=QWEN_DIM)
    tokenizer, text_encoder = tiny_parts("qwen2.5-vl")
    scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9,
                                                shift_terminal=0.02)  # Qwen-Image's own kind of schedule
    QwenImagePipeline(scheduler=scheduler, vae=tiny_qwen_vae(), text_encoder=text_encoder, tokenizer=tokenizer,
                      transformer=QwenImageTransformer2DModel.from_pretrained(parts / "transformer")).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    """Teacher + shards, a two-phase run (the tiny recipe; a large student lr so that the experts move) and
    its export with --verify, and a one-phase run and its export."""
    from tests.tiny_encoders import build_dataset

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("qwen_e2e")
    base = write_base_pipeline(root / "base")
    shards, _ = build_dataset("qwen2.5-vl", root / "data")
    common = [f"model.teacher.path={base}", f"data.shards={shards}", "student.lr=0.01"]
    out = {"root": root, "base": base}
    for name, extra in {"run": [], "run1": ["plan.num_phases=1", "train.steps=2", "method.fake_ratio=1"]}.items():
        proc = _run("-m", "pdmd.cli", "train", str(RECIPE), "--run-dir", str(root / name), *common, *extra)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        out[f"export_{name}"] = _run(str(ROOT / "tools" / "convert_to_diffusers.py"), "--run", str(root / name),
                                     "--out", str(root / f"export_{name}"), "--verify")
    return out


def test_two_phase_qwen_run_completes_with_contracts(qwen):
    run_dir = qwen["root"] / "run"
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert [p["index"] for p in manifest["phases"]] == [1, 2]
    assert all(p["status"] == "done" for p in manifest["phases"])
    assert [p["student_expert"] for p in manifest["phases"]] == [0, 0]  # one teacher transformer
    assert manifest["config"]["model"]["kind"] == "qwen-image"
    for p in manifest["phases"]:
        assert tree_hash(run_dir / p["expert"]) == p["expert_hash"]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    keys = set().union(*rows)
    for k in (1, 2):
        assert {f"phase{k}/generator_loss", f"phase{k}/fake_loss", f"phase{k}/dmd_grad_norm",
                f"phase{k}/student_grad_norm", f"phase{k}/fake_grad_norm", f"phase{k}/samples_per_s",
                f"phase{k}/t_mean"} <= keys
        assert len([r for r in rows if f"phase{k}/generator_loss" in r]) == 4
    # phase 1 re-noises in (t_2, 1) = (0.75, 1): Qwen-Image's reverse nested interval
    assert min(r["phase1/t_min"] for r in rows if "phase1/t_min" in r) > 0.75


def _verify_error(proc: subprocess.CompletedProcess) -> float:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    found = re.search(r"QwenImagePipeline, latents .*: rel err ([0-9.e+-]+) .* PASS", proc.stdout)
    assert found, proc.stdout[-2000:]
    return float(found.group(1))


def test_export_reproduces_our_sampler(qwen):
    """--verify: Euler over the run's Megatron experts vs QwenImagePipeline on the export, same noise and a
    prompt with padding (its mask travels with the text through our sampler)."""
    assert _verify_error(qwen["export_run"]) <= 1e-5
    assert _verify_error(qwen["export_run1"]) <= 1e-5


def _latents(pipe, x: torch.Tensor, embeds: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    from pdmd.model_io import pack_latents

    return pipe(prompt_embeds=embeds, prompt_embeds_mask=mask, latents=pack_latents(x), num_inference_steps=4,
                height=64, width=64, true_cfg_scale=1.0, output_type="latent", return_dict=False)[0]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def test_export_loads_in_qwen_image_pipeline_and_routes_phases(qwen):
    from diffusers import QwenImagePipeline, QwenImageTransformer2DModel

    from pdmd.export_qwen import verify_prompt

    export = qwen["root"] / "export_run"
    assert (export / "transformer" / "pdmd_qwen_phased.py").is_file()
    pipe = QwenImagePipeline.from_pretrained(export, trust_remote_code=True)  # every component present
    pipe.set_progress_bar_config(disable=True)
    assert {"text_encoder", "tokenizer", "vae"} <= set(json.loads((export / "pdmd_export.json").read_text())["components"])
    experts = pipe.transformer.experts
    assert len(experts) == 2 and pipe.transformer.config.phase_boundaries == [pytest.approx(0.825)]
    calls: list[int] = []
    for i, expert in enumerate(experts):
        expert.register_forward_hook(lambda *_, i=i: calls.append(i + 1))
    x = torch.randn(1, 4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    embeds, mask = verify_prompt(32, 1)
    out = _latents(pipe, x, embeds, mask)
    assert calls == [1, 1, 2, 2]  # each phase's expert for its two steps
    assert [round(float(s), 6) for s in pipe.scheduler.sigmas] == [1.0, 0.9, 0.75, 0.5, 0.0]
    # routing and training matter: swapped experts, or the teacher in both slots, give other latents
    experts[0], experts[1] = experts[1], experts[0]
    assert _rel(_latents(pipe, x, embeds, mask), out) > 1e-3
    teacher = QwenImageTransformer2DModel.from_pretrained(qwen["base"] / "transformer")
    experts[0], experts[1] = teacher, teacher
    assert _rel(_latents(pipe, x, embeds, mask), out) > 1e-3
    # the copied text encoder and VAE: a prompt all the way to pixels
    image = pipe(prompt="a cat on a sofa", num_inference_steps=4, height=64, width=64, true_cfg_scale=1.0,
                 generator=torch.Generator().manual_seed(0), output_type="np").images
    assert image.shape == (1, 64, 64, 3) and float(image.std()) > 0


def test_one_phase_export_is_a_plain_qwen_image_pipeline(qwen):
    from diffusers import QwenImagePipeline, QwenImageTransformer2DModel

    export = qwen["root"] / "export_run1"
    index = json.loads((export / "model_index.json").read_text())
    assert index["transformer"] == ["diffusers", "QwenImageTransformer2DModel"]
    assert not list((export / "transformer").glob("*.py"))
    pipe = QwenImagePipeline.from_pretrained(export, text_encoder=None, tokenizer=None, vae=None)  # no remote code
    assert type(pipe.transformer) is QwenImageTransformer2DModel


def test_unsupported_qwen_exports_say_why(qwen):
    run_dir = str(qwen["root"] / "run")
    proc = _run(str(ROOT / "tools" / "convert_to_diffusers.py"), "--run", run_dir, "--out",
                str(qwen["root"] / "export_lora"), "--lora-only")
    assert proc.returncode == 2 and "merged QwenImagePipeline" in proc.stderr
