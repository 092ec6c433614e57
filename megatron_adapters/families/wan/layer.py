"""One Wan DiT block as a Megatron-core module built from a ModuleSpec.

Sequence layout is Megatron's [s, b, h]. Q/K/V are Column-parallel (heads split over TP; the fused
QKV weight is laid out per head as [q_h; k_h; v_h] like Megatron's, so any TP dividing the heads takes
a contiguous slice), output projections Row-parallel. The text (and image) context is replicated on
every TP rank, so its K/V projections are built with sequence parallelism off.

    x = x + gate_msa * SelfAttn(LN(x) * (1 + scale_msa) + shift_msa, rope)
    x = x + CrossAttn(LN_affine(x), text [, image])
    x = x + gate_ff  * FFN(LN(x) * (1 + scale_ff) + shift_ff)
with (shift, scale, gate) x 2 = scale_shift_table + time projection (per sample, or per token for TI2V).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module


@dataclass
class WanSelfAttentionSubmodules:
    linear_qkv: type | ModuleSpec
    q_norm: type | ModuleSpec
    k_norm: type | ModuleSpec
    core_attention: type | ModuleSpec
    linear_proj: type | ModuleSpec


@dataclass
class WanCrossAttentionSubmodules:
    linear_q: type | ModuleSpec
    linear_kv: type | ModuleSpec
    q_norm: type | ModuleSpec
    k_norm: type | ModuleSpec
    core_attention: type | ModuleSpec
    linear_proj: type | ModuleSpec
    added_k_norm: type | ModuleSpec | None = None  # image context (Wan2.1-style I2V), when configured


@dataclass
class WanLayerSubmodules:
    self_attention: ModuleSpec
    cross_attention: ModuleSpec
    cross_attn_norm: type | ModuleSpec
    mlp: ModuleSpec


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved channel pairs (2i, 2i+1) of x [s, b, heads, d] by angles given as cos/sin
    [s, 1, 1, d/2] (Wan's convention), in fp32."""
    x32 = x.float()
    x1, x2 = x32[..., 0::2], x32[..., 1::2]
    out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)
    return out.to(x.dtype)


def _column(config, spec, in_size: int, out_size: int):
    return build_module(spec, in_size, out_size, config=config, init_method=config.init_method, bias=True,
                        gather_output=False, skip_bias_add=False, is_expert=False)


def _row(config, spec, in_size: int, out_size: int):
    return build_module(spec, in_size, out_size, config=config, init_method=config.output_layer_init_method,
                        bias=True, input_is_parallel=True, skip_bias_add=False, is_expert=False)


def _context_config(config):
    """The config for layers that read the replicated context: no sequence-parallel gather there."""
    if not config.sequence_parallel:
        return config
    return dataclasses.replace(config, sequence_parallel=False)


class WanSelfAttention(MegatronModule):
    def __init__(self, config, submodules: WanSelfAttentionSubmodules) -> None:
        super().__init__(config)
        d = config.hidden_size
        self.head_dim = config.kv_channels
        self.linear_qkv = _column(config, submodules.linear_qkv, d, 3 * d)
        self.q_norm = build_module(submodules.q_norm, config=config, hidden_size=d, eps=config.layernorm_epsilon)
        self.k_norm = build_module(submodules.k_norm, config=config, hidden_size=d, eps=config.layernorm_epsilon)
        self.core_attention = build_module(submodules.core_attention, config=config, gather_kv_over_cp=True)
        self.linear_proj = _row(config, submodules.linear_proj, d, d)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        qkv, _ = self.linear_qkv(x)
        s, b = qkv.shape[:2]
        q, k, v = qkv.view(s, b, -1, 3, self.head_dim).unbind(3)  # [s, b, local heads, d]
        q = self.q_norm(q.reshape(s, b, -1)).view_as(v)
        k = self.k_norm(k.reshape(s, b, -1)).view_as(v)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        out, _ = self.linear_proj(self.core_attention(q, k, v))
        return out


