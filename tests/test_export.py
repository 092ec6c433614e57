"""Export to diffusers: the scheduler config reproduces the distilled timesteps, boundary_ratio routes each step
to its phase's expert, the exported WanPipeline reproduces `pdmd sample` end to end (same noise and prompt
embeddings, through diffusers' own loading), LoRA files load with WanPipeline.load_lora_weights and equal the
merged experts, other phase counts get the experts layout, and user mistakes are clear errors.

Qwen-Image (conftest's qwen_runs): the export of a two-phase run loads in QwenImagePipeline (with the copied
tiny text encoder, tokenizer and VAE), reproduces our sampler over the run's Megatron experts (--verify),
routes each step to its phase's expert and steps through the distilled schedule; a one-phase run exports as
a plain QwenImageTransformer2DModel."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pdmd.core.schedule import PhasePlan, few_step_timesteps
from pdmd.core.tensors import rel_err
from pdmd.export.layout import (
    ExportError,
    check_scheduler,
    choose_boundary_ratio,
    flow_match_scheduler_config,
    route,
    scheduler_schedule,
)

WAN = PhasePlan.from_steps(4, 5.0, [2, 2])


# --- the scheduler and the routing (no model) -------------------------------------------------------
@pytest.mark.parametrize("steps,shift", [(4, 5.0), (4, 3.0), (8, 5.0), (3, 5.0), (2, 12.0), (6, 0.5), (4, 1.0),
                                         (1, 5.0)])
def test_scheduler_config_reproduces_distilled_timesteps(steps, shift, tmp_path):
    from diffusers import FlowMatchEulerDiscreteScheduler

    times = few_step_timesteps(steps, shift)
    config = flow_match_scheduler_config(times)
    sigmas, timesteps = scheduler_schedule(config, steps)
    assert max(abs(a - b) for a, b in zip(sigmas, times)) < 1e-6
    assert max(abs(a - 1000 * b) for a, b in zip(timesteps, times)) < 1e-3
    check_scheduler(config, times)
    # what the pipeline loads: the saved config, through from_pretrained
    FlowMatchEulerDiscreteScheduler.from_config(config).save_pretrained(tmp_path)
    loaded = FlowMatchEulerDiscreteScheduler.from_pretrained(tmp_path)
    loaded.set_timesteps(steps)
    assert loaded.sigmas[:-1].tolist() == pytest.approx(sigmas, abs=0) and float(loaded.sigmas[-1]) == 0.0


def test_naive_scheduler_shift_misses_the_end_point():
    """Why the fitted config: shift=5 alone shifts twice at the end (the last step would start at 24, not 625)."""
    sigmas, _ = scheduler_schedule({"shift": 5.0}, 4)
    assert sigmas[-1] < 0.05 < abs(sigmas[-1] - WAN.timesteps[-1])


def test_unrepresentable_schedule_is_a_clear_error():
    with pytest.raises(ExportError, match="not a shifted uniform schedule"):
        flow_match_scheduler_config((1.0, 0.9, 0.5, 0.2))


def test_boundary_ratio_routes_each_step_to_its_phase():
    ts = check_scheduler(flow_match_scheduler_config(WAN.timesteps), WAN.timesteps)
    assert choose_boundary_ratio(WAN, ts, 0.875) == 0.875  # the teacher's boundary qualifies
    assert route(ts, 0.875) == [1, 1, 2, 2]
    mid = choose_boundary_ratio(WAN, ts, None)
    assert WAN.timesteps[2] < mid <= WAN.timesteps[1] and route(ts, mid) == [1, 1, 2, 2]
    # the phase boundary itself (t = 833.3) would send phase 2's first step to the high-noise transformer
    assert route(ts, WAN.timesteps[2]) == [1, 1, 1, 2]
    assert choose_boundary_ratio(WAN, ts, WAN.timesteps[2]) == mid
    with pytest.raises(ExportError, match="two experts"):
        choose_boundary_ratio(PhasePlan.from_steps(3, 5.0, [1, 1, 1]), ts[:3])


# --- the tiny run, exported ----------------------------------------------------------------------------
def test_convert_verify_passes(tiny_wan_run):
    _, results = tiny_wan_run
    for name in ("export_full", "export_lora", "export3"):
        r = results[name]
        assert r["code"] == 0, r["stderr"]
        line = [x for x in r["stdout"].splitlines() if "--verify" in x][-1]
        assert line.endswith("PASS") and float(line.split("rel err ")[1].split()[0]) < 1e-5, line


def test_exported_folder_layout(tiny_wan_run):
    root, _ = tiny_wan_run
    out = root / "export_full"
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "WanPipeline" and index["boundary_ratio"] == 0.875
    assert index["scheduler"] == ["diffusers", "FlowMatchEulerDiscreteScheduler"]
    for name in ("text_encoder", "tokenizer", "vae"):  # copied from the base pipeline
        assert index[name][0] is not None and (out / name).is_dir()
    base_keys = set(load_file(str(root / "base" / "transformer" / "diffusion_pytorch_model.safetensors")))
    for sub in ("transformer", "transformer_2"):
        weights = load_file(str(out / sub / "diffusion_pytorch_model.safetensors"))
        assert set(weights) == base_keys and all(v.dtype == torch.float32 for v in weights.values())
        assert json.loads((out / sub / "config.json").read_text())["_class_name"] == "WanTransformer3DModel"
    info = json.loads((out / "pdmd_export.json").read_text())
    assert info["kind"] == "wan_pipeline" and [p["steps"] for p in info["phases"]] == [[0, 1], [2, 3]]
    assert [p["folder"] for p in info["phases"]] == ["transformer", "transformer_2"]


def _pipeline(folder: Path, **kwargs):
    from diffusers import WanPipeline

    return WanPipeline.from_pretrained(folder, **kwargs).to("cpu")


def _call(pipe, **kwargs) -> torch.Tensor:
    args = dict(num_inference_steps=4, height=64, width=64, num_frames=5, output_type="latent", return_dict=False)
    return pipe(**{**args, **kwargs})[0].float()


def test_exported_pipeline_reproduces_pdmd_sample(tiny_wan_run):
    """The same noise and prompt embeddings through WanPipeline.from_pretrained(export) and `pdmd sample`."""
    root, results = tiny_wan_run
    for name in ("sample_embeds", "sample_cfg", "sample_prompts"):
        assert results[name]["code"] == 0, results[name]["stderr"]
    pipe = _pipeline(root / "export_full")
    emb, lat = load_file(str(root / "embeds.safetensors")), load_file(str(root / "latents.safetensors"))["latents"]
    theirs = _call(pipe, prompt_embeds=emb["prompt_embeds"], latents=lat, guidance_scale=1.0)
    ours = load_file(str(root / "s_embeds.safetensors"))["latents"]
    assert rel_err(theirs, ours) < 1e-5
    # CFG (not distilled, but the same formula on both sides)
    theirs = _call(pipe, prompt_embeds=emb["prompt_embeds"], negative_prompt_embeds=emb["negative_prompt_embeds"],
                   latents=lat, guidance_scale=3.0)
    assert rel_err(theirs, load_file(str(root / "s_cfg.safetensors"))["latents"]) < 1e-5
    # text through the copied UMT5 and noise from a seed, as a user calls it
    from tests.tiny_run import PROMPTS

    theirs = _call(pipe, prompt=PROMPTS, guidance_scale=1.0, generator=torch.Generator("cpu").manual_seed(3))
    assert rel_err(theirs, load_file(str(root / "s_prompts.safetensors"))["latents"]) < 1e-5
    # the check is sensitive: routing phase 2's first step to the high-noise expert changes the result
    pipe.register_to_config(boundary_ratio=WAN.timesteps[2])
    wrong = _call(pipe, prompt_embeds=emb["prompt_embeds"], latents=lat, guidance_scale=1.0)
    assert rel_err(wrong, ours) > 1e-3


# The original Wan checkpoint's module names (Wan-Video/Wan2.2 wan/modules/model.py: WanAttentionBlock's
# self_attn / cross_attn q, k, v, o and its ffn Sequential's two Linears), as ComfyUI and shared LoRAs key them.
ORIGINAL_WAN_LORA_KEY = re.compile(r"diffusion_model\.blocks\.\d+\.(self_attn\.[qkvo]|cross_attn\.[qkvo]|ffn\.[02])"
                                   r"\.(lora_down\.weight|lora_up\.weight|alpha)")


@pytest.mark.parametrize("folder, fmt", [("export_lora", "diffusers"), ("export_comfyui", "comfyui")])
def test_lora_files_load_into_the_base_pipeline(tiny_wan_run, folder, fmt):
    """WanPipeline.load_lora_weights on the teacher equals the merged experts, per transformer, from the
    diffusers-named files and from the ComfyUI-named ones (original Wan module names, which diffusers
    converts on load)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from pdmd.export.layout import lora_file

    root, _ = tiny_wan_run
    lora, merged = root / folder, _pipeline(root / "export_full", text_encoder=None, tokenizer=None, vae=None)
    info = json.loads((lora / "pdmd_export.json").read_text())
    key = "lora" if fmt == "diffusers" else "lora_comfyui"
    assert info["kind"] == "lora" and [p[key] for p in info["phases"]] == [lora_file(1, fmt), lora_file(2, fmt)]
    if fmt == "comfyui":
        assert all(ORIGINAL_WAN_LORA_KEY.fullmatch(k) for k in load_file(lora / lora_file(1, fmt)))
    pipe = _pipeline(root / "base", text_encoder=None, tokenizer=None, vae=None,
                     scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(lora / "scheduler"),
                     boundary_ratio=info["boundary_ratio"])
    base = {s: getattr(pipe, s) for s in ("transformer", "transformer_2")}
    g = torch.Generator().manual_seed(0)
    x, text, t = torch.randn(1, 4, 2, 8, 8, generator=g), torch.randn(1, 16, 24, generator=g), torch.tensor([900.0])
    before = {s: m(x, t, text, return_dict=False)[0] for s, m in base.items()}
    pipe.load_lora_weights(str(lora), weight_name=lora_file(1, fmt), adapter_name="phase1")
    pipe.load_lora_weights(str(lora), weight_name=lora_file(2, fmt), adapter_name="phase2", load_into_transformer_2=True)
    for slot, name in (("transformer", "phase1"), ("transformer_2", "phase2")):
        model = getattr(pipe, slot)
        assert list(model.peft_config) == [name]
        adapted = sum(1 for n, _ in model.named_modules() if n.endswith(".lora_A"))
        assert adapted == 20  # 2 blocks x (q, k, v, out) x 2 attentions + 2 FFN linears: every adapter landed
        want = getattr(merged, slot)(x, t, text, return_dict=False)[0]
        got = model(x, t, text, return_dict=False)[0]
        assert rel_err(want - before[slot], before[slot]) > 1e-3  # the adapters matter
        assert rel_err(got - before[slot], want - before[slot]) < 1e-4


