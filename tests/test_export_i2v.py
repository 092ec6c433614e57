"""Export and sampling of image-conditioned runs (Wan2.2 I2V-A14B: channels cat; TI2V-5B: the first frame is
the image latent at t = 0): our sampler with a Conditioning equals WanImageToVideoPipeline's own denoising loop
(same scheduler timesteps, noise, embeddings and image), an exported folder loads in WanImageToVideoPipeline
and reproduces `pdmd sample --export --image/--cond`, TI2V's first frame stays exactly the image latent, and
mistakes are clear errors. Hand-made experts (tiny teacher folders) until the trainer runs conditioned."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from pdmd.bench.tiny_models import write_image_pipeline, write_test_image
from pdmd.core.sampler import euler_sample
from pdmd.core.schedule import PhasePlan
from pdmd.core.tensors import rel_err
from pdmd.export.layout import (
    ExportError,
    PhaseInfo,
    RunInfo,
    check_conditioning,
    check_scheduler,
    choose_boundary_ratio,
    flow_match_scheduler_config,
    phase_folders,
)
from pdmd.export.pipelines import DiffusersExperts, ExportedExperts
from pdmd.sample import encode_image
from tests.tiny_run import IMAGE_RUN_PIXELS

PLANS = {"i2v": PhasePlan.from_steps(4, 5.0, [2, 2]), "ti2v": PhasePlan.from_steps(4, 5.0, [4])}
SHAPES = {"i2v": (2, 4, 2, 8, 8), "ti2v": (2, 4, 2, 4, 4)}  # 64 x 64 pixels, 5 frames (8x and 16x VAEs)
HEIGHT = WIDTH = 64
NUM_FRAMES = 5


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    """Tiny I2V / TI2V teacher pipelines, two images, noise and prompt embeddings (files, as the CLI takes)."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("i2v")
    g = torch.Generator().manual_seed(5)
    out = {"root": root, "image": write_test_image(root / "image.png"),
           "other": write_test_image(root / "other.png", seed=1)}
    save_file({"prompt_embeds": torch.randn(2, 16, 24, generator=g),
               "negative_prompt_embeds": torch.randn(2, 16, 24, generator=g)}, str(root / "embeds.safetensors"))
    for kind in ("i2v", "ti2v"):
        out[kind] = write_image_pipeline(root / f"teacher_{kind}", kind)
        save_file({"latents": torch.randn(*SHAPES[kind], generator=g)}, str(root / f"latents_{kind}.safetensors"))
    return out


def _user_image(path: Path, height: int = HEIGHT, width: int = WIDTH):
    """What a user hands the pipeline: diffusers' load_image, crop-resized to the size (docs/data.md section 6)."""
    from diffusers.utils import load_image
    from diffusers.video_processor import VideoProcessor

    return VideoProcessor(vae_scale_factor=8).resize(load_image(str(path)), height, width, resize_mode="crop")


