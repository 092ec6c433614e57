"""Image conditioning as every role sees it (Wan2.2 I2V-A14B and TI2V-5B), with no model code.

The shards carry what WanImageToVideoPipeline builds (data/conditioning.py). Two ways to use it:

- ``i2v`` (I2V-A14B): the transformer reads ``cat([x, mask, image_latents])`` on the channel axis;
  nothing else changes.
- ``ti2v`` (TI2V-5B, expand_timesteps): the first latent frame IS the clean image latent at t = 0. Before
  every pass the first frame of x is replaced by it and its tokens get timestep 0 (per-token
  timesteps); after every Euler step and every re-noising it is put back, so it stays exactly the
  condition; and the losses ignore it (those tokens are given, not generated).

A :class:`Conditioning` travels with a batch through rollout, generator and fake steps; ``index``
cuts it into the micro-batches the backend runs.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

KINDS = ("i2v", "ti2v")


@dataclass
class Conditioning:
    kind: str
    latents: torch.Tensor  # i2v: [B, 4 + z, T, h, w] (mask, then image latents); ti2v: [B, z, 1, h, w]
    mask: torch.Tensor | None = None  # ti2v: [B, 1, T, h, w], 0 on the conditioning frame, 1 elsewhere

    @classmethod
    def from_batch(cls, batch: Mapping[str, torch.Tensor], device: torch.device | str = "cpu") -> Conditioning | None:
        """The batch's conditioning (data/loader.py keys), or None for a text-only batch."""
        if "cond_latents" in batch:
            latents = torch.cat([batch["cond_mask"].float(), batch["cond_latents"].float()], dim=1)
            return cls("i2v", latents.to(device))
        if "first_frame_latents" in batch:
            return cls("ti2v", batch["first_frame_latents"].float().to(device), batch["first_frame_mask"].float().to(device))
        return None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"conditioning kind {self.kind!r}: choose one of {KINDS}")
        if self.kind == "ti2v" and self.mask is None:
            raise ValueError("ti2v conditioning needs the first-frame mask")

    def __len__(self) -> int:
        return self.latents.shape[0]

    def latent_shape(self, channels: int) -> tuple[int, ...]:
        """Shape of one generated latent: (channels, T, h, w) from the conditioning's own size (buckets)."""
        ref = self.mask if self.kind == "ti2v" else self.latents
        return (channels, *ref.shape[2:])

    def index(self, idx: torch.Tensor | slice) -> Conditioning:
        return Conditioning(self.kind, self.latents[idx], None if self.mask is None else self.mask[idx])

    def expand(self, batch: int) -> Conditioning:
        """One conditioning repeated for ``batch`` samples (``pdmd sample --image`` with several seeds)."""
        if len(self) == batch:
            return self
        if len(self) != 1:
            raise ValueError(f"cannot expand a conditioning of {len(self)} samples to {batch}")
        return Conditioning(self.kind, self.latents.expand(batch, *self.latents.shape[1:]),
                            None if self.mask is None else self.mask.expand(batch, *self.mask.shape[1:]))

    # -- what the model sees -------------------------------------------------------------------------
    def clamp(self, x: torch.Tensor) -> torch.Tensor:
        """x with its given part restored (ti2v: the first frame is the image latent); i2v: x."""
        if self.kind != "ti2v":
            return x
        mask = self.mask.to(x.dtype)
        return (1 - mask) * self.latents.to(x.dtype) + mask * x

    def model_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "i2v":
            return torch.cat([x, self.latents.to(x.dtype)], dim=1)
        return self.clamp(x)

    def timesteps(self, t: torch.Tensor, patch: tuple[int, int, int]) -> torch.Tensor:
        """[B] for i2v; per-token [B, S] for ti2v (0 on the conditioning frame's tokens), laid out as
        the model's patchify orders tokens (frames, then rows, then columns)."""
        if self.kind != "ti2v":
            return t
        pt, ph, pw = patch
        per_token = self.mask[:, 0, ::pt, ::ph, ::pw].flatten(1).to(t.dtype)
        return per_token * t.view(-1, 1)

    def loss_weight(self, like: torch.Tensor) -> torch.Tensor | None:
        """Elementwise weight of the generated part (None: all of it), broadcastable to ``like``."""
        if self.kind != "ti2v":
            return None
        return self.mask.to(like.dtype).expand_as(like)


def masked_mean(values: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """Mean of ``values`` over the generated elements only (all of them without a weight)."""
    if weight is None:
        return values.mean()
    return (values * weight).sum() / weight.sum().clamp(min=1)