def test_three_phases_get_the_experts_layout(tiny_wan_run):
    root, results = tiny_wan_run
    out = root / "export3"
    assert not (out / "model_index.json").exists()
    info = json.loads((out / "pdmd_export.json").read_text())
    assert info["kind"] == "experts" and info["boundary_ratio"] is None
    assert [p["folder"] for p in info["phases"]] == ["experts/phase1", "experts/phase2", "experts/phase3"]
    assert [p["base"] for p in info["phases"]] == ["transformer", "transformer", "transformer_2"]
    assert results["sample3"]["code"] == 0, results["sample3"]["stderr"]


# --- user mistakes ---------------------------------------------------------------------------------------
def test_wrong_teacher_is_refused_before_any_work(tiny_wan_run):
    """--teacher with other shapes: the run recorded its teacher's content, so the export says so at once
    (runs from before content identity still get the layout diagnosis when the checkpoint does not fit)."""
    root, results = tiny_wan_run
    r = results["export_wrong_teacher"]
    assert r["code"] == 2 and "is not the teacher" in r["stderr"] and "pass that teacher's folder" in r["stderr"], r["stderr"]
    assert not (root / "export_bad").exists()


def _export(argv: list[str], capsys) -> tuple[int, str]:
    from pdmd.export.convert import main

    code = main(argv)
    return code, capsys.readouterr().err