def _pipe(folder: Path, plan: PhasePlan | None = None, **kwargs):
    """WanImageToVideoPipeline.from_pretrained; with ``plan``, the fitted scheduler and a boundary that routes
    each step to its phase (as the export writes them)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanImageToVideoPipeline

    if plan is not None:
        config = flow_match_scheduler_config(plan.timesteps)
        kwargs["scheduler"] = FlowMatchEulerDiscreteScheduler.from_config(config)
        if plan.num_phases == 2:
            kwargs["boundary_ratio"] = choose_boundary_ratio(plan, check_scheduler(config, plan.timesteps), 0.9)
    return WanImageToVideoPipeline.from_pretrained(folder, text_encoder=None, tokenizer=None, **kwargs)


def _call(pipe, image_path: Path, embeds: dict, latents: torch.Tensor, guidance: float = 1.0) -> torch.Tensor:
    extra = {"negative_prompt_embeds": embeds["negative_prompt_embeds"]} if guidance > 1 else {}
    return pipe(image=_user_image(image_path), prompt_embeds=embeds["prompt_embeds"], latents=latents,
                num_inference_steps=4, guidance_scale=guidance, height=HEIGHT, width=WIDTH, num_frames=NUM_FRAMES,
                output_type="latent", return_dict=False, **extra)[0].float()


def _teacher_experts(folder: Path, kind: str) -> DiffusersExperts:
    subs = {1: "transformer", 2: "transformer_2"} if kind == "i2v" else {1: "transformer"}
    return DiffusersExperts.from_folders({k: folder / s for k, s in subs.items()}, PLANS[kind], conditioning=kind)


def _inputs(parts, kind: str) -> tuple[dict, torch.Tensor]:
    return load_file(str(parts["root"] / "embeds.safetensors")), \
        load_file(str(parts["root"] / f"latents_{kind}.safetensors"))["latents"]


# --- the sampler against WanImageToVideoPipeline's own loop ----------------------------------------------
@pytest.mark.parametrize("kind", ["i2v", "ti2v"])
def test_sampler_with_conditioning_equals_the_pipelines_loop(parts, kind):
    """Same noise, embeddings and image; the pipeline's scheduler gives our timesteps: the same latents."""
    embeds, x = _inputs(parts, kind)
    cond = encode_image(parts["image"], parts[kind] / "vae", kind, HEIGHT, WIDTH, NUM_FRAMES)
    experts, pipe = _teacher_experts(parts[kind], kind), _pipe(parts[kind], PLANS[kind])
    for guidance in (1.0, 3.0):
        ours = euler_sample(experts.velocity, PLANS[kind], x, embeds["prompt_embeds"],
                            embeds["negative_prompt_embeds"], guidance, cond=cond)
        theirs = _call(pipe, parts["image"], embeds, x, guidance)
        assert rel_err(ours, theirs) < 1e-5, (kind, guidance)
    # the image matters: another one gives other latents
    other = encode_image(parts["other"], parts[kind] / "vae", kind, HEIGHT, WIDTH, NUM_FRAMES)
    moved = euler_sample(experts.velocity, PLANS[kind], x, embeds["prompt_embeds"], cond=other)
    assert rel_err(moved, euler_sample(experts.velocity, PLANS[kind], x, embeds["prompt_embeds"], cond=cond)) > 1e-3


def test_ti2v_first_frame_stays_the_image_latent(parts):
    """Every pass sees x whose first latent frame is exactly the image latent, with timestep 0 on its tokens;
    the result's first frame is exactly it too (torch.equal), while the other frames move."""
    embeds, x = _inputs(parts, "ti2v")
    cond = encode_image(parts["image"], parts["ti2v"] / "vae", "ti2v", HEIGHT, WIDTH, NUM_FRAMES).expand(2)
    experts = _teacher_experts(parts["ti2v"], "ti2v")
    seen = []

    def velocity(k, xk, t, text, c):
        seen.append((xk.clone(), c.timesteps(t, (1, 2, 2))))
        return experts.velocity(k, xk, t, text, c)

    out = euler_sample(velocity, PLANS["ti2v"], x, embeds["prompt_embeds"], cond=cond)
    assert len(seen) == 4
    for xk, ts in seen:
        assert torch.equal(xk[:, :, :1], cond.latents)
        assert ts.shape == (2, 2 * 2 * 2) and torch.equal(ts[:, :4], torch.zeros(2, 4)) and bool((ts[:, 4:] > 0).all())
    assert torch.equal(out[:, :, :1], cond.latents)
    assert not torch.equal(out[:, :, 1:], x[:, :, 1:])