class WanCrossAttention(MegatronModule):
    def __init__(self, config, submodules: WanCrossAttentionSubmodules, image_context: bool = False) -> None:
        super().__init__(config)
        d = config.hidden_size
        ctx_config = _context_config(config)
        self.head_dim = config.kv_channels
        self.linear_q = _column(config, submodules.linear_q, d, d)
        self.linear_kv = _column(ctx_config, submodules.linear_kv, d, 2 * d)
        self.q_norm = build_module(submodules.q_norm, config=config, hidden_size=d, eps=config.layernorm_epsilon)
        self.k_norm = build_module(submodules.k_norm, config=config, hidden_size=d, eps=config.layernorm_epsilon)
        self.core_attention = build_module(submodules.core_attention, config=config, gather_kv_over_cp=False)
        self.linear_proj = _row(config, submodules.linear_proj, d, d)
        self.linear_added_kv = self.added_k_norm = None
        if image_context:
            self.linear_added_kv = _column(ctx_config, submodules.linear_kv, d, 2 * d)
            self.added_k_norm = build_module(submodules.added_k_norm or submodules.k_norm, config=config,
                                             hidden_size=d, eps=config.layernorm_epsilon)

    def _kv(self, linear, norm, context: torch.Tensor):
        kv, _ = linear(context)
        s, b = kv.shape[:2]
        k, v = kv.view(s, b, -1, 2, self.head_dim).unbind(3)
        k = norm(k.reshape(s, b, -1)).view_as(v)
        return k, v

    def forward(self, x: torch.Tensor, context: torch.Tensor, image_context: torch.Tensor | None = None,
                context_mask: torch.Tensor | None = None) -> torch.Tensor:
        q, _ = self.linear_q(x)
        s, b = q.shape[:2]
        q = self.q_norm(q).view(s, b, -1, self.head_dim)
        k, v = self._kv(self.linear_kv, self.k_norm, context)
        out = self.core_attention(q, k, v, key_mask=context_mask)
        if self.linear_added_kv is not None:
            if image_context is None:
                raise ValueError("this Wan model has image K/V projections: pass image context embeddings")
            k_img, v_img = self._kv(self.linear_added_kv, self.added_k_norm, image_context)
            out = out + self.core_attention(q, k_img, v_img)
        out, _ = self.linear_proj(out)
        return out


def _modulation(table: torch.Tensor, temb: torch.Tensor) -> list[torch.Tensor]:
    """(shift, scale, gate) x 2 in fp32, each broadcastable to x [s, b, d].

    temb: [b, n, d] (one timestep per sample) or [s, b, n, d] (per token, TI2V); table [1, n, d].
    """
    if temb.dim() == 3:
        mod = table.float() + temb.float()  # [b, n, d]
        return [m.unsqueeze(0) for m in mod.unbind(1)]  # [1, b, d]
    mod = table.float().unsqueeze(0) + temb.float()  # [s, b, n, d]
    return list(mod.unbind(2))


class WanLayer(MegatronModule):
    """One Wan block. ``layer_number`` is 1-based and global (as in Megatron)."""

    def __init__(self, config, submodules: WanLayerSubmodules, layer_number: int = 1,
                 image_context: bool = False, cross_attn_norm: bool = True) -> None:
        super().__init__(config)
        d = config.hidden_size
        self.layer_number = layer_number
        self.eps = config.layernorm_epsilon
        self.self_attention = build_module(submodules.self_attention, config=config)
        self.cross_attention = build_module(submodules.cross_attention, config=config, image_context=image_context)
        self.norm2 = (build_module(submodules.cross_attn_norm, config=config, hidden_size=d, eps=self.eps)
                      if cross_attn_norm else None)
        self.mlp = build_module(submodules.mlp, config=config)
        self.scale_shift_table = torch.nn.Parameter(torch.randn(1, 6, d, dtype=config.params_dtype) / d**0.5)
        # Under SP each TP rank modulates different tokens: the table's gradient is partial per rank and
        # finalize_model_grads all-reduces parameters tagged like this over TP.
        self.scale_shift_table.sequence_parallel = config.sequence_parallel

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.float(), (x.shape[-1],), eps=self.eps)

    def forward(self, x: torch.Tensor, context: torch.Tensor, temb: torch.Tensor,
                rope: tuple[torch.Tensor, torch.Tensor], image_context: torch.Tensor | None = None,
                context_mask: torch.Tensor | None = None) -> torch.Tensor:
        shift, scale, gate, c_shift, c_scale, c_gate = _modulation(self.scale_shift_table, temb)
        h = (self._norm(x) * (1 + scale) + shift).to(x.dtype)
        x = (x.float() + self.self_attention(h, rope) * gate).to(x.dtype)
        h = self.norm2(x) if self.norm2 is not None else x
        x = x + self.cross_attention(h, context, image_context, context_mask)
        h = (self._norm(x) * (1 + c_scale) + c_shift).to(x.dtype)
        mlp_out, mlp_bias = self.mlp(h)
        if mlp_bias is not None:
            mlp_out = mlp_out + mlp_bias
        return (x.float() + mlp_out.float() * c_gate).to(x.dtype)