def test_unfinished_or_broken_runs_are_clear_errors(tiny_wan_run, tmp_path, capsys):
    root, _ = tiny_wan_run
    run = tmp_path / "run"
    shutil.copytree(root / "run", run)
    out = str(tmp_path / "out")
    code, err = _export(["--run", str(tmp_path / "nope"), "--out", out], capsys)
    assert code == 2 and "no such directory" in err
    code, err = _export(["--run", str(root), "--out", out], capsys)
    assert code == 2 and "not a run directory" in err
    manifest = json.loads((run / "manifest.json").read_text())
    manifest["phases"][1]["status"] = "running"
    (run / "manifest.json").write_text(json.dumps(manifest))
    code, err = _export(["--run", str(run), "--out", out], capsys)
    assert code == 2 and "phase 2" in err and "is running" in err and "rerunning" in err
    manifest["phases"][1]["status"] = "done"
    (run / "manifest.json").write_text(json.dumps(manifest))
    (run / "checkpoints" / "phase2" / "expert" / "common.pt").write_bytes(b"changed")
    code, err = _export(["--run", str(run), "--out", out], capsys)
    assert code == 2 and "changed since training" in err
    shutil.rmtree(run / "checkpoints" / "phase1" / "expert")
    code, err = _export(["--run", str(run), "--out", out], capsys)
    assert code == 2 and "phase 1" in err and "missing" in err
    code, err = _export(["--run", str(root / "run"), "--out", out, "--teacher", str(tmp_path)], capsys)
    assert code == 2 and "--teacher" in err and "config.json" in err
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "file.txt").write_text("mine")
    code, err = _export(["--run", str(root / "run"), "--out", str(tmp_path / "busy"), "--no-hash-check"], capsys)
    assert code == 2 and "is not an export" in err and "--overwrite" in err