def test_i2v_model_reads_noise_mask_and_image_latents(parts):
    """The I2V transformer's input is cat([x, mask, image latents]): 4 + 4 + 4 = 12 channels, scalar timesteps."""
    from diffusers import WanTransformer3DModel

    embeds, x = _inputs(parts, "i2v")
    cond = encode_image(parts["image"], parts["i2v"], "i2v", HEIGHT, WIDTH, NUM_FRAMES).expand(2)
    model = WanTransformer3DModel.from_pretrained(parts["i2v"] / "transformer").eval()
    seen = []
    model.register_forward_pre_hook(lambda m, a, kw: seen.append(a), with_kwargs=True)
    DiffusersExperts({1: model, 2: model}, PLANS["i2v"]).velocity(1, x, torch.full((2,), 0.5), embeds["prompt_embeds"],
                                                                 cond)
    hidden, t = seen[0][0], seen[0][1]
    assert hidden.shape == (2, 12, 2, 8, 8) and torch.equal(hidden[:, :4], x) and torch.equal(hidden[:, 4:], cond.latents)
    assert torch.equal(hidden[:, 4:8, 0], torch.ones(2, 4, 8, 8)) and not hidden[:, 4:8, 1:].any()
    assert t.tolist() == [500.0, 500.0]


# --- an exported folder --------------------------------------------------------------------------------
def _hand_run(teacher: Path, kind: str, path: Path) -> RunInfo:
    """A RunInfo as read_run returns it for a finished conditioned run whose students are the teacher's experts."""
    plan = PLANS[kind]
    subs = ("transformer", "transformer_2") if kind == "i2v" else ("transformer",)
    config = {"data": {"conditioning": kind}, "model": {"dtype": "fp32", "teacher": {
        "path": str(teacher), "subfolders": list(subs), "boundary": 0.9 if kind == "i2v" else None}}}
    phases = tuple(PhaseInfo(k, min(k - 1, len(subs) - 1), path, None, 1) for k in range(1, plan.num_phases + 1))
    return RunInfo(path, config, plan, phases, teacher, subs)


def _hand_export(parts, kind: str, out: Path) -> RunInfo:
    """The export's own writers (pdmd/export/convert.py) over the hand-made run."""
    from pdmd.export.convert import write_pipeline_files
    from pdmd.export.files import check_against_teacher, write_transformer

    run = _hand_run(parts[kind], kind, out.parent / f"run_{kind}")
    folders = phase_folders(run.plan.num_phases)
    for p in run.phases:
        src = run.expert_folder(p.student_expert)
        state = load_file(str(src / "diffusion_pytorch_model.safetensors"))
        check_conditioning(run.conditioning, json.loads((src / "config.json").read_text()), f"phase {p.index}")
        check_against_teacher(state, src, f"phase {p.index}")
        write_transformer(out / folders[p.index], state, src, torch.float32)
    scheduler = flow_match_scheduler_config(run.plan.timesteps)
    ratio = (choose_boundary_ratio(run.plan, check_scheduler(scheduler, run.plan.timesteps), run.teacher_boundary)
             if run.plan.num_phases == 2 else None)
    write_pipeline_files(run, out, scheduler, ratio, None, lora_only=False, dtype_name="fp32")
    return run


@pytest.fixture(scope="module")
def exports(parts):
    return {kind: (parts["root"] / f"export_{kind}", _hand_export(parts, kind, parts["root"] / f"export_{kind}"))
            for kind in ("i2v", "ti2v")}


def test_exported_model_index_is_an_image_to_video_pipeline(exports):
    i2v = json.loads((exports["i2v"][0] / "model_index.json").read_text())
    assert i2v["_class_name"] == "WanImageToVideoPipeline" and i2v["expand_timesteps"] is False
    assert i2v["boundary_ratio"] == 0.9 and i2v["transformer_2"] == ["diffusers", "WanTransformer3DModel"]
    assert i2v["image_encoder"] == [None, None] and i2v["image_processor"] == [None, None]
    assert i2v["scheduler"] == ["diffusers", "FlowMatchEulerDiscreteScheduler"] and i2v["vae"][0] == "diffusers"
    ti2v = json.loads((exports["ti2v"][0] / "model_index.json").read_text())
    assert ti2v["_class_name"] == "WanImageToVideoPipeline" and ti2v["expand_timesteps"] is True
    assert ti2v["boundary_ratio"] is None and ti2v["transformer_2"] == [None, None]
    assert ti2v["image_encoder"] == [None, None]
    for kind, (out, _) in exports.items():
        info = json.loads((out / "pdmd_export.json").read_text())
        assert info["conditioning"] == kind and info["pipeline_class"] == "WanImageToVideoPipeline"
        assert (out / "vae" / "config.json").is_file() and not (out / "image_encoder").exists()


