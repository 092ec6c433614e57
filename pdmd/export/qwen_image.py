"""A finished Qwen-Image run as a QwenImagePipeline folder that reproduces our sampler
(``tools/convert_to_diffusers.py`` dispatches here for ``model.kind: qwen-image``).

    OUT/model_index.json   QwenImagePipeline
    OUT/transformer/       one phase: a QwenImageTransformer2DModel (the teacher's config.json);
                           K >= 2 phases: PhasedQwenImageTransformer2DModel (pdmd/export/qwen_router.py, copied here as
                           pdmd_qwen_phased.py): experts.{k-1}.* = phase k's expert, routed by the timestep
    OUT/scheduler/         FlowMatchEulerDiscreteScheduler(shift=S, use_dynamic_shifting=False)
    OUT/text_encoder/ tokenizer/ vae/   copied from --base-pipeline, else the teacher folder, when present
    OUT/pdmd_export.json   timesteps, phase boundaries, origin

``--lora-only``: OUT/phaseK_lora.safetensors (diffusers names) and phaseK_lora_comfyui.safetensors (the original
checkpoint's, which are diffusers' module names under ``diffusion_model.``), OUT/scheduler/, OUT/pdmd_export.json;
each phase's adapters are active for its own steps (:func:`lora_pipeline_latents` shows how).

The scheduler: QwenImagePipeline calls ``set_timesteps(sigmas=linspace(1, 1/N, N), mu=...)``; without dynamic
shifting the scheduler ignores mu and maps each sigma to S s / (1 + (S - 1) s), which is exactly our
shift_S(1 - i/N). :func:`check_scheduler` proves it through the pipeline's own ``retrieve_timesteps``.
Several phases need ``trust_remote_code=True`` (the router class ships in the folder). Megatron is imported
only when the run's experts are read.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from pdmd.core.distributed import barrier, is_rank0
from pdmd.core.packing import pack_latents, pack_text, unpack_latents
from pdmd.core.sampler import euler_sample
from pdmd.core.schedule import NUM_TRAIN_TIMESTEPS, PhasePlan
from pdmd.export.files import (
    WEIGHTS,
    base_components,
    check_out,
    copy_components,
    dtype_kwarg,
    parse_dtype,
    safetensors_shapes,
    staged_folder,
    write_json,
    write_phase_loras,
    write_scheduler,
    write_transformer,
)
from pdmd.export.layout import (
    EXPORT_INFO,
    SCHEDULE_TOL,
    SCHEDULER_CLASS,
    ExportError,
    ExportOptions,
    RunInfo,
    infer_shift,
    lora_entries,
    lora_file,
    read_json,
)
from pdmd.export.pipelines import initial_noise

PIPELINE_CLASS = "QwenImagePipeline"
ROUTER_MODULE = "pdmd_qwen_phased"  # the router's file name inside OUT/transformer/
ROUTER_CLASS = "PhasedQwenImageTransformer2DModel"
VAE_SCALE = 8  # QwenImagePipeline's vae_scale_factor when it has no VAE (and Qwen-Image's VAE's own)
VERIFY_TOL = {"fp32": 1e-4, "bf16": 5e-2}
DEFAULT_COMPONENTS = {"text_encoder": ["transformers", "Qwen2_5_VLForConditionalGeneration"],
                      "tokenizer": ["transformers", "Qwen2Tokenizer"], "vae": ["diffusers", "AutoencoderKLQwenImage"]}


# --- schedule and routing --------------------------------------------------------------------------
def scheduler_config(timesteps: Sequence[float]) -> dict[str, Any]:
    """A FlowMatchEulerDiscreteScheduler config that QwenImagePipeline's call turns into ``timesteps``."""
    return {"num_train_timesteps": NUM_TRAIN_TIMESTEPS, "shift": float(infer_shift(timesteps)),
            "use_dynamic_shifting": False, "shift_terminal": None, "invert_sigmas": False,
            "stochastic_sampling": False, "use_karras_sigmas": False, "use_exponential_sigmas": False,
            "use_beta_sigmas": False}