def test_export_never_mixes_runs_or_leaves_half_an_export(tiny_wan_run):
    """run A's LoRA files into run B's export folder: refused, B's export untouched; an export whose expert
    checkpoint is truncated (hash check off) fails with nothing at --out and no staging folder left."""
    root, results = tiny_wan_run
    r = results["export_into_other_runs"]
    assert r["code"] == 2 and "another run" in r["stderr"] and "Traceback" not in r["stderr"], r["stderr"]
    info = json.loads((root / "export3" / "pdmd_export.json").read_text())
    assert info["run"] == str((root / "run3").resolve()) and info["kind"] != "lora"
    assert not list((root / "export3").glob("*lora*"))
    r = results["export_corrupt_expert"]
    assert r["code"] == 2 and "phase 1" in r["stderr"] and "Traceback" not in r["stderr"], r["stderr"]
    assert not (root / "export_corrupt").exists()
    assert not [p for p in root.iterdir() if p.name.startswith(".export")]


# --- Qwen-Image ------------------------------------------------------------------------------------------
def _verify_error(result: dict) -> float:
    assert result["code"] == 0, result["stdout"][-3000:] + result["stderr"][-3000:]
    found = re.search(r"QwenImagePipeline( \+ LoRA)?, latents .*: rel err ([0-9.e+-]+) .* PASS", result["stdout"])
    assert found, result["stdout"][-2000:]
    return float(found.group(2))


def test_qwen_export_reproduces_our_sampler(qwen_runs):
    """--verify: Euler over the run's Megatron experts vs QwenImagePipeline on the export, same noise and a
    prompt with padding (its mask travels with the text through our sampler)."""
    assert _verify_error(qwen_runs["export_run"]) <= 1e-5
    assert _verify_error(qwen_runs["export_run1"]) <= 1e-5


