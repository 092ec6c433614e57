"""The conditioning image as Wan2.2's image-to-video models consume it, VAE-encoded once, offline.

This follows ``WanImageToVideoPipeline.prepare_latents`` (diffusers 0.42) for a FIRST-FRAME-ONLY
condition (its ``last_image`` branch, first-and-last-frame video, is not implemented), and
``tests/test_data_images.py`` compares the result with that method on tiny VAEs:

- ``i2v`` (Wan2.2 I2V-A14B, ``expand_timesteps=False``): the frame followed by ``num_frames - 1`` zero
  frames is VAE-encoded (``argmax``, i.e. the posterior mean) and normalised with the VAE's
  ``latents_mean`` / ``latents_std``: ``cond_latents`` ``[z, T, h, w]``. ``cond_mask`` ``[4, T, h, w]`` is 1
  on latent frame 0 and 0 elsewhere (the pipeline's ``mask_lat_size``: the 4 channels are the 4 pixel
  frames a latent frame stands for, the first frame repeated). The pipeline's ``condition`` is
  ``cat([cond_mask, cond_latents], dim=channels)`` and the transformer reads ``cat([noisy, condition])``.
- ``ti2v`` (Wan2.2 TI2V-5B, ``expand_timesteps=True``): only the frame is encoded, normalised:
  ``first_frame_latents`` ``[z, 1, h, w]``. ``first_frame_mask`` ``[1, T, h, w]`` is 0 on latent frame 0,
  1 elsewhere; the pipeline feeds ``(1 - mask) * condition + mask * latents`` with per-token timesteps
  ``mask * t``, so the first frame's tokens are the clean condition at t = 0.

``T = (num_frames - 1) // scale_factor_temporal + 1``, ``h, w = H, W // scale_factor_spatial``. The image
is brought to its bucket's ``H x W`` by diffusers' own ``VaeImageProcessor.resize(resize_mode="crop")``
(scale to cover, centre crop, Lanczos) after ``load_image`` (EXIF orientation, RGB); the pipeline,
given that image at that size, resizes nothing. Wan2.2 I2V-A14B and TI2V-5B have no CLIP image
encoder (``image_dim`` is None), so no image embedding is stored.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from data.encoders import parse_dtype
from data.format import COND_KEYS, DTYPE_NAMES, canonical_json, file_sha256
from data.images import Bucket, ImageList, ScanResult, check_bucket_multiples, load_rgb
from data.prompts import PromptList

KINDS = tuple(COND_KEYS)
PATCH = 2  # Wan's transformer patchifies latents 2x2 (patch_size (1, 2, 2) in every released Wan2.x)


def resolve_vae_path(path: str | Path) -> tuple[Path, str | None]:
    """(folder, subfolder) of an AutoencoderKLWan: a diffusers pipeline folder (``vae/``) or the VAE folder."""
    p = Path(path)
    if (p / "vae" / "config.json").is_file():
        return p, "vae"
    if (p / "config.json").is_file():
        return p, None
    raise FileNotFoundError(f"--vae {p} has neither vae/config.json (a local diffusers pipeline folder, e.g. "
                            "Wan2.2-I2V-A14B-Diffusers) nor config.json (the vae folder itself)")


def load_vae(path: str | Path, *, dtype: str = "fp32", device: str | None = None) -> tuple[Any, dict[str, Any]]:
    """Load AutoencoderKLWan from a LOCAL folder; returns (vae, what the index records about it)."""
    from diffusers import AutoencoderKLWan

    folder, sub = resolve_vae_path(path)
    vae_dir = folder / sub if sub else folder
    config = json.loads((vae_dir / "config.json").read_text(encoding="utf-8"))
    if config.get("_class_name") != "AutoencoderKLWan":
        raise ValueError(f"{vae_dir} holds a {config.get('_class_name')!r}, not an AutoencoderKLWan: point --vae at "
                         "a Wan2.x diffusers folder")
    vae = AutoencoderKLWan.from_pretrained(folder, subfolder=sub, torch_dtype=parse_dtype(dtype))
    vae = vae.to(device or ("cuda" if torch.cuda.is_available() else "cpu")).eval()
    weights = sorted(vae_dir.glob("*.safetensors")) or sorted(vae_dir.glob("*.bin"))
    weights_hash = hashlib.sha256("".join(f"{w.name}:{file_sha256(w)}\n" for w in weights).encode()).hexdigest()
    info = {"path": str(folder.resolve()), "subfolder": sub, "dtype": DTYPE_NAMES[parse_dtype(dtype)],
            "config_sha256": hashlib.sha256(canonical_json({k: v for k, v in config.items()
                                                            if not k.startswith("_")})).hexdigest(),
            "weights_sha256": weights_hash}
    return vae, info


class ConditionEncoder:
    """Turns one RGB image and its bucket into the stored conditioning tensors (on CPU)."""

    def __init__(self, vae: Any, kind: str, num_frames: int, *, dtype: torch.dtype = torch.float32,
                 vae_info: dict[str, Any] | None = None):
        from diffusers.video_processor import VideoProcessor

        if kind not in COND_KEYS:
            raise ValueError(f"conditioning {kind!r}: use one of {KINDS}")
        if dtype not in DTYPE_NAMES:
            raise ValueError(f"conditioning dtype {dtype} is not storable: use bf16 or fp32")
        cfg = vae.config
        self.vae, self.kind, self.dtype, self.vae_info = vae, kind, dtype, dict(vae_info or {})
        self.temporal, self.spatial, self.z_dim = cfg.scale_factor_temporal, cfg.scale_factor_spatial, cfg.z_dim
        if num_frames < 1 or (num_frames - 1) % self.temporal:
            good = max(1, (num_frames - 1) // self.temporal * self.temporal + 1)
            raise ValueError(f"--num-frames {num_frames} must be {self.temporal}k+1 (the VAE compresses time "
                             f"{self.temporal}x after the first frame), e.g. {good} or {good + self.temporal}")
        self.num_frames = num_frames
        self.latent_frames = (num_frames - 1) // self.temporal + 1
        # What the pipeline builds in __init__ (vae_scale_factor = the VAE's spatial factor).
        self.processor = VideoProcessor(vae_scale_factor=self.spatial)
        self.mean = torch.tensor(cfg.latents_mean).view(1, self.z_dim, 1, 1, 1)
        self.std = torch.tensor(cfg.latents_std).view(1, self.z_dim, 1, 1, 1)

    @property
    def device(self) -> torch.device:
        return next(self.vae.parameters()).device

    def check_buckets(self, buckets: Sequence[Bucket]) -> None:
        check_bucket_multiples(buckets, self.spatial * PATCH)

    def shapes(self, bucket: Bucket) -> dict[str, list[int]]:
        """Per-sample shapes of the stored tensors for ``bucket`` (the reader checks them)."""
        h, w, t = bucket.height // self.spatial, bucket.width // self.spatial, self.latent_frames
        lat, mask = COND_KEYS[self.kind]
        if self.kind == "i2v":
            return {lat: [self.z_dim, t, h, w], mask: [self.temporal, t, h, w]}
        return {lat: [self.z_dim, 1, h, w], mask: [1, t, h, w]}

    def image_tensor(self, image: Any, bucket: Bucket) -> torch.Tensor:
        """``[1, 3, H, W]`` float32 in [-1, 1]: diffusers' crop-resize to the bucket, then its normalisation."""
        return self.processor.preprocess(image, height=bucket.height, width=bucket.width, resize_mode="crop")

    @torch.no_grad()
    def encode(self, image: Any, bucket: Bucket) -> dict[str, torch.Tensor]:
        """The conditioning of one PIL RGB image (``WanImageToVideoPipeline.prepare_latents``, batch 1)."""
        from diffusers.pipelines.wan.pipeline_wan_i2v import retrieve_latents

        device = self.device
        frame = self.image_tensor(image, bucket).to(device, dtype=torch.float32).unsqueeze(2)  # [1, 3, 1, H, W]
        if self.kind == "i2v":
            zeros = frame.new_zeros(1, 3, self.num_frames - 1, bucket.height, bucket.width)
            video = torch.cat([frame, zeros], dim=2)
        else:
            video = frame
        latents = retrieve_latents(self.vae.encode(video.to(dtype=self.vae.dtype)), sample_mode="argmax")
        latents = latents.to(device=device, dtype=torch.float32)
        # as prepare_latents: float32 mean and 1/std on the device, subtract then multiply (bitwise the same)
        inv_std = 1.0 / self.std.to(device, torch.float32)
        latents = (latents - self.mean.to(device, torch.float32)) * inv_std
        lat_key, mask_key = COND_KEYS[self.kind]
        shapes = self.shapes(bucket)
        mask = torch.zeros(shapes[mask_key], dtype=torch.uint8)
        if self.kind == "i2v":
            mask[:, 0] = 1  # the first (given) frame; later frames are generated
        else:
            mask[:, 1:] = 1  # first_frame_mask: 0 = keep the condition (timestep 0), 1 = denoise
        out = {lat_key: latents[0].to(device="cpu", dtype=self.dtype).contiguous(), mask_key: mask}
        if list(out[lat_key].shape) != shapes[lat_key]:
            raise RuntimeError(f"the VAE gave latents {tuple(out[lat_key].shape)}, expected {shapes[lat_key]}: the "
                               "VAE config's scale factors do not match its layers")
        return out

    def info(self) -> dict[str, Any]:
        return {"kind": self.kind, "num_frames": self.num_frames, "latent_frames": self.latent_frames,
                "dtype": DTYPE_NAMES[self.dtype], "mask_dtype": "uint8", "z_dim": self.z_dim,
                "scale_factor_spatial": self.spatial, "scale_factor_temporal": self.temporal,
                "keys": list(COND_KEYS[self.kind]), "first_frame_only": True,
                "resize": "diffusers load_image + VaeImageProcessor.resize(resize_mode='crop'), lanczos",
                "vae": self.vae_info}