def _sample(argv: list[str], capsys) -> tuple[int, str]:
    from pdmd.cli import main

    code = main(["sample", *argv])
    return code, capsys.readouterr().err


@pytest.mark.parametrize("kind", ["i2v", "ti2v"])
def test_exported_pipeline_reproduces_pdmd_sample_with_image(parts, exports, kind, tmp_path, capsys):
    """WanImageToVideoPipeline.from_pretrained(export)(image, latents, embeds) == `pdmd sample --export --image`,
    and `--cond` with the stored tensors gives exactly the same as `--image`."""
    out, _ = exports[kind]
    root = parts["root"]
    common = ["--export", str(out), "--embeds", str(root / "embeds.safetensors"),
              "--latents", str(root / f"latents_{kind}.safetensors")]
    code, err = _sample([*common, "--image", str(parts["image"]), "--out", str(tmp_path / "img.safetensors")], capsys)
    assert code == 0, err
    ours = load_file(str(tmp_path / "img.safetensors"))["latents"]
    embeds, x = _inputs(parts, kind)
    theirs = _call(_pipe(out), parts["image"], embeds, x)
    assert rel_err(ours, theirs) < 1e-5
    # --cond: the stored tensors (one sample, as a shard holds them) instead of the image
    from data.conditioning import ConditionEncoder, load_vae
    from data.images import Bucket, load_rgb

    vae, _ = load_vae(out, device="cpu")
    stored = ConditionEncoder(vae, kind, NUM_FRAMES).encode(load_rgb(parts["image"]), Bucket(HEIGHT, WIDTH))
    save_file(stored, str(tmp_path / "cond.safetensors"))
    code, err = _sample([*common, "--cond", str(tmp_path / "cond.safetensors"), "--out", str(tmp_path / "c.safetensors")],
                        capsys)
    assert code == 0, err
    assert torch.equal(load_file(str(tmp_path / "c.safetensors"))["latents"], ours)
    if kind == "ti2v":
        assert torch.equal(ours[:, :, :1], stored["first_frame_latents"].expand(2, -1, -1, -1, -1))
    # CFG, noise from a seed, as a user calls the pipeline
    code, err = _sample(["--export", str(out), "--embeds", str(root / "embeds.safetensors"), "--seed", "4",
                         "--guidance-scale", "3", "--height", "64", "--width", "64", "--num-frames", "5",
                         "--image", str(parts["image"]), "--out", str(tmp_path / "cfg.safetensors")], capsys)
    assert code == 0, err
    theirs = _pipe(out)(image=_user_image(parts["image"]), prompt_embeds=embeds["prompt_embeds"],
                        negative_prompt_embeds=embeds["negative_prompt_embeds"], guidance_scale=3.0,
                        generator=torch.Generator("cpu").manual_seed(4), num_inference_steps=4, height=HEIGHT,
                        width=WIDTH, num_frames=NUM_FRAMES, output_type="latent", return_dict=False)[0]
    assert rel_err(load_file(str(tmp_path / "cfg.safetensors"))["latents"], theirs) < 1e-5


@pytest.mark.parametrize("kind", ["i2v", "ti2v"])
def test_verify_pipeline_side_matches_our_sampler(parts, exports, kind):
    """What --verify compares: the pipeline fed the seeded test image vs our sampler on its ConditionEncoder
    latents (here over the exported transformers; the run's Megatron experts once the trainer conditions)."""
    from pdmd.export.convert import exported_latents, verify_condition, verify_vae
    from pdmd.export.layout import ExportOptions
    from pdmd.export.pipelines import initial_noise

    out, run = exports[kind]
    shape = (1, *SHAPES[kind][1:])
    image, cond, vae = verify_condition(kind, verify_vae(run, None), shape, 2)
    assert image.size == (WIDTH, HEIGHT) and cond.kind == kind
    x, text = initial_noise(shape, 0), torch.randn(1, 16, 24, generator=torch.Generator().manual_seed(1))
    opts = ExportOptions(run=run.path, out=out)
    theirs = exported_latents(run, out, opts, "fp32", x, text, image=image, cond=cond, vae=vae)
    ours = euler_sample(ExportedExperts(out).velocity, run.plan, x, text, cond=cond)
    assert rel_err(theirs, ours) < 1e-5