def _qwen_latents(pipe, x: torch.Tensor, embeds: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    from pdmd.core.packing import pack_latents

    return pipe(prompt_embeds=embeds, prompt_embeds_mask=mask, latents=pack_latents(x), num_inference_steps=4,
                height=64, width=64, true_cfg_scale=1.0, output_type="latent", return_dict=False)[0]


def test_qwen_export_loads_in_qwen_image_pipeline_and_routes_phases(qwen_runs):
    from diffusers import QwenImagePipeline, QwenImageTransformer2DModel

    from pdmd.export.qwen_image import verify_prompt

    export = qwen_runs["root"] / "export_run"
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
    out = _qwen_latents(pipe, x, embeds, mask)
    assert calls == [1, 1, 2, 2]  # each phase's expert for its two steps
    assert [round(float(s), 6) for s in pipe.scheduler.sigmas] == [1.0, 0.9, 0.75, 0.5, 0.0]
    # routing and training matter: swapped experts, or the teacher in both slots, give other latents
    experts[0], experts[1] = experts[1], experts[0]
    assert rel_err(_qwen_latents(pipe, x, embeds, mask), out) > 1e-3
    teacher = QwenImageTransformer2DModel.from_pretrained(qwen_runs["base"] / "transformer")
    experts[0], experts[1] = teacher, teacher
    assert rel_err(_qwen_latents(pipe, x, embeds, mask), out) > 1e-3
    # the copied text encoder and VAE: a prompt all the way to pixels
    image = pipe(prompt="a cat on a sofa", num_inference_steps=4, height=64, width=64, true_cfg_scale=1.0,
                 generator=torch.Generator().manual_seed(0), output_type="np").images
    assert image.shape == (1, 64, 64, 3) and float(image.std()) > 0


def test_qwen_one_phase_export_is_a_plain_qwen_image_pipeline(qwen_runs):
    from diffusers import QwenImagePipeline, QwenImageTransformer2DModel

    export = qwen_runs["root"] / "export_run1"
    index = json.loads((export / "model_index.json").read_text())
    assert index["transformer"] == ["diffusers", "QwenImageTransformer2DModel"]
    assert not list((export / "transformer").glob("*.py"))
    pipe = QwenImagePipeline.from_pretrained(export, text_encoder=None, tokenizer=None, vae=None)  # no remote code
    assert type(pipe.transformer) is QwenImageTransformer2DModel


def test_qwen_lora_files_load_with_diffusers_and_switch_per_phase(qwen_runs):
    """--lora-only on Qwen-Image: each phase's adapters in diffusers' and ComfyUI's names. Both load with
    QwenImagePipeline.load_lora_weights on the teacher (diffusers converts the ComfyUI names) and, the active
    adapter switched to each step's phase, reproduce our sampler over the merged experts (--verify); the
    ComfyUI names are the original checkpoint's modules (Qwen-Image's are the teacher's own key names)."""
    from pdmd.export.qwen_image import lora_pipeline_latents, verify_prompt

    assert _verify_error(qwen_runs["export_lora"]) <= 1e-5
    out, base = qwen_runs["root"] / "export_lora", qwen_runs["base"]
    info = json.loads((out / "pdmd_export.json").read_text())
    assert info["kind"] == "lora" and [p["lora_comfyui"] for p in info["phases"]] == [
        "phase1_lora_comfyui.safetensors", "phase2_lora_comfyui.safetensors"]
    modules = {k.rsplit(".", 1)[0] for k in load_file(next((base / "transformer").glob("*.safetensors")))}
    for k in (1, 2):
        comfy, ours = load_file(out / f"phase{k}_lora_comfyui.safetensors"), load_file(out / f"phase{k}_lora.safetensors")
        names = {re.sub(r"\.(lora_down\.weight|lora_up\.weight|alpha)$", "", key) for key in comfy}
        assert all(n.startswith("diffusion_model.") and n.removeprefix("diffusion_model.") in modules for n in names)
        assert len(comfy) == len(ours) // 2 * 3  # lora_down, lora_up and alpha per module
    planned = json.loads((qwen_runs["root"] / "run" / "manifest.json").read_text())["plan"]
    plan = PhasePlan.from_config(planned)
    x = torch.randn(1, 4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    embeds, mask = verify_prompt(32, 1)
    want = lora_pipeline_latents(base, out, x, embeds, mask, plan)
    assert rel_err(lora_pipeline_latents(base, out, x, embeds, mask, plan, "comfyui"), want) < 1e-6
    # the switch matters: phase 1's adapters on every step give other latents
    one = PhasePlan.from_config({**planned, "boundaries": [1.0, 0.0], "renoise_clamp": None})
    assert one.timesteps == plan.timesteps
    assert rel_err(lora_pipeline_latents(base, out, x, embeds, mask, one), want) > 1e-3


def test_pdmd_export_is_the_same_command(tiny_wan_run):
    """`pdmd export` = tools/convert_to_diffusers.py (the README names the tool): same options, exit codes."""
    root, results = tiny_wan_run
    assert results["pdmd_export_comfyui"]["code"] == 0, results["pdmd_export_comfyui"]["stderr"]
    info = json.loads((root / "export_comfyui" / "pdmd_export.json").read_text())
    assert [p["lora_comfyui"] for p in info["phases"]] == ["phase1_lora_comfyui.safetensors",
                                                           "phase2_lora_comfyui.safetensors"]
    assert [p["lora"] for p in info["phases"]] == [None, None]
    assert not list((root / "export_comfyui").glob("phase*_lora.safetensors"))
