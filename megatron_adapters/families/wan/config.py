"""The Wan DiT's architecture, read from a diffusers ``config.json``, and the Megatron config for it."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import torch

from megatron_adapters.layers.transformer_config import dit_transformer_config

# diffusers' WanTransformer3DModel defaults (the T2V-A14B expert), so a sparse config.json reads right.
_DEFAULTS: dict[str, Any] = dict(
    patch_size=(1, 2, 2), num_attention_heads=40, attention_head_dim=128, in_channels=16, out_channels=16,
    text_dim=4096, freq_dim=256, ffn_dim=13824, num_layers=40, cross_attn_norm=True,
    qk_norm="rms_norm_across_heads", eps=1e-6, image_dim=None, added_kv_proj_dim=None,
    rope_max_seq_len=1024, pos_embed_seq_len=None,
)


@dataclasses.dataclass(frozen=True)
class WanConfig:
    patch_size: tuple[int, int, int]
    num_attention_heads: int
    attention_head_dim: int
    in_channels: int
    out_channels: int
    text_dim: int
    freq_dim: int
    ffn_dim: int
    num_layers: int
    cross_attn_norm: bool
    qk_norm: str | None
    eps: float
    image_dim: int | None
    added_kv_proj_dim: int | None
    rope_max_seq_len: int
    pos_embed_seq_len: int | None

    @property
    def hidden_size(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def patch_volume(self) -> int:
        return math.prod(self.patch_size)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> WanConfig:
        """From a diffusers config dict; keys starting with '_' (class name, versions) are ignored."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in raw if not k.startswith("_") and k not in known)
        if unknown:
            raise ValueError(f"unknown WanTransformer3DModel config keys {unknown}: is this a Wan transformer config?")
        values = {**_DEFAULTS, **{k: v for k, v in raw.items() if k in known}}
        values["patch_size"] = tuple(values["patch_size"])
        values["out_channels"] = values["out_channels"] or values["in_channels"]
        cfg = cls(**values)
        cfg.validate()
        return cfg

    @classmethod
    def from_json(cls, path: str | Path) -> WanConfig:
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"no Wan transformer config at {path}: pass the transformer folder or its config.json")
        return cls.from_dict(json.loads(path.read_text()))

    def validate(self) -> None:
        if self.qk_norm != "rms_norm_across_heads":
            raise ValueError(f"qk_norm={self.qk_norm!r}: only 'rms_norm_across_heads' (all Wan2.x releases) is supported")
        if self.attention_head_dim % 2:
            raise ValueError(f"attention_head_dim={self.attention_head_dim} must be even for rotary embeddings")
        if (self.image_dim is None) != (self.added_kv_proj_dim is None):
            raise ValueError("image_dim and added_kv_proj_dim come together (Wan2.1 I2V): set both or neither")
        if len(self.patch_size) != 3:
            raise ValueError(f"patch_size={self.patch_size}: expected (t, h, w)")

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["patch_size"] = list(self.patch_size)
        return out


def transformer_config(cfg: WanConfig, parallel_kwargs: dict[str, Any], *, params_dtype: torch.dtype = torch.float32,
                       **overrides: Any):
    """Megatron TransformerConfig of a Wan expert under the layout in ``parallel_kwargs``: LayerNorm, biased
    linears, tanh-GELU FFN (megatron_adapters/layers/transformer_config.py)."""
    return dit_transformer_config(cfg, parallel_kwargs, params_dtype=params_dtype, **overrides)