def pipeline_timesteps(config: dict[str, Any], num_steps: int, image_seq_len: int = 4096) -> tuple[list[float], list[float]]:
    """(sigmas without the final 0, timesteps) exactly as QwenImagePipeline.__call__ sets them up."""
    import numpy as np
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift, retrieve_timesteps

    sched = FlowMatchEulerDiscreteScheduler.from_config(config)
    mu = calculate_shift(image_seq_len, sched.config.get("base_image_seq_len", 256),
                         sched.config.get("max_image_seq_len", 4096), sched.config.get("base_shift", 0.5),
                         sched.config.get("max_shift", 1.15))
    timesteps, _ = retrieve_timesteps(sched, num_steps, "cpu", sigmas=np.linspace(1.0, 1 / num_steps, num_steps), mu=mu)
    return [float(s) for s in sched.sigmas[:-1]], [float(t) for t in timesteps]


def check_scheduler(config: dict[str, Any], timesteps: Sequence[float]) -> list[float]:
    """The pipeline's schedule must be ours (float32 sigmas within 1e-6); returns its timesteps."""
    sigmas, steps = pipeline_timesteps(config, len(timesteps))
    worst = max(abs(a - b) for a, b in zip(sigmas, timesteps))
    if len(sigmas) != len(timesteps) or worst > SCHEDULE_TOL:
        raise ExportError(f"QwenImagePipeline would step through sigmas {sigmas}, not the distilled timesteps "
                          f"{list(timesteps)} (max error {worst:.3g}); please report this")
    return steps


def phase_boundaries(plan: PhasePlan, scheduler_timesteps: Sequence[float]) -> list[float]:
    """Sigmas between the phases, each midway between a phase's last step and the next phase's first, checked
    against the routing (PhasedQwenImageTransformer2DModel.phase_of) of the float32 ``timestep / 1000`` the
    pipeline feeds."""
    times = list(plan.timesteps)
    bounds = [(times[plan.steps_in_phase(k)[0] - 1] + times[plan.steps_in_phase(k)[0]]) / 2
              for k in range(2, plan.num_phases + 1)]
    fed = torch.tensor(list(scheduler_timesteps), dtype=torch.float32) / NUM_TRAIN_TIMESTEPS
    got = [1 + sum(float(s) < b for b in bounds) for s in fed]
    want = [plan.phase_of_step(i) for i in range(plan.num_steps)]
    if got != want:
        raise ExportError(f"phase boundaries {bounds} route the pipeline's steps to phases {got}, not {want}; "
                          "please report this")
    return bounds


# --- files -------------------------------------------------------------------------------------------
def check_against_teacher(state: Mapping[str, torch.Tensor], teacher_folder: Path, what: str) -> None:
    """Exactly the teacher transformer's keys and shapes (a layout mismatch otherwise)."""
    shapes = safetensors_shapes(teacher_folder)
    missing, unknown = sorted(set(shapes) - set(state)), sorted(set(state) - set(shapes))
    if missing or unknown:
        key = (missing or unknown)[0]
        raise ExportError(f"{what}: {'no value for' if missing else 'unexpected key'} {key!r} compared with the teacher "
                          f"transformer {teacher_folder}: the run's checkpoint and this teacher config do not match")
    bad = next((k for k, v in state.items() if tuple(v.shape) != shapes[k]), None)
    if bad is not None:
        raise ExportError(f"{what}: {bad!r} has shape {tuple(state[bad].shape)}, the teacher {teacher_folder} has "
                          f"{shapes[bad]}: the run's checkpoint and this teacher config do not match")


