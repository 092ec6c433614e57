"""`pdmd sample`: the sampler is the trainer's rollout run to t = 0 (phase k's expert on phase k's steps, CFG as
WanPipeline does it), draws noise and pads prompts exactly as WanPipeline, writes the file contract, decodes
like the pipeline, samples an export the same as its run, and rejects bad inputs with clear messages."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from pdmd.core.sampler import euler_sample
from pdmd.core.schedule import PhasePlan
from pdmd.core.tensors import rel_err
from pdmd.export.pipelines import initial_noise, pad_embeds
from pdmd.sample import noise_shape
from tests.tiny_run import PROMPTS

WAN = PhasePlan.from_steps(4, 5.0, [2, 2])


def test_euler_over_the_distilled_timesteps_with_phase_experts():
    calls = []
    speed = {1: 2.0, 2: -1.0}

    def velocity(k, x, t, text):
        calls.append((k, float(t[0])))
        return torch.full_like(x, speed[k]) * text.mean()

    x0, text = torch.zeros(2, 1, 1, 1, 1), torch.ones(2, 3, 4)
    out = euler_sample(velocity, WAN, x0, text)
    assert [k for k, _ in calls] == [1, 1, 2, 2]
    assert [t for _, t in calls] == pytest.approx(list(WAN.timesteps), abs=1e-7)
    t = [*WAN.timesteps, 0.0]
    want = sum((t[i + 1] - t[i]) * speed[WAN.phase_of_step(i)] for i in range(4))
    assert torch.allclose(out, torch.full_like(x0, want))
    # CFG: v = v_neg + g (v_cond - v_neg), only for g > 1 as in WanPipeline
    neg = torch.zeros_like(text)
    cfg = euler_sample(velocity, WAN, x0, text, neg, guidance=3.0)
    assert torch.allclose(cfg, 3.0 * out)
    assert torch.equal(euler_sample(velocity, WAN, x0, text, neg, guidance=0.5), out)
    with pytest.raises(ValueError, match="negative"):
        euler_sample(velocity, WAN, x0, text, None, guidance=2.0)


def test_noise_and_prompt_padding_match_wan_pipeline():
    from diffusers import WanPipeline

    from data.encoders import UMT5PromptEncoder
    from data.tiny_encoders import tiny_parts

    tokenizer, text_encoder = tiny_parts("umt5")
    pipe = WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=None, scheduler=None)
    args = argparse.Namespace(height=64, width=96, num_frames=9)
    shape = noise_shape(args, 2, 4, [], (4, 8))
    want = pipe.prepare_latents(2, 4, 64, 96, 9, torch.float32, torch.device("cpu"), torch.Generator().manual_seed(7))
    assert shape == tuple(want.shape) and torch.equal(initial_noise(shape, 7), want)
    with torch.no_grad():
        embeds, _ = pipe.encode_prompt(PROMPTS, do_classifier_free_guidance=False, max_sequence_length=512)
    ours = pad_embeds(UMT5PromptEncoder(tokenizer, text_encoder, 512).encode(PROMPTS), 512)
    assert torch.allclose(ours, embeds.float(), atol=1e-5, rtol=0)  # the same tokens, mask and padding


def test_output_file_and_decoded_media(tiny_wan_run):
    from diffusers import WanPipeline
    from PIL import Image

    from pdmd.export.pipelines import decode

    root, results = tiny_wan_run
    assert results["sample_prompts"]["code"] == 0, results["sample_prompts"]["stderr"]
    path = root / "s_prompts.safetensors"
    with safe_open(str(path), "pt") as f:
        assert list(f.keys()) == ["latents"]
        meta = f.metadata()
        latents = f.get_tensor("latents")
    assert latents.dtype == torch.float32 and list(latents.shape) == [2, 4, 2, 8, 8]
    assert json.loads(meta["timesteps"]) == pytest.approx(list(WAN.timesteps)) and meta["seed"] == "3"
    assert meta["run"].endswith("run")
    for i in range(2):  # 2 latent frames -> 5 video frames of 64 x 64, as a GIF
        gif = Image.open(root / f"s_prompts_{i}.gif")
        assert gif.size == (64, 64) and gif.n_frames == 5
    # decoding equals the pipeline's own VAE path (output_type="np")
    pipe = WanPipeline.from_pretrained(root / "base")
    pipe.scheduler = None
    frames = decode(latents, root / "base" / "vae")
    vae = pipe.vae
    z = vae.config.z_dim
    mean = torch.tensor(vae.config.latents_mean).view(1, z, 1, 1, 1)
    std = 1.0 / torch.tensor(vae.config.latents_std).view(1, z, 1, 1, 1)
    with torch.no_grad():
        video = vae.decode(latents / std + mean, return_dict=False)[0]
    want = pipe.video_processor.postprocess_video(video, output_type="np")
    assert frames.shape == (2, 5, 64, 64, 3) and abs(frames - want).max() < 1e-6


def _sample(argv: list[str], capsys) -> tuple[int, str]:
    from pdmd.cli import main

    code = main(["sample", *argv])
    return code, capsys.readouterr().err


def test_sampling_an_export_equals_sampling_its_run(tiny_wan_run, tmp_path, capsys):
    root, results = tiny_wan_run
    for export, run_out in (("export_full", "s_embeds"), ("export3", "s3")):
        out = tmp_path / f"{export}.safetensors"
        code, err = _sample(["--export", str(root / export), "--embeds", str(root / "embeds.safetensors"),
                             "--latents", str(root / "latents.safetensors"), "--out", str(out)], capsys)
        assert code == 0, err
        assert rel_err(load_file(str(out))["latents"], load_file(str(root / f"{run_out}.safetensors"))["latents"]) < 1e-5


def test_bad_inputs_are_clear_errors(tiny_wan_run, tmp_path, capsys):
    root, _ = tiny_wan_run
    export, out = str(root / "export_full"), str(tmp_path / "x.safetensors")
    code, err = _sample(["--export", export, "--out", out], capsys)
    assert code == 2 and "nothing to sample" in err
    code, err = _sample(["--export", str(root / "export_lora"), "--prompt", "a", "--out", out], capsys)
    assert code == 2 and "LoRA files only" in err
    save_file({"embeds": torch.zeros(1, 2, 24)}, str(tmp_path / "bad.safetensors"))
    code, err = _sample(["--export", export, "--embeds", str(tmp_path / "bad.safetensors"), "--out", out], capsys)
    assert code == 2 and "prompt_embeds" in err
    code, err = _sample(["--export", export, "--embeds", str(root / "embeds.safetensors"), "--guidance-scale", "2",
                         "--latents", str(tmp_path / "nope.safetensors"), "--out", out], capsys)
    assert code == 2 and "no such file" in err
    save_file({"latents": torch.zeros(3, 4, 2, 8, 8)}, str(tmp_path / "lat3.safetensors"))
    code, err = _sample(["--export", export, "--embeds", str(root / "embeds.safetensors"),
                         "--latents", str(tmp_path / "lat3.safetensors"), "--out", out], capsys)
    assert code == 2 and "one per prompt" in err
    code, err = _sample(["--export", export, "--embeds", str(root / "embeds.safetensors"), "--height", "64",
                         "--out", out], capsys)
    assert code == 2 and "--num-frames" in err
    code, err = _sample(["--export", str(tmp_path), "--prompt", "a", "--out", out], capsys)
    assert code == 2 and "pdmd_export.json" in err


def test_sizes_and_embeddings_that_cannot_work_are_refused(tiny_wan_run):
    """Refused in one line with exit 2 before any model loads: a height the VAE cannot make (no silent floor),
    a file that is not safetensors, prompt embeddings of another text encoder's width."""
    _, results = tiny_wan_run
    for name, words in [("sample_height_17", "--height 17 must be a positive multiple of 8"),
                        ("sample_garbage_embeds", "not a readable safetensors file"),
                        ("sample_narrow_embeds", "wide but the model takes text_dim")]:
        r = results[name]
        assert r["code"] == 2 and words in r["stderr"] and "Traceback" not in r["stderr"], (name, r["stderr"])
