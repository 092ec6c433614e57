"""`pdmd sample`: the few-step sampler of a distilled run, the reference every export is checked against.

Euler over the distilled timesteps, x_{i+1} = x_i + (t_{i+1} - t_i) v, with phase k's expert for the
steps of phase k and CFG 1 unless asked (exactly the rollout the trainer ran). The experts come from
the run directory (Megatron checkpoints, through the trainer's backend; under torchrun at any TP/PP/CP)
or from an export folder (``--export``: diffusers transformers, any phase count). Prompts come as
precomputed ``prompt_embeds`` [B, L, D] (``--embeds``) or as text through the UMT5 encoder, padded with
zeros to 512 tokens as WanPipeline does. Initial noise is ``--latents`` or drawn from ``--seed`` exactly
as WanPipeline draws it with ``generator=torch.Generator("cpu").manual_seed(seed)``.
Writes ``--out`` (safetensors, key ``latents``) and, with a VAE, decoded PNG (one frame) / GIF / MP4 files.

Image-conditioned runs (``data.conditioning`` i2v / ti2v, pdmd/core/conditioning.py) take ``--image`` (encoded by
data/conditioning.py's ConditionEncoder, exactly as WanImageToVideoPipeline.prepare_latents does) or ``--cond``
(the stored tensors); the sampler then feeds ``cond.model_input`` with per-token timesteps and restores the
given first frame (ti2v) after every step, as the trainer's rollout and the pipeline do.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from data.conditioning import ConditionEncoder, load_vae
from data.encoders import load_prompt_encoder
from data.format import COND_KEYS
from data.images import Bucket, load_rgb
from pdmd.core.conditioning import Conditioning
from pdmd.core.sampler import euler_sample
from pdmd.export.layout import ExportError, check_conditioning, read_run
from pdmd.export.pipelines import (
    ExportedExperts,
    decode,
    initial_noise,
    pad_embeds,
    save_media,
    vae_folder,
    vae_scale,
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", "--run-dir", dest="run", help="a finished run directory (experts read from its Megatron "
                     "checkpoints); under torchrun spell it --run-dir (torchrun takes --run for its --run-path)")
    src.add_argument("--export", help="a folder written by tools/convert_to_diffusers.py (not --lora-only)")
    p.add_argument("--out", required=True, help="output .safetensors file (key: latents [B, C, F, H, W])")
    p.add_argument("--embeds", help="safetensors with prompt_embeds [B, L, D] (and optional negative_prompt_embeds)")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable); needs a text encoder")
    p.add_argument("--prompts", help="a text file, one prompt per line")
    p.add_argument("--encoder-path", help="pipeline folder with tokenizer/ and text_encoder/ (default: the export, "
                   "else the run's teacher)")
    p.add_argument("--max-length", type=int, default=512, help="prompt tokens, zero-padded (WanPipeline: 512)")
    p.add_argument("--negative-prompt", default="", help="for --guidance-scale > 1")
    p.add_argument("--guidance-scale", type=float, default=1.0, help="CFG scale; 1 (default) = no CFG, as distilled")
    p.add_argument("--latents", help="safetensors with latents [B, C, F, H, W]: the initial noise")
    p.add_argument("--seed", type=int, default=0, help="noise seed when --latents is not given")
    p.add_argument("--height", type=int, help="pixels (WanPipeline semantics); default: the run's latent shape")
    p.add_argument("--width", type=int)
    p.add_argument("--num-frames", type=int)
    p.add_argument("--vae", help="AutoencoderKLWan folder, or a pipeline folder with vae/: also decode")
    p.add_argument("--video-format", choices=["gif", "mp4"], default="gif", help="for more than one frame")
    p.add_argument("--teacher", help="the run's teacher folder, if it moved since training")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--cp", type=int, default=1)
    p.add_argument("--dtype", choices=["fp32", "bf16"], help="--export only: the transformers' dtype")
    p.add_argument("--image", help="i2v/ti2v runs: the conditioning image, crop-resized to --height/--width (default: "
                   "the latent shape x the VAE's factor) and encoded as WanImageToVideoPipeline does, by --vae (default: the "
                   "export's or the run teacher's vae/)")
    p.add_argument("--cond", help="i2v/ti2v runs: safetensors with the stored conditioning tensors instead of --image "
                   "(cond_latents + cond_mask, or first_frame_latents + first_frame_mask; [B, ...] or one sample)")


# --- the sampler -----------------------------------------------------------------------------------


# --- inputs ------------------------------------------------------------------------------------------
def read_tensors(path: str | Path, what: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if not Path(path).is_file():
        raise ExportError(f"{what} {path}: no such file")
    try:
        return load_file(str(path))
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error classes for bad files
        raise ExportError(f"{what} {path} is not a readable safetensors file ({exc}); write it with "
                          "safetensors.torch.save_file") from None


def prompt_inputs(args: argparse.Namespace, default_encoder: Path | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(prompt_embeds [B, L, D], negative or None) from --embeds or from prompts through the encoder."""
    prompts = list(args.prompt)
    if args.prompts:
        prompts += [line.strip() for line in Path(args.prompts).read_text(encoding="utf-8").splitlines() if line.strip()]
    if args.embeds and prompts:
        raise ExportError("give --embeds or prompts (--prompt / --prompts), not both")
    need_negative = args.guidance_scale > 1.0
    if args.embeds:
        data = read_tensors(args.embeds, "--embeds")
        if "prompt_embeds" not in data or data["prompt_embeds"].dim() != 3:
            raise ExportError(f"--embeds {args.embeds} must hold prompt_embeds [B, L, D]; it has {sorted(data)}")
        neg = data.get("negative_prompt_embeds")
        if need_negative and neg is None:
            raise ExportError(f"--guidance-scale {args.guidance_scale} needs negative_prompt_embeds in --embeds")
        return data["prompt_embeds"].float(), (neg.float() if neg is not None else None)
    if not prompts:
        raise ExportError("nothing to sample: give --embeds FILE.safetensors, --prompt TEXT or --prompts FILE")

    path = args.encoder_path or default_encoder
    if path is None or not (Path(path) / "text_encoder").is_dir():
        raise ExportError(f"prompts need a UMT5 text encoder: pass --encoder-path DIR (a pipeline folder with "
                          f"tokenizer/ and text_encoder/){'' if path is None else f'; {path} has none'}")
    enc = load_prompt_encoder("umt5", path, dtype="fp32", device="cpu", max_length=args.max_length)
    embeds = pad_embeds(enc.encode(prompts), args.max_length)
    negative = pad_embeds(enc.encode([args.negative_prompt] * len(prompts)), args.max_length) if need_negative else None
    return embeds, negative


