"""What the diffusers pipelines do, for reading an export back: phase experts as diffusers transformers
(an export folder or a teacher's), the noise WanPipeline draws for a seed, prompt padding, and VAE decoding
to frames and media files. The sampler and the export's verification both stand on it."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from pdmd.core.conditioning import Conditioning
from pdmd.core.schedule import PhasePlan
from pdmd.export.files import dtype_kwarg
from pdmd.export.layout import EXPORT_INFO, ExportError, conditioning_kind

WAN_SCALE = (4, 8)  # WanPipeline's temporal / spatial VAE factors when it has no VAE


def initial_noise(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """What WanPipeline.prepare_latents draws with a CPU generator seeded by ``seed`` (float32)."""
    from diffusers.utils.torch_utils import randn_tensor

    return randn_tensor(shape, generator=torch.Generator("cpu").manual_seed(seed), device=torch.device("cpu"),
                        dtype=torch.float32)


def pad_embeds(embeds: list[torch.Tensor], max_length: int) -> torch.Tensor:
    """Trimmed [L_i, D] embeddings -> [B, max_length, D], zero-padded like WanPipeline._get_t5_prompt_embeds."""
    out = embeds[0].new_zeros(len(embeds), max_length, embeds[0].shape[-1])
    for i, e in enumerate(embeds):
        out[i, : min(len(e), max_length)] = e[:max_length]
    return out.float()


def diffusers_velocity(model, x: torch.Tensor, t: torch.Tensor, text: torch.Tensor, dtype: torch.dtype,
                       cond: Conditioning | None = None) -> torch.Tensor:
    """v of a diffusers WanTransformer3DModel fed ``1000 t``, with the inputs WanImageToVideoPipeline builds
    for a conditioning (i2v: channels cat; ti2v: first frame replaced, per-token timesteps [B, S])."""
    ts = t * 1000.0
    if cond is not None:
        x, ts = cond.model_input(x), cond.timesteps(ts, tuple(model.config.patch_size))
    return model(x.to(dtype), ts, text.to(dtype), return_dict=False)[0].float()


class DiffusersExperts:
    """Phase k's diffusers WanTransformer3DModel per phase: an export's students, or a teacher folder's
    experts (:meth:`from_folders`) for checking the sampler against the pipelines themselves."""

    def __init__(self, models: dict, plan: PhasePlan, dtype: torch.dtype = torch.float32,
                 conditioning: str | None = None) -> None:
        self.models, self.plan, self.dtype, self.conditioning = models, plan, dtype, conditioning

    @classmethod
    def from_folders(cls, folders: dict[int, str | Path], plan: PhasePlan, dtype: torch.dtype = torch.float32,
                     conditioning: str | None = None) -> DiffusersExperts:
        from diffusers import WanTransformer3DModel

        models = {k: WanTransformer3DModel.from_pretrained(f, **dtype_kwarg(dtype)).eval() for k, f in folders.items()}
        return cls(models, plan, dtype, conditioning)

    def config(self) -> dict:
        return dict(self.models[min(self.models)].config)

    def in_channels(self) -> int:
        return int(self.config()["in_channels"])

    def latent_channels(self) -> int:
        """Channels of the generated latents (the noise): out_channels (I2V reads more than it makes)."""
        cfg = self.config()
        return int(cfg.get("out_channels") or cfg["in_channels"])

    @torch.no_grad()
    def velocity(self, k: int, x: torch.Tensor, t: torch.Tensor, text: torch.Tensor,
                 cond: Conditioning | None = None) -> torch.Tensor:
        return diffusers_velocity(self.models[k], x, t, text, self.dtype, cond)


class ExportedExperts(DiffusersExperts):
    """Phase k's diffusers WanTransformer3DModel from an export folder (``pdmd_export.json`` says where)."""

    def __init__(self, folder: str | Path, dtype: str | None = None) -> None:
        self.folder = Path(folder)
        info_path = self.folder / EXPORT_INFO
        if not info_path.is_file():
            raise ExportError(f"--export {self.folder}: no {EXPORT_INFO}; is this a folder written by "
                              "tools/convert_to_diffusers.py?")
        self.info = json.loads(info_path.read_text())
        if self.info["kind"] == "lora":
            raise ExportError(f"--export {self.folder} holds LoRA files only: load them into the base pipeline "
                              "(docs/export.md), or sample the run with --run")
        plan = PhasePlan(tuple(self.info["timesteps"]), tuple(self.info["boundaries"]))
        torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype or self.info.get("dtype", "fp32")]
        built = DiffusersExperts.from_folders({p["index"]: self.folder / p["folder"] for p in self.info["phases"]},
                                              plan, torch_dtype)
        super().__init__(built.models, plan, torch_dtype, conditioning_kind(self.info.get("conditioning")))


def vae_folder(path: str | Path | None) -> Path | None:
    if path is None:
        return None
    p = Path(path)
    if (p / "vae" / "config.json").is_file():
        return p / "vae"
    if (p / "config.json").is_file():
        return p
    raise ExportError(f"--vae {p}: neither an AutoencoderKLWan folder nor a pipeline folder with vae/")


def decode(latents: torch.Tensor, vae_dir: Path):
    """Frames [B, F, H, W, 3] in [0, 1] (numpy), decoded exactly as WanPipeline does for output_type="np"."""
    from diffusers import AutoencoderKLWan
    from diffusers.video_processor import VideoProcessor

    vae = AutoencoderKLWan.from_pretrained(vae_dir, **dtype_kwarg(torch.float32)).eval()
    z = vae.config.z_dim
    mean = torch.tensor(vae.config.latents_mean).view(1, z, 1, 1, 1)
    std = 1.0 / torch.tensor(vae.config.latents_std).view(1, z, 1, 1, 1)
    with torch.no_grad():
        video = vae.decode(latents.float() / std + mean, return_dict=False)[0]
    return VideoProcessor(vae_scale_factor=vae.config.scale_factor_spatial).postprocess_video(video, output_type="np")


def save_media(frames, out: Path, video_format: str) -> list[Path]:
    """One PNG (a single frame), GIF (Pillow) or MP4 (imageio, when installed) per sample, next to ``out``."""
    from PIL import Image

    written = []
    for i, clip in enumerate(frames):
        images = [Image.fromarray((f * 255).round().clip(0, 255).astype("uint8")) for f in clip]
        if len(images) == 1:
            path = out.with_name(f"{out.stem}_{i}.png")
            images[0].save(path)
        elif video_format == "gif":
            path = out.with_name(f"{out.stem}_{i}.gif")
            images[0].save(path, save_all=True, append_images=images[1:], duration=62, loop=0)
        else:
            from diffusers.utils import export_to_video

            path = out.with_name(f"{out.stem}_{i}.mp4")
            try:
                export_to_video(list(clip), str(path), fps=16)
            except ImportError as exc:
                raise ExportError(f"MP4 needs imageio and imageio-ffmpeg ({exc}); use --video-format gif") from exc
        written.append(path)
    return written


def vae_scale(vae_dir: Path | None) -> tuple[int, int]:
    """(temporal, spatial) factors of an AutoencoderKLWan folder; WanPipeline's defaults without one."""
    if vae_dir is None:
        return WAN_SCALE
    cfg = json.loads((vae_dir / "config.json").read_text())
    return cfg.get("scale_factor_temporal", 4), cfg.get("scale_factor_spatial", 8)