class ImageConditioning:
    """What the shard writer needs for an image dataset: kept rows in shard order, buckets, the encoder."""

    def __init__(self, encoder: ConditionEncoder, images: ImageList, scan: ScanResult, buckets: Sequence[Bucket]):
        self.encoder, self.images, self.scan = encoder, images, scan
        self.buckets = {b.name: b for b in buckets}
        encoder.check_buckets(buckets)
        self.rows = [images.rows[s["row"]] for s in scan.samples]
        self.sample_buckets = [self.buckets[s["bucket"]] for s in scan.samples]

    def prompt_list(self) -> PromptList:
        """The kept prompts in shard order (grouped by bucket), with their source lines."""
        return PromptList([r.prompt for r in self.rows], [r.line for r in self.rows], self.images.blank_lines)

    def shard_ranges(self, samples_per_shard: int) -> list[tuple[int, int]]:
        """``[start, stop)`` per shard: each bucket's run cut into shards, so a shard holds one bucket."""
        ranges, start = [], 0
        for name in self.buckets:
            stop = start + sum(b.name == name for b in self.sample_buckets)
            ranges += [(s, min(s + samples_per_shard, stop)) for s in range(start, stop, samples_per_shard)]
            start = stop
        return ranges

    def encode(self, j: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Tensors and JSON metadata of sample ``j`` (shard order)."""
        row, bucket = self.rows[j], self.sample_buckets[j]
        try:
            image = load_rgb(row.path)
        except Exception as e:
            raise RuntimeError(f"{row.path} (line {row.line}) was readable when the list was scanned but not now "
                               f"({type(e).__name__}: {e}): restore it, or build into a new --out folder") from e
        meta = {"image": row.image, "bucket": bucket.name, "height": bucket.height, "width": bucket.width}
        return self.encoder.encode(image, bucket), meta

    def settings(self) -> dict[str, Any]:
        """What a resumed build must share with the first run (build.json)."""
        info = self.encoder.info()
        return {**{k: info[k] for k in ("kind", "num_frames", "dtype")},
                "vae": {k: info["vae"].get(k) for k in ("config_sha256", "weights_sha256", "dtype")},
                "scan": self.scan.settings,
                "samples_sha256": hashlib.sha256(canonical_json(self.scan.samples)).hexdigest()}

    def index_section(self, shards: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """The index's ``conditioning`` field: how it was made, the buckets with their shapes, what was skipped."""
        counts = {name: sum(s["count"] for s in shards if s.get("bucket") == name) for name in self.buckets}
        return {**self.encoder.info(), "aspect_tolerance": self.scan.settings["aspect_tolerance"],
                "min_image_fraction": self.scan.settings["min_image_fraction"],
                "buckets": [{"name": b.name, "height": b.height, "width": b.width, "count": counts[b.name],
                             "shapes": self.encoder.shapes(b)} for b in self.buckets.values()],
                "skipped": self.scan.report(), "samples_sha256": self.settings()["samples_sha256"]}