def noise_shape(args: argparse.Namespace, batch: int, channels: int, default: list[int],
                vae_scale: tuple[int, int]) -> tuple[int, ...]:
    """[B, C, F, H, W] from --height/--width/--num-frames as WanPipeline converts them, else ``default``."""
    given = [args.height, args.width, args.num_frames]
    if not any(v is not None for v in given):
        return (batch, channels, *default[1:])
    if any(v is None for v in given):
        raise ExportError("give all of --height, --width and --num-frames (or none: the run's latent shape)")
    temporal, spatial = vae_scale
    for name, value in (("--height", args.height), ("--width", args.width)):
        if value < spatial or value % spatial:
            raise ExportError(f"{name} {value} must be a positive multiple of {spatial} (the VAE's spatial factor), "
                              f"e.g. {max(spatial, value // spatial * spatial)}")
    if args.num_frames < 1 or (args.num_frames - 1) % temporal:
        raise ExportError(f"--num-frames {args.num_frames} must be {temporal}k+1 (the VAE's temporal factor {temporal}), "
                          f"e.g. {(max(args.num_frames, 1) - 1) // temporal * temporal + 1}")
    return (batch, channels, (args.num_frames - 1) // temporal + 1, args.height // spatial, args.width // spatial)


# --- image conditioning ---------------------------------------------------------------------------------


def read_cond(path: str | Path, kind: str) -> Conditioning:
    """--cond: the stored conditioning tensors (data/format.py's COND_KEYS, one sample or a batch)."""

    data = read_tensors(path, "--cond")
    held = [k for k, keys in COND_KEYS.items() if all(key in data for key in keys)]
    if not held:
        want = " or ".join(f"{' + '.join(keys)} ({k})" for k, keys in COND_KEYS.items())
        raise ExportError(f"--cond {path} must hold {want}; it has {sorted(data)}")
    if held[0] != kind:
        raise ExportError(f"--cond {path} holds {held[0]} conditioning, but this model is {kind}")
    batch = {key: data[key] if data[key].dim() == 5 else data[key][None] for key in COND_KEYS[kind]}
    if any(v.dim() != 5 for v in batch.values()) or len({v.shape[0] for v in batch.values()}) != 1:
        raise ExportError(f"--cond {path}: {', '.join(f'{k} {list(data[k].shape)}' for k in COND_KEYS[kind])} are not "
                          "[C, T, h, w] (one sample) or [B, C, T, h, w] with the same B")
    return Conditioning.from_batch(batch)


def encode_image(path: str | Path, vae_dir: Path, kind: str, height: int, width: int, num_frames: int,
                 device: torch.device | str | None = None) -> Conditioning:
    """--image through data/conditioning.py's ConditionEncoder: diffusers' crop-resize to height x width and
    the VAE encoding of WanImageToVideoPipeline.prepare_latents, bit for bit what the shards store."""

    if not Path(path).is_file():
        raise ExportError(f"--image {path}: no such file")
    try:
        image = load_rgb(Path(path))
    except Exception as exc:  # noqa: BLE001 - PIL raises many kinds
        raise ExportError(f"--image {path}: cannot read it as an image ({type(exc).__name__}: {exc})") from exc
    try:
        vae, info = load_vae(vae_dir, device=None if device is None else str(device))
    except (OSError, ValueError) as exc:
        raise ExportError(f"--image needs the VAE: {exc}") from exc
    bucket = Bucket(height, width)
    try:
        encoder = ConditionEncoder(vae, kind, num_frames, vae_info=info)
        encoder.check_buckets([bucket])
    except ValueError as exc:
        raise ExportError(f"--image at {height}x{width}, {num_frames} frames: {exc}") from exc
    stored = encoder.encode(image, bucket)
    return Conditioning.from_batch({k: v[None] for k, v in stored.items()})


def conditioning_source(args: argparse.Namespace, kind: str | None, default_vae: Path | None) -> Path | None:
    """Check --image/--cond against the model's conditioning; the VAE folder that will encode --image."""
    if args.image and args.cond:
        raise ExportError("give --image or --cond, not both")
    if kind is None:
        if args.image or args.cond:
            raise ExportError("--image/--cond: this model is text-to-video (its run records no data.conditioning)")
        return None
    if not (args.image or args.cond):
        raise ExportError(f"this model is image-conditioned ({kind}): give --image PATH (encoded with the VAE of "
                          "--vae, else the export's/teacher's vae/) or --cond FILE (stored conditioning tensors)")
    if not args.image:
        return None
    if not Path(args.image).is_file():
        raise ExportError(f"--image {args.image}: no such file")
    where = args.vae or default_vae
    if where is None or not ((Path(where) / "vae" / "config.json").is_file() or (Path(where) / "config.json").is_file()):
        raise ExportError(f"--image needs the VAE that encodes it: pass --vae DIR (an AutoencoderKLWan folder or a "
                          f"pipeline folder with vae/){'' if where is None else f'; {where} has none'}")
    return vae_folder(where)


def check_cond_shape(cond: Conditioning, x: torch.Tensor) -> Conditioning:
    if len(cond) not in (1, x.shape[0]):
        raise ExportError(f"{len(cond)} conditionings for {x.shape[0]} samples: give one, or one per sample")
    want = cond.latent_shape(x.shape[1])
    if tuple(x.shape[1:]) != tuple(want):
        raise ExportError(f"the latents are {list(x.shape[1:])} but the conditioning is for {list(want)}: give "
                          "--latents/--height/--width/--num-frames of the conditioning's size")
    return cond.expand(x.shape[0])


# --- the command ---------------------------------------------------------------------------------------
def sample(args: argparse.Namespace) -> tuple[torch.Tensor | None, dict[str, str]]:
    """Run the sampler as asked; returns (latents on rank 0 else None, metadata for the output file)."""
    if args.export:
        experts = ExportedExperts(args.export, args.dtype)
        plan, velocity, default_shape = experts.plan, experts.velocity, None
        channels, encoder, kind = experts.latent_channels(), Path(args.export), experts.conditioning
        source = {"export": str(Path(args.export).resolve())}
        model_cfg = experts.config()
        check_conditioning(kind, model_cfg, f"--export {args.export}")
    else:
        # lazy: Megatron loads in seconds; --help stays fast
        from megatron_adapters.experts import RunExperts

        run = read_run(args.run, args.teacher, check_hashes=False)
        plan, default_shape = run.plan, list(run.config["train"]["latent_shape"])
        expert_cfg = json.loads((run.expert_folder(0) / "config.json").read_text())
        channels = int(expert_cfg.get("out_channels") or expert_cfg.get("in_channels", 16))
        encoder, kind = run.teacher, run.conditioning
        source = {"run": str(run.path.resolve())}
        model_cfg = expert_cfg
        check_conditioning(kind, expert_cfg, f"--run {args.run}")
    cond_vae = conditioning_source(args, kind, encoder)
    text, negative = prompt_inputs(args, encoder)
    width = int(model_cfg.get("text_dim") or model_cfg.get("joint_attention_dim") or text.shape[-1])
    if text.shape[-1] != width:
        raise ExportError(f"the prompt embeddings are {text.shape[-1]} wide but the model takes text_dim {width}: "
                          "were they encoded with this model's text encoder?")
    scale = vae_scale(cond_vae or vae_folder(args.vae))
    cond = read_cond(args.cond, kind) if args.cond else None
    if args.latents:
        x = read_tensors(args.latents, "--latents").get("latents")
        if x is None or x.dim() != 5:
            raise ExportError(f"--latents {args.latents} must hold latents [B, C, F, H, W]")
    elif cond is not None and all(v is None for v in (args.height, args.width, args.num_frames)):
        x = initial_noise((text.shape[0], *cond.latent_shape(channels)), args.seed)
    else:
        if default_shape is None and args.height is None:
            raise ExportError("--export without --latents needs --height, --width and --num-frames")
        x = initial_noise(noise_shape(args, text.shape[0], channels, default_shape or [], scale), args.seed)
    if x.shape[0] != text.shape[0]:
        raise ExportError(f"{x.shape[0]} initial latents but {text.shape[0]} prompt embeddings: give one per prompt")
    if x.shape[1] != channels:
        raise ExportError(f"latents have {x.shape[1]} channels, the model takes {channels}")
    device = None
    if not args.export:
        experts = RunExperts(run, tp=args.tp, pp=args.pp, cp=args.cp, latent_shape=tuple(x.shape[1:]))
        velocity, device = experts.velocity, experts.backend.device
        x, text = x.to(device), text.to(device)
        negative = negative.to(device) if negative is not None else None
    if args.image:  # after the backend: under torchrun each rank encodes on its own device
        temporal, spatial = scale
        frames, h, w = x.shape[2:]
        cond = encode_image(args.image, cond_vae, kind, args.height or h * spatial, args.width or w * spatial,
                            args.num_frames or (frames - 1) * temporal + 1, device=device)
    if cond is not None:
        cond = check_cond_shape(cond, x)
    latents = euler_sample(velocity, plan, x, text, negative, args.guidance_scale, cond).cpu()
    meta = {**source, "timesteps": json.dumps(list(plan.timesteps)), "guidance_scale": str(args.guidance_scale),
            "seed": "" if args.latents else str(args.seed), "conditioning": kind or "",
            "image": str(args.image or ""), "cond": str(args.cond or "")}
    import torch.distributed as dist

    return (latents if not dist.is_initialized() or dist.get_rank() == 0 else None), meta


def run(args: argparse.Namespace) -> int:
    try:
        latents, meta = sample(args)
    except ExportError as exc:
        print(f"pdmd sample: {exc}", file=sys.stderr)
        return 2
    if latents is None:
        return 0
    from safetensors.torch import save_file

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({"latents": latents.contiguous()}, str(out), metadata=meta)
    print(f"pdmd sample: wrote {out} (latents {list(latents.shape)})")
    vae = vae_folder(args.vae)
    if vae is not None:
        for path in save_media(decode(latents, vae), out, args.video_format):
            print(f"pdmd sample: wrote {path}")
    return 0