# --- trained tiny runs (pdmd train, configs/tiny_wan22_{i2v,ti2v}.yaml), exported --------------------------
@pytest.mark.parametrize("kind", ["i2v", "ti2v"])
def test_tiny_image_run_exports_and_verifies(tiny_image_runs, kind):
    """A two-phase image-conditioned run's export (and I2V's LoRA-only one) passes --verify: the pipeline fed a
    test image vs our sampler over the run's Megatron experts; the merged export is a WanImageToVideoPipeline."""
    root, results = tiny_image_runs[kind]
    for name in ("export", "export_lora") if kind == "i2v" else ("export",):
        r = results[name]
        assert r["code"] == 0, r["stderr"]
        line = [x for x in r["stdout"].splitlines() if "--verify" in x][-1]
        assert f"{kind} conditioning" in line and line.endswith("PASS"), line
        assert float(line.split("rel err ")[1].split()[0]) < 1e-5, line
    index = json.loads((root / "export" / "model_index.json").read_text())
    assert index["_class_name"] == "WanImageToVideoPipeline" and index["expand_timesteps"] is (kind == "ti2v")
    assert index["image_encoder"] == [None, None] and index["transformer_2"][0] == "diffusers"
    assert index["boundary_ratio"] == (0.9 if kind == "i2v" else 0.885417)  # TI2V's teacher has no boundary
    for sub in ("transformer", "transformer_2"):
        assert json.loads((root / "export" / sub / "config.json").read_text())["in_channels"] == (
            12 if kind == "i2v" else 4)
    assert json.loads((root / "export" / "pdmd_export.json").read_text())["conditioning"] == kind


@pytest.mark.parametrize("kind", ["i2v", "ti2v"])
def test_exported_image_run_reproduces_pdmd_sample(tiny_image_runs, kind, tmp_path, capsys):
    """WanImageToVideoPipeline.from_pretrained(export) with the image, noise and embeddings == `pdmd sample --run
    --image` (and `--cond` with the stored tensors, and `--export`), with and without CFG."""
    root, results = tiny_image_runs[kind]
    for name in ("sample_image", "sample_cond", "sample_cfg"):
        assert results[name]["code"] == 0, results[name]["stderr"]
    ours = load_file(str(root / "s_image.safetensors"))["latents"]
    assert torch.equal(load_file(str(root / "s_cond.safetensors"))["latents"], ours)
    if kind == "ti2v":  # the first frame is exactly the image latent
        first = load_file(str(root / "cond.safetensors"))["first_frame_latents"]
        assert torch.equal(ours[:, :, :1], first.expand(2, -1, -1, -1, -1))
    embeds, x = load_file(str(root / "embeds.safetensors")), load_file(str(root / "latents.safetensors"))["latents"]
    side = IMAGE_RUN_PIXELS[kind]
    pipe = _pipe(root / "export")
    kw = dict(image=_user_image(root / "image.png", side, side), prompt_embeds=embeds["prompt_embeds"], latents=x,
              num_inference_steps=4, height=side, width=side, num_frames=NUM_FRAMES, output_type="latent",
              return_dict=False)
    assert rel_err(pipe(guidance_scale=1.0, **kw)[0], ours) < 1e-5
    cfg = pipe(guidance_scale=3.0, negative_prompt_embeds=embeds["negative_prompt_embeds"], **kw)[0]
    assert rel_err(cfg, load_file(str(root / "s_cfg.safetensors"))["latents"]) < 1e-5
    # the students are not the teacher: the teacher's experts give other latents from the same inputs
    teacher = _pipe(root / "base", PLANS[kind])
    assert rel_err(teacher(guidance_scale=1.0, **kw)[0], ours) > 1e-3
    code, err = _sample(["--export", str(root / "export"), "--embeds", str(root / "embeds.safetensors"), "--latents",
                         str(root / "latents.safetensors"), "--image", str(root / "image.png"),
                         "--out", str(tmp_path / "e.safetensors")], capsys)
    assert code == 0, err
    assert rel_err(load_file(str(tmp_path / "e.safetensors"))["latents"], ours) < 1e-5


