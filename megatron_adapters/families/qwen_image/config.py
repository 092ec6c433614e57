"""Qwen-Image's architecture, read from a diffusers ``config.json``, and the Megatron config for it."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch

from megatron_adapters.layers.transformer_config import dit_transformer_config

# diffusers' QwenImageTransformer2DModel defaults (Qwen-Image, 20B), so a sparse config.json reads right.
_DEFAULTS: dict[str, Any] = dict(
    patch_size=2, in_channels=64, out_channels=16, num_layers=60, attention_head_dim=128, num_attention_heads=24,
    joint_attention_dim=3584, guidance_embeds=False, axes_dims_rope=(16, 56, 56), zero_cond_t=False,
    use_additional_t_cond=False, use_layer3d_rope=False,
)
# Options of newer diffusers releases that Qwen-Image and Qwen-Image-Edit leave off; each changes the
# function (per-token condition timesteps, an extra timestep embedding, layered RoPE, a guidance input).
_UNSUPPORTED = {
    "zero_cond_t": "zero_cond_t=True (zero timestep for condition-image tokens, Qwen-Image-Edit-2511 style)",
    "use_additional_t_cond": "use_additional_t_cond=True (an extra timestep-condition embedding)",
    "use_layer3d_rope": "use_layer3d_rope=True (Qwen-Image-Layered RoPE)",
    "guidance_embeds": "guidance_embeds=True (diffusers builds no guidance embedder for it either)",
}
EPS = 1e-6  # every norm of the model (blocks, q/k, txt_norm, norm_out)
TIMESTEP_CHANNELS = 256


@dataclasses.dataclass(frozen=True)
class QwenImageConfig:
    patch_size: int
    in_channels: int
    out_channels: int
    num_layers: int
    attention_head_dim: int
    num_attention_heads: int
    joint_attention_dim: int
    guidance_embeds: bool
    axes_dims_rope: tuple[int, int, int]
    zero_cond_t: bool
    use_additional_t_cond: bool
    use_layer3d_rope: bool

    @property
    def hidden_size(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def ffn_dim(self) -> int:
        return 4 * self.hidden_size  # diffusers FeedForward(mult=4)

    @property
    def eps(self) -> float:
        return EPS

    @property
    def out_features(self) -> int:
        """Per token: a patch_size x patch_size patch of out_channels."""
        return self.patch_size * self.patch_size * self.out_channels

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> QwenImageConfig:
        """From a diffusers config dict; keys starting with '_' (class name, versions) are ignored."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in raw if not k.startswith("_") and k not in known)
        if unknown:
            raise ValueError(f"unknown QwenImageTransformer2DModel config keys {unknown}: "
                             "is this a Qwen-Image transformer config?")
        values = {**_DEFAULTS, **{k: v for k, v in raw.items() if k in known}}
        values["axes_dims_rope"] = tuple(values["axes_dims_rope"])
        values["out_channels"] = values["out_channels"] or values["in_channels"]
        cfg = cls(**values)
        cfg.validate()
        return cfg

    @classmethod
    def from_json(cls, path: str | Path) -> QwenImageConfig:
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"no Qwen-Image transformer config at {path}: pass the transformer folder "
                                    "or its config.json")
        return cls.from_dict(json.loads(path.read_text()))

    def validate(self) -> None:
        for key, what in _UNSUPPORTED.items():
            if getattr(self, key):
                raise ValueError(f"{key}: {what} is not supported; Qwen-Image's config has {key}=false")
        if len(self.axes_dims_rope) != 3 or any(a % 2 for a in self.axes_dims_rope):
            raise ValueError(f"axes_dims_rope={self.axes_dims_rope}: expected three even sizes (frame, height, width)")
        if sum(self.axes_dims_rope) != self.attention_head_dim:
            raise ValueError(f"axes_dims_rope={self.axes_dims_rope} sums to {sum(self.axes_dims_rope)}, "
                             f"but attention_head_dim is {self.attention_head_dim}: they must be equal")

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["axes_dims_rope"] = list(self.axes_dims_rope)
        return out


def transformer_config(cfg: QwenImageConfig, parallel_kwargs: dict[str, Any], *,
                       params_dtype: torch.dtype = torch.float32, **overrides: Any):
    """Megatron TransformerConfig for ``cfg`` under the layout in ``parallel_kwargs``.

    The sizes, GELU-tanh MLP and bias settings are Wan's (same builder). ``qk_layernorm`` is on: the
    per-head q/k RMSNorm weights are replicated over TP while each rank normalises its own heads, so
    ``finalize_model_grads`` sums their gradients over TP (it picks them by the ``q_layernorm`` /
    ``k_layernorm`` names, Megatron's own convention).
    """
    return dit_transformer_config(cfg, parallel_kwargs, params_dtype=params_dtype,
                                  **{"qk_layernorm": True, **overrides})
