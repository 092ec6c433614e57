"""`python tools/convert_to_diffusers.py`: a finished run as a diffusers pipeline (or LoRA files) that
reproduces `pdmd sample`, and ``--verify`` to prove it on this machine.

Wan2.2 with two phases -> WanPipeline: phase 1 in ``transformer`` (high noise), phase 2 in
``transformer_2``, ``boundary_ratio`` between them, a FlowMatchEulerDiscreteScheduler whose
``set_timesteps(N)`` is exactly the distilled timesteps (pdmd/export/layout.py). One phase -> WanPipeline
with ``transformer`` only. Other phase counts -> ``experts/phaseK`` folders plus ``pdmd_export.json``,
sampled by ``pdmd sample --export`` (docs/export.md). Megatron is imported only when a run is read.

Image-conditioned runs (``data.conditioning``): i2v (Wan2.2 I2V-A14B) -> WanImageToVideoPipeline with
``expand_timesteps`` false, ti2v (TI2V-5B) -> WanImageToVideoPipeline with ``expand_timesteps`` true; both
without a CLIP image encoder. ``--verify`` then encodes a seeded test image with the VAE and hands the same
image to the pipeline, which encodes it itself.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from data.conditioning import ConditionEncoder, load_vae
from data.images import Bucket
from pdmd.core.conditioning import Conditioning
from pdmd.core.distributed import barrier, is_rank0
from pdmd.core.errors import UserError
from pdmd.core.sampler import euler_sample
from pdmd.export.files import (
    base_components,
    check_against_teacher,
    check_out,
    copy_components,
    dtype_kwarg,
    parse_dtype,
    staged_folder,
    write_json,
    write_phase_loras,
    write_scheduler,
    write_transformer,
)
from pdmd.export.layout import (
    EXPORT_INFO,
    LORA_FORMATS,
    ExportError,
    ExportOptions,
    RunInfo,
    check_conditioning,
    check_scheduler,
    choose_boundary_ratio,
    export_info,
    flow_match_scheduler_config,
    is_wan_pipeline,
    lora_file,
    model_index,
    phase_folders,
    read_json,
    read_run,
)
from pdmd.export.pipelines import ExportedExperts, initial_noise
from pdmd.export.qwen_image import export_qwen
from pdmd.run.console import quiet_known_warnings, report_user_error

VERIFY_TOL = {"fp32": 1e-4, "bf16": 5e-2}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", "--run-dir", dest="run", required=True,
                   help="a finished run directory (manifest.json, checkpoints/); under torchrun spell it --run-dir")
    p.add_argument("--out", required=True, help="the diffusers folder to write")
    p.add_argument("--base-pipeline", help="diffusers Wan pipeline folder to copy text_encoder/, tokenizer/, vae/ "
                   "from (default: the run's teacher folder, for what it has)")
    p.add_argument("--lora-only", action="store_true", help="write per-phase LoRA files (LoRA students) instead")
    p.add_argument("--lora-format", nargs="+", choices=list(LORA_FORMATS), default=list(LORA_FORMATS),
                   help="--lora-only: diffusers names (load_lora_weights) and/or ComfyUI's, the original Wan / "
                        "Qwen-Image checkpoint's module names (default: both)")
    p.add_argument("--dtype", choices=["fp32", "bf16"], help="weights dtype (default: the run's model.dtype)")
    p.add_argument("--teacher", help="the run's teacher folder, if it moved since training")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks to load with (under torchrun)")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel ranks to load with (under torchrun)")
    p.add_argument("--verify", action="store_true", help="load the export with diffusers and compare with our sampler")
    p.add_argument("--seed", type=int, default=0, help="--verify: noise and prompt-embedding seed")
    p.add_argument("--no-hash-check", action="store_true", help="skip re-hashing the expert checkpoints")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an --out that holds something else than an export of this run")


def export(opts: ExportOptions) -> tuple[float, float] | None:
    """Write the export; with --verify returns (relative error, tolerance) on rank 0, else None."""
    run = read_run(opts.run, opts.teacher, check_hashes=opts.hash_check, kinds=("wan", "qwen-image"))
    if run.config["model"]["kind"] == "qwen-image":  # a QwenImagePipeline folder: pdmd/export/qwen_image.py
        return export_qwen(opts, run)
    out, k_count = opts.out, run.plan.num_phases
    dtype_name = opts.dtype or run.config["model"]["dtype"]
    dtype = parse_dtype(dtype_name)
    base = opts.base_pipeline
    check_out(out, run.path, opts.overwrite)  # before any work; staged_folder checks again
    for p in run.phases:
        check_conditioning(run.conditioning, read_json(run.expert_folder(p.student_expert) / "config.json") or {},
                           f"phase {p.index} (teacher {run.expert_folder(p.student_expert)})")
    if opts.verify and run.conditioning is not None:
        verify_vae(run, base)  # before any work: the check encodes an image
    if opts.lora_only and run.lora is None:
        raise ExportError("--lora-only: this run's students trained all parameters (student.lora is null), so there "
                          "are no adapters; export the merged pipeline instead (without --lora-only)")
    scheduler = flow_match_scheduler_config(run.plan.timesteps)
    sched_ts = check_scheduler(scheduler, run.plan.timesteps)
    ratio = choose_boundary_ratio(run.plan, sched_ts, run.teacher_boundary) if k_count == 2 else None
    # lazy: Megatron loads in seconds; --help stays fast
    from megatron_adapters.experts import RunExperts

    experts = RunExperts(run, tp=opts.tp, pp=opts.pp)
    with staged_folder(out, run.path, opts.overwrite) as stage:
        _write_phases(run, experts, opts, stage, out, scheduler, ratio, dtype, dtype_name)
    barrier()
    if not opts.verify:
        return None
    return verify(run, out, experts, opts, dtype_name)


def _write_phases(run: RunInfo, experts, opts: ExportOptions, stage: Path, out: Path, scheduler: dict,
                  ratio: float | None, dtype: torch.dtype, dtype_name: str) -> None:
    """Every phase's transformer (or LoRA file) and the pipeline files into ``stage`` (rank 0 writes)."""
    k_count, base = run.plan.num_phases, opts.base_pipeline
    folders = phase_folders(k_count)
    for p in run.phases:
        if opts.lora_only:
            state = experts.lora_diffusers(p.index)
            if is_rank0():
                write_phase_loras(stage, run, p, state, dtype, opts.lora_formats)
        else:
            state = experts.expert_diffusers(p.index)
            if is_rank0():
                check_against_teacher(state, run.expert_folder(p.student_expert), f"phase {p.index}")
                write_transformer(stage / folders[p.index], state, run.expert_folder(p.student_expert), dtype)
            if not opts.verify:
                experts.backend.experts.pop(p.index, None)  # a 14B expert is freed before the next one loads
        del state
        if is_rank0():
            print(f"convert_to_diffusers: phase {p.index} -> "
                  f"{out / (lora_file(p.index) if opts.lora_only else folders[p.index])}", flush=True)
    if is_rank0():
        info = write_pipeline_files(run, stage, scheduler, ratio, base, lora_only=opts.lora_only, dtype_name=dtype_name,
                                    lora_formats=opts.lora_formats)
        print(f"convert_to_diffusers: wrote {out} ({info['kind']}; timesteps {[round(t * 1000, 3) for t in run.plan.timesteps]}"
              f", boundary_ratio {ratio})", flush=True)