# --- mistakes ---------------------------------------------------------------------------------------------
def test_conditioning_mistakes_are_clear_errors(parts, exports, tmp_path, capsys):
    out, root = str(exports["i2v"][0]), parts["root"]
    dst = str(tmp_path / "x.safetensors")
    common = ["--export", out, "--embeds", str(root / "embeds.safetensors"),
              "--latents", str(root / "latents_i2v.safetensors"), "--out", dst]
    code, err = _sample(common, capsys)
    assert code == 2 and "image-conditioned (i2v)" in err and "--image" in err
    code, err = _sample([*common, "--image", str(parts["image"]), "--cond", str(parts["image"])], capsys)
    assert code == 2 and "not both" in err
    code, err = _sample([*common, "--image", str(tmp_path / "nope.png")], capsys)
    assert code == 2 and "no such file" in err
    (tmp_path / "bad.png").write_bytes(b"not an image")
    code, err = _sample([*common, "--image", str(tmp_path / "bad.png")], capsys)
    assert code == 2 and "cannot read it" in err
    save_file({"first_frame_latents": torch.zeros(4, 1, 4, 4), "first_frame_mask": torch.ones(1, 2, 4, 4)},
              str(tmp_path / "ti2v.safetensors"))
    code, err = _sample([*common, "--cond", str(tmp_path / "ti2v.safetensors")], capsys)
    assert code == 2 and "holds ti2v conditioning" in err
    save_file({"cond_latents": torch.zeros(4, 2, 4, 4), "cond_mask": torch.ones(4, 2, 4, 4)},
              str(tmp_path / "small.safetensors"))
    code, err = _sample([*common, "--cond", str(tmp_path / "small.safetensors")], capsys)
    assert code == 2 and "conditioning is for [4, 2, 4, 4]" in err
    code, err = _sample(["--export", out, "--embeds", str(root / "embeds.safetensors"), "--height", "72", "--width",
                         "64", "--num-frames", "5", "--image", str(parts["image"]), "--out", dst], capsys)
    assert code == 2 and "multiples of 16" in err
    code, err = _sample([*common, "--image", str(parts["image"]), "--vae", str(tmp_path)], capsys)
    assert code == 2 and "--vae" in err
    # the transformer must read what the conditioning feeds it
    with pytest.raises(ExportError, match="needs in_channels 12"):
        check_conditioning("i2v", {"in_channels": 4, "out_channels": 4}, "x")
    with pytest.raises(ExportError, match="text only"):
        check_conditioning(None, {"in_channels": 12, "out_channels": 4}, "x")
    with pytest.raises(ExportError, match="CLIP"):
        check_conditioning("i2v", {"in_channels": 12, "out_channels": 4, "image_dim": 1280}, "x")
    run = _hand_run(parts["i2v"], "i2v", tmp_path)
    run.config["data"]["conditioning"] = "flf2v"
    with pytest.raises(ExportError, match="not one of"):
        _ = run.conditioning


def test_text_only_model_refuses_an_image(parts, tmp_path):
    from pdmd.sample import conditioning_source

    args = argparse.Namespace(image=str(parts["image"]), cond=None, vae=None)
    with pytest.raises(ExportError, match="text-to-video"):
        conditioning_source(args, None, None)
    for empty in (None, "none", ""):  # how a text-only run records it
        assert RunInfo(tmp_path, {"data": {"conditioning": empty}}, PLANS["i2v"], (), tmp_path, ()).conditioning is None
