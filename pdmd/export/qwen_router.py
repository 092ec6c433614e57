"""One Qwen-Image transformer per distilled phase behind QwenImagePipeline's single ``transformer`` slot.

QwenImagePipeline has one transformer; a Phased DMD run has one expert per phase. This module routes each
call by its timestep to the phase owning it, so ``QwenImagePipeline.from_pretrained(EXPORT,
trust_remote_code=True)`` runs exactly our few-step sampler. It imports only torch and diffusers: the
export copies this file into ``transformer/`` (diffusers loads a component's class from a ``<name>.py``
next to its weights when ``trust_remote_code=True``), so an export loads without phased-dmd installed.

Routing. The pipeline feeds ``timestep = t / 1000`` (float32 sigma, the same for the whole batch). Phase
k owns the sigmas in ``(phase_boundaries[k-1], phase_boundaries[k-2]]``; each boundary lies midway between
the last step of one phase and the first of the next, far from every float32 rounding of the steps.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import QwenImageTransformer2DModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.cache_utils import CacheMixin
from diffusers.models.modeling_utils import ModelMixin
from torch import nn


class PhasedQwenImageTransformer2DModel(ModelMixin, ConfigMixin, CacheMixin):
    """``experts[k - 1]`` (a QwenImageTransformer2DModel) runs the steps of phase k."""

    _no_split_modules = ["QwenImageTransformerBlock"]
    _skip_layerwise_casting_patterns = ["pos_embed", "norm"]

    @register_to_config
    def __init__(self, expert_config: dict[str, Any] | None = None, phase_boundaries: list[float] | None = None,
                 in_channels: int = 64, out_channels: int = 16, patch_size: int = 2,
                 guidance_embeds: bool = False) -> None:
        super().__init__()
        expert_config = {k: v for k, v in (expert_config or {}).items() if not k.startswith("_")}
        bounds = [float(b) for b in (phase_boundaries or [])]
        if any(a <= b for a, b in zip(bounds, bounds[1:])) or any(not 0 < b < 1 for b in bounds):
            raise ValueError(f"phase_boundaries {bounds} must decrease strictly inside (0, 1)")
        # what QwenImagePipeline reads from transformer.config must be the experts' own values
        mirrored = {"in_channels": in_channels, "out_channels": out_channels, "patch_size": patch_size,
                    "guidance_embeds": guidance_embeds}
        for key, value in mirrored.items():
            if key in expert_config and expert_config[key] != value:
                raise ValueError(f"{key}={value} differs from the experts' {expert_config[key]}")
        self.experts = nn.ModuleList(QwenImageTransformer2DModel(**{**expert_config, **mirrored})
                                     for _ in range(len(bounds) + 1))

    def phase_of(self, timestep: torch.Tensor) -> int:
        """The 1-based phase owning ``timestep`` (sigma in [0, 1]); every sample of a call must share it."""
        bounds = self.config.phase_boundaries or []
        phases = {1 + sum(float(s) < b for b in bounds) for s in timestep.flatten().tolist()}
        if len(phases) != 1:
            raise ValueError(f"one call mixes timesteps of phases {sorted(phases)}: call once per phase")
        return phases.pop()

    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor, **kwargs: Any):
        return self.experts[self.phase_of(timestep) - 1](hidden_states=hidden_states, timestep=timestep, **kwargs)