def write_pipeline_files(run: RunInfo, out: Path, scheduler: dict, ratio: float | None, base: Path | None, *,
                         lora_only: bool, dtype_name: str, lora_formats: tuple[str, ...] = LORA_FORMATS) -> dict:
    """Everything but the transformers: scheduler, copied components, model_index.json (pipeline layouts)
    and pdmd_export.json; returns the latter."""
    k_count = run.plan.num_phases
    write_scheduler(out, scheduler)
    info = export_info(run, scheduler, ratio, lora_only=lora_only, dtype=dtype_name, lora_formats=lora_formats)
    if not lora_only:
        found = base_components(base if base is not None else run.teacher)
        if run.conditioning is not None:  # Wan2.2 I2V/TI2V have no CLIP image encoder; nothing feeds one
            found = {name: path for name, path in found.items() if not name.startswith("image_")}
        present = copy_components(found, out)
        if is_wan_pipeline(k_count):
            write_json(out / "model_index.json", model_index(read_json((base or run.teacher) / "model_index.json"),
                                                             k_count, ratio, present, run.conditioning))
        info["components"] = present
    write_json(out / EXPORT_INFO, info)
    return info


def verify_vae(run: RunInfo, base: Path | None) -> Path:
    """The AutoencoderKLWan folder --verify encodes its test image with (the base's, else the teacher's)."""
    for where in ([base] if base is not None else []) + [run.teacher]:
        if (where / "vae" / "config.json").is_file():
            return where / "vae"
    raise ExportError(f"--verify of an image-conditioned ({run.conditioning}) run encodes a test image and needs the "
                      "VAE: pass --base-pipeline DIR with vae/ (the teacher folder has none), or drop --verify")