def write_phase_weights(folder: Path, k: int, state: Mapping[str, torch.Tensor], dtype: torch.dtype) -> dict[str, str]:
    """Phase k's expert as ``experts.{k-1}.*`` in its own safetensors file(s) (one expert in memory at a time);
    returns their part of the index's weight map."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    tensors = {f"experts.{k - 1}.{key}": (v.to(dtype) if v.is_floating_point() else v).contiguous()
               for key, v in state.items()}
    pattern = WEIGHTS.format(suffix=f"-phase{k}{{suffix}}")
    split = split_torch_state_dict_into_shards(tensors, filename_pattern=pattern, max_shard_size="10GB")
    for filename, keys in split.filename_to_tensors.items():
        save_file({key: tensors[key] for key in keys}, str(folder / filename), metadata={"format": "pt"})
        (folder / filename).chmod(0o644)
    return dict(split.tensor_to_filename)


def write_router(folder: Path, weight_map: dict[str, str], teacher_config: dict[str, Any], bounds: list[float]) -> None:
    """config.json, the weights' index and the router's code for a multi-phase transformer folder."""
    import diffusers

    expert = {k: v for k, v in teacher_config.items() if not k.startswith("_")}
    config = {"_class_name": ROUTER_CLASS, "_diffusers_version": diffusers.__version__, "expert_config": expert,
              "phase_boundaries": bounds, "in_channels": expert.get("in_channels", 64),
              "out_channels": expert.get("out_channels", 16), "patch_size": expert.get("patch_size", 2),
              "guidance_embeds": bool(expert.get("guidance_embeds", False))}
    write_json(folder / "config.json", config)
    total = sum(f.stat().st_size for f in {folder / name for name in weight_map.values()})
    write_json(folder / (WEIGHTS.format(suffix="") + ".index.json"),
               {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))})
    shutil.copyfile(Path(__file__).with_name("qwen_router.py"), folder / f"{ROUTER_MODULE}.py")


def model_index(base_index: dict[str, Any] | None, present: Sequence[str], phased: bool) -> dict[str, Any]:
    import diffusers

    base = base_index or {}
    index: dict[str, Any] = {"_class_name": PIPELINE_CLASS, "_diffusers_version": diffusers.__version__,
                             "scheduler": ["diffusers", SCHEDULER_CLASS],
                             "transformer": [ROUTER_MODULE, ROUTER_CLASS] if phased
                             else ["diffusers", "QwenImageTransformer2DModel"]}
    for name, default in DEFAULT_COMPONENTS.items():
        index[name] = (base.get(name) or default) if name in present else [None, None]
    return index


# --- the export ------------------------------------------------------------------------------------


def export_qwen(opts: ExportOptions, run: RunInfo) -> tuple[float, float] | None:
    """Write the QwenImagePipeline folder; with --verify returns (relative error, tolerance) on rank 0."""
    out = opts.out
    if opts.lora_only and run.lora is None:
        raise ExportError("--lora-only: this run's students trained all parameters (student.lora is null), so there "
                          "are no adapters; export the merged pipeline instead (without --lora-only)")
    check_out(out, run.path, opts.overwrite)  # before any work; staged_folder checks again
    dtype_name = opts.dtype or run.config["model"]["dtype"]
    dtype = parse_dtype(dtype_name)
    scheduler = scheduler_config(run.plan.timesteps)
    bounds = phase_boundaries(run.plan, check_scheduler(scheduler, run.plan.timesteps))

    # lazy: Megatron loads in seconds; --help stays fast
    from megatron_adapters.experts import RunExperts

    experts = RunExperts(run, tp=opts.tp, pp=opts.pp)
    with staged_folder(out, run.path, opts.overwrite) as stage:
        if opts.lora_only:
            _write_qwen_lora(run, experts, opts, stage, out, scheduler, bounds, dtype, dtype_name)
        else:
            _write_qwen(run, experts, opts, stage, out, scheduler, bounds, dtype, dtype_name)
    barrier()
    return verify(run, out, experts, opts, dtype_name) if opts.verify else None


def _write_qwen(run: RunInfo, experts, opts: ExportOptions, stage: Path, out: Path, scheduler: dict[str, Any],
                bounds: list[float], dtype: torch.dtype, dtype_name: str) -> None:
    """The phase experts (one transformer, or the router over them) and the pipeline files into ``stage``."""
    k_count = run.plan.num_phases
    folder = stage / "transformer"
    teacher_folder = run.expert_folder(0)
    weight_map: dict[str, str] = {}
    for p in run.phases:
        state = experts.expert_diffusers(p.index)
        if is_rank0():
            check_against_teacher(state, run.expert_folder(p.student_expert), f"phase {p.index}")
            if k_count == 1:
                write_transformer(folder, state, teacher_folder, dtype)
            else:
                weight_map.update(write_phase_weights(folder, p.index, state, dtype))
            print(f"convert_to_diffusers: phase {p.index} -> {out / 'transformer'}", flush=True)
        if not opts.verify:
            experts.backend.experts.pop(p.index, None)  # a 20B expert is freed before the next one loads
        del state
    if is_rank0():
        if k_count > 1:
            write_router(folder, weight_map, read_json(teacher_folder / "config.json") or {}, bounds)
        write_scheduler(stage, scheduler)
        base = Path(opts.base_pipeline) if opts.base_pipeline else run.teacher
        present = copy_components({k: v for k, v in base_components(base).items() if k in DEFAULT_COMPONENTS}, stage)
        write_json(stage / "model_index.json", model_index(read_json(base / "model_index.json"), present, k_count > 1))
        write_json(stage / EXPORT_INFO, export_info(run, scheduler, bounds, present, dtype_name))
        print(f"convert_to_diffusers: wrote {out} ({PIPELINE_CLASS}, {k_count} phase(s); timesteps "
              f"{[round(t * 1000, 3) for t in run.plan.timesteps]}, phase boundaries {bounds})", flush=True)


def _write_qwen_lora(run: RunInfo, experts, opts: ExportOptions, stage: Path, out: Path, scheduler: dict[str, Any],
                     bounds: list[float], dtype: torch.dtype, dtype_name: str) -> None:
    """Each phase's adapters (to load on the teacher's QwenImagePipeline, one adapter per phase's steps:
    docs/export.md) in the requested formats, the scheduler and pdmd_export.json into ``stage``."""
    for p in run.phases:
        state = experts.lora_diffusers(p.index)
        if is_rank0():
            write_phase_loras(stage, run, p, state, dtype, opts.lora_formats, model="qwen-image")
            print(f"convert_to_diffusers: phase {p.index} -> {out / lora_file(p.index, opts.lora_formats[0])}",
                  flush=True)
        del state
    if is_rank0():
        write_scheduler(stage, scheduler)
        write_json(stage / EXPORT_INFO, export_info(run, scheduler, bounds, [], dtype_name, opts.lora_formats))
        print(f"convert_to_diffusers: wrote {out} (LoRA files for {PIPELINE_CLASS}, {run.plan.num_phases} phase(s); "
              f"phase boundaries {bounds})", flush=True)


def export_info(run: RunInfo, scheduler: dict[str, Any], bounds: list[float], present: Sequence[str],
                dtype: str, lora_formats: Sequence[str] | None = None) -> dict[str, Any]:
    """``pdmd_export.json``; ``lora_formats``: a --lora-only export (kind ``lora``, each phase's files)."""
    lora = lora_formats is not None
    return {
        "format": 1, "model": "qwen-image", "kind": "lora" if lora else "qwen_pipeline", "pipeline_class": PIPELINE_CLASS,
        "run": str(run.path.resolve()), "timesteps": list(run.plan.timesteps), "boundaries": list(run.plan.boundaries),
        "num_inference_steps": run.plan.num_steps, "true_cfg_scale": 1.0, "phase_boundaries": bounds,
        "trust_remote_code": run.plan.num_phases > 1 and not lora,
        "scheduler": {"_class_name": SCHEDULER_CLASS, **scheduler}, "dtype": dtype, "components": list(present),
        "phases": [{"index": p.index, "steps": list(run.plan.steps_in_phase(p.index)),
                    "base": run.subfolders[p.student_expert], **lora_entries(p.index, lora_formats)}
                   for p in run.phases],
    }


# --- checking it -----------------------------------------------------------------------------------
def verify_prompt(text_dim: int, seed: int, length: int = 8, pad: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded prompt embeddings [1, length, D] whose last ``pad`` tokens are padding (zeros, mask 0), as the
    prompt encoder writes a short prompt in a longer batch."""
    embeds = torch.randn(1, length, text_dim, generator=torch.Generator().manual_seed(seed))
    mask = torch.ones(1, length, dtype=torch.long)
    mask[:, length - pad:] = 0
    return embeds * mask[..., None], mask


def pipeline_latents(out: Path, x: torch.Tensor, embeds: torch.Tensor, mask: torch.Tensor, num_steps: int,
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The export's own answer: QwenImagePipeline.from_pretrained(out) from noise ``x`` [B, C, 1, H, W] and the
    prompt embeddings with their mask, distilled settings (true_cfg_scale 1), as [B, C, 1, H, W]."""
    from diffusers import QwenImagePipeline

    info = read_json(out / EXPORT_INFO) or {}
    pipe = QwenImagePipeline.from_pretrained(out, text_encoder=None, tokenizer=None, vae=None,
                                             trust_remote_code=bool(info.get("trust_remote_code", True)),
                                             **dtype_kwarg(dtype))
    pipe.set_progress_bar_config(disable=True)
    _, _, _, h, w = x.shape
    result = pipe(prompt_embeds=embeds.to(dtype), prompt_embeds_mask=mask, latents=pack_latents(x).to(dtype),
                  num_inference_steps=num_steps, height=h * VAE_SCALE, width=w * VAE_SCALE, true_cfg_scale=1.0,
                  output_type="latent", return_dict=False)[0]
    return unpack_latents(result.float(), h, w)


def lora_pipeline_latents(base: Path, out: Path, x: torch.Tensor, embeds: torch.Tensor, mask: torch.Tensor,
                          plan: PhasePlan, lora_format: str = "diffusers", dtype: torch.dtype = torch.float32
                          ) -> torch.Tensor:
    """The LoRA export's answer: the teacher's QwenImagePipeline with the export's scheduler and every phase's
    file loaded by ``load_lora_weights`` as adapter ``phaseK``; a step callback makes the next step's phase
    the active adapter (what two LoRA-switching sampler nodes do in ComfyUI)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImagePipeline

    pipe = QwenImagePipeline.from_pretrained(base, text_encoder=None, tokenizer=None, vae=None,
                                             scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(out / "scheduler"),
                                             **dtype_kwarg(dtype))
    pipe.set_progress_bar_config(disable=True)
    for k in range(1, plan.num_phases + 1):
        pipe.load_lora_weights(str(out), weight_name=lora_file(k, lora_format), adapter_name=f"phase{k}")
    pipe.set_adapters([f"phase{plan.phase_of_step(0)}"])

    def next_phase(pipeline, i, t, kwargs):
        if i + 1 < plan.num_steps:
            pipeline.set_adapters([f"phase{plan.phase_of_step(i + 1)}"])
        return {}

    _, _, _, h, w = x.shape
    result = pipe(prompt_embeds=embeds.to(dtype), prompt_embeds_mask=mask, latents=pack_latents(x).to(dtype),
                  num_inference_steps=plan.num_steps, height=h * VAE_SCALE, width=w * VAE_SCALE, true_cfg_scale=1.0,
                  output_type="latent", return_dict=False, callback_on_step_end=next_phase)[0]
    return unpack_latents(result.float(), h, w)


def verify(run: RunInfo, out: Path, experts, opts: ExportOptions, dtype_name: str) -> tuple[float, float] | None:
    """Our sampler (the run's Megatron experts) vs the export in QwenImagePipeline (a --lora-only export: its
    files on the teacher's pipeline): same noise, same prompt."""

    shape = (1, *run.config["train"]["latent_shape"])
    text_dim = int((read_json(run.expert_folder(0) / "config.json") or {}).get("joint_attention_dim", 3584))
    x = initial_noise(shape, opts.seed)  # = the pipeline's own draw of [1, 1, C, H, W] from this seed
    embeds, mask = verify_prompt(text_dim, opts.seed + 1)
    dev = experts.backend.device
    ours = euler_sample(experts.velocity, run.plan, x.to(dev), pack_text(embeds, mask).to(dev)).cpu()
    if not is_rank0():
        return None
    if opts.lora_only:
        base = Path(opts.base_pipeline) if opts.base_pipeline else run.teacher
        theirs = lora_pipeline_latents(base, out, x, embeds, mask, run.plan, opts.lora_formats[0],
                                       parse_dtype(dtype_name))
    else:
        theirs = pipeline_latents(out, x, embeds, mask, run.plan.num_steps, parse_dtype(dtype_name))
    err = ((theirs.double() - ours.double()).norm() / ours.double().norm()).item()
    tol = VERIFY_TOL[dtype_name]
    print(f"convert_to_diffusers --verify: QwenImagePipeline{' + LoRA' if opts.lora_only else ''}, latents {list(shape)}, {run.plan.num_steps} steps: "
          f"rel err {err:.3e} (tolerance {tol:g}) {'PASS' if err <= tol else 'FAIL'}", flush=True)
    return err, tol