def seeded_image(height: int, width: int, seed: int):
    """A seeded smooth RGB picture of exactly height x width (so the pipeline's own resize is the identity)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (max(height // 8, 2), max(width // 8, 2), 3), dtype=np.uint8)
    return Image.fromarray(small).resize((width, height), Image.BILINEAR)


def verify_condition(kind: str, vae_dir: Path, shape: tuple[int, ...], seed: int):
    """(the test image, its Conditioning, the fp32 VAE) for latents of ``shape`` [B, C, T, h, w]."""

    vae, info = load_vae(vae_dir, device="cpu")
    temporal, spatial = vae.config.scale_factor_temporal, vae.config.scale_factor_spatial
    _, _, frames, h, w = shape
    bucket = Bucket(h * spatial, w * spatial)
    image = seeded_image(bucket.height, bucket.width, seed)
    stored = ConditionEncoder(vae, kind, (frames - 1) * temporal + 1, vae_info=info).encode(image, bucket)
    return image, Conditioning.from_batch({k: v[None] for k, v in stored.items()}), vae


def verify(run: RunInfo, out: Path, experts, opts: ExportOptions, dtype_name: str) -> tuple[float, float] | None:
    """Our sampler (Megatron experts) vs the export loaded by diffusers, same noise and prompt embeddings
    (and, image-conditioned, the same seeded test image: ours encoded by ConditionEncoder, theirs by the pipeline)."""
    import json


    shape = (1, *run.config["train"]["latent_shape"])
    text_dim = json.loads((run.expert_folder(0) / "config.json").read_text()).get("text_dim", 4096)
    x = initial_noise(shape, opts.seed)
    text = torch.randn(1, 16, text_dim, generator=torch.Generator().manual_seed(opts.seed + 1))
    image = cond = vae = None
    if run.conditioning is not None:
        base = opts.base_pipeline
        image, cond, vae = verify_condition(run.conditioning, verify_vae(run, base), shape, opts.seed + 2)
    dev = experts.backend.device
    ours = euler_sample(experts.velocity, run.plan, x.to(dev), text.to(dev), cond=cond).cpu()
    if not is_rank0():
        return None
    theirs = exported_latents(run, out, opts, dtype_name, x, text, image=image, cond=cond, vae=vae)
    err = ((theirs.double() - ours.double()).norm() / ours.double().norm()).item()
    tol = VERIFY_TOL[dtype_name]
    what = f", {run.conditioning} conditioning from a test image" if run.conditioning else ""
    print(f"convert_to_diffusers --verify: latents {list(shape)}, {run.plan.num_steps} steps{what}: rel err {err:.3e} "
          f"(tolerance {tol:g}) {'PASS' if err <= tol else 'FAIL'}", flush=True)
    return err, tol


def exported_latents(run: RunInfo, out: Path, opts: ExportOptions, dtype_name: str, x: torch.Tensor,
                     text: torch.Tensor, *, image=None, cond=None, vae=None) -> torch.Tensor:
    """The export's own answer: WanPipeline / WanImageToVideoPipeline.from_pretrained (or base +
    load_lora_weights) called with the noise, embeddings (and image), else our sampler over the exported
    diffusers transformers (experts layout)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanImageToVideoPipeline, WanPipeline


    dtype = parse_dtype(dtype_name)
    k_count = run.plan.num_phases
    if not opts.lora_only and not is_wan_pipeline(k_count):
        exported = ExportedExperts(out, dtype_name)
        return euler_sample(exported.velocity, exported.plan, x, text, cond=cond)
    conditioned = run.conditioning is not None
    cls = WanImageToVideoPipeline if conditioned else WanPipeline
    # the pipeline encodes the image with an fp32 VAE (as Wan is run), whatever the transformers' dtype
    parts = {"text_encoder": None, "tokenizer": None, "vae": vae if conditioned else None}
    if opts.lora_only:
        folders = phase_folders(k_count)
        wrong = [p for p in run.phases if not is_wan_pipeline(k_count) or run.subfolders[p.student_expert] != folders[p.index]]
        if wrong:
            p = wrong[0]
            raise ExportError(f"phase {p.index}'s adapters apply to the teacher's {run.subfolders[p.student_expert]}, "
                              "which WanPipeline does not run for that phase: load them with our sampler, or export "
                              "the merged pipeline (without --lora-only)")
        base = Path(opts.base_pipeline) if opts.base_pipeline else run.teacher
        if conditioned:
            parts.update(expand_timesteps=run.conditioning == "ti2v", image_encoder=None, image_processor=None)
        pipe = cls.from_pretrained(base, **parts, **dtype_kwarg(dtype),
                                   scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(out / "scheduler"),
                                   boundary_ratio=read_json(out / EXPORT_INFO)["boundary_ratio"])
        for p in run.phases:
            pipe.load_lora_weights(str(out), weight_name=lora_file(p.index, opts.lora_formats[0]),
                                   adapter_name=f"phase{p.index}",
                                   load_into_transformer_2=p.index == 2)
    else:
        pipe = cls.from_pretrained(out, **parts, **dtype_kwarg(dtype))
    _, _, f, h, w = x.shape
    temporal, spatial = (vae.config.scale_factor_temporal, vae.config.scale_factor_spatial) if conditioned else (4, 8)
    extra = {"image": image} if conditioned else {}
    result = pipe(prompt_embeds=text, latents=x, num_inference_steps=run.plan.num_steps, guidance_scale=1.0,
                  height=h * spatial, width=w * spatial, num_frames=(f - 1) * temporal + 1, output_type="latent",
                  return_dict=False, **extra)[0]
    return result.float()


def run(args: argparse.Namespace) -> int:
    """`pdmd export`: 0 done (and --verify passed), 1 --verify failed; user errors raise (the CLI exits 2)."""
    result = export(ExportOptions.from_args(args))
    return 1 if result is not None and result[0] > result[1] else 0


def main(argv: list[str] | None = None) -> int:
    """tools/convert_to_diffusers.py."""
    quiet_known_warnings()
    parser = argparse.ArgumentParser(prog="convert_to_diffusers", description=__doc__.split("\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except UserError as exc:  # ExportError, ConfigError: one line, exit 2
        return report_user_error("convert_to_diffusers", exc)
