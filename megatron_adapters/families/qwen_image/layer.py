"""One Qwen-Image dual-stream (MMDiT) block as a Megatron-core module built from a ModuleSpec.

Two token streams in Megatron's [s, b, h] layout: image tokens (sharded over CP, and over TP under
sequence parallelism) and text tokens (replicated on every TP and CP rank; see model.py for why).
Each stream has its own adaLN modulation, fused per-head Q/K/V (Column-parallel, laid out
[q_h; k_h; v_h] per head like Wan's), per-head q/k RMSNorm, output projection (Row-parallel) and
4x GELU-tanh MLP; they meet in one joint attention over [text; image] keys:

    img = img + g1 * AttnOut_img,  txt = txt + g1' * AttnOut_txt     (joint attention, RoPE, text mask)
    img = img + g2 * MLP_img(LN(img) * (1 + s2) + b2),  txt likewise with txt_mod
with (shift, scale, gate) x 2 = img_mod(SiLU(temb)) / txt_mod(SiLU(temb)).

The modulation projections (D -> 6D, a third of the 20B parameters) are Column-parallel with their
output gathered, so their weights are split over TP rather than replicated. Text-side linears read a
TP-replicated input and are built without sequence parallelism.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel.mappings import copy_to_tensor_model_parallel_region
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module

from megatron_adapters.families.qwen_image.config import EPS
from megatron_adapters.layers.attention import apply_rope_complex
from megatron_adapters.layers.builders import add_bias_, column_linear, replicated_input_config, row_linear

Rope = torch.Tensor  # complex64 [s, 1, 1, head_dim / 2]
Projected = tuple[torch.Tensor, torch.Tensor | None]  # a Row-parallel output and its bias, not yet added


@dataclass
class QwenJointAttentionSubmodules:
    linear_qkv: type | ModuleSpec  # image stream (diffusers attn.to_q/k/v)
    linear_added_qkv: type | ModuleSpec  # text stream (attn.add_q/k/v_proj)
    q_layernorm: type | ModuleSpec  # per-head RMSNorms; the names make finalize_model_grads sum them over TP
    k_layernorm: type | ModuleSpec
    added_q_layernorm: type | ModuleSpec
    added_k_layernorm: type | ModuleSpec
    core_attention: type | ModuleSpec
    linear_proj: type | ModuleSpec  # attn.to_out.0
    linear_added_proj: type | ModuleSpec  # attn.to_add_out


@dataclass
class QwenImageLayerSubmodules:
    modulation: type | ModuleSpec  # img_mod / txt_mod: a Column-parallel linear that can gather its output
    attention: ModuleSpec
    img_mlp: ModuleSpec
    txt_mlp: ModuleSpec


class QwenJointAttention(MegatronModule):
    def __init__(self, config, submodules: QwenJointAttentionSubmodules) -> None:
        super().__init__(config)
        d, self.head_dim = config.hidden_size, config.kv_channels
        text_config = replicated_input_config(config)

        def norm(spec, cfg):
            return build_module(spec, config=cfg, hidden_size=self.head_dim, eps=EPS)

        # Biases are returned, not added by the linears (a fresh tensor and pass each on CPU): the Q/K/V
        # biases are added in place, the output projections' fold into the gated residual.
        self.linear_qkv = column_linear(config, submodules.linear_qkv, d, 3 * d, skip_bias_add=True)
        self.linear_added_qkv = column_linear(text_config, submodules.linear_added_qkv, d, 3 * d, skip_bias_add=True)
        self.q_layernorm, self.k_layernorm = norm(submodules.q_layernorm, config), norm(submodules.k_layernorm, config)
        self.added_q_layernorm = norm(submodules.added_q_layernorm, text_config)
        self.added_k_layernorm = norm(submodules.added_k_layernorm, text_config)
        # Image K/V are gathered over CP inside; text K/V (replicated) go in front as prefix_kv.
        self.core_attention = build_module(submodules.core_attention, config=config, gather_kv_over_cp=True)
        self.linear_proj = row_linear(config, submodules.linear_proj, d, d, skip_bias_add=True)
        self.linear_added_proj = row_linear(text_config, submodules.linear_added_proj, d, d, skip_bias_add=True)

    def _qkv(self, linear, q_norm, k_norm, x: torch.Tensor, rope: Rope):
        qkv = add_bias_(*linear(x))
        s, b = qkv.shape[:2]
        q, k, v = qkv.view(s, b, -1, 3, self.head_dim).unbind(3)  # [s, b, local heads, head_dim]
        return apply_rope_complex(q_norm(q), rope), apply_rope_complex(k_norm(k), rope), v

    def forward(self, img: torch.Tensor, txt: torch.Tensor, img_rope: Rope, txt_rope: Rope,
                key_mask: torch.Tensor | None, text_queries: bool = True) -> tuple[Projected, Projected | None]:
        """-> (image output, bias), (text output, bias); ``text_queries=False`` (last block: its text
        output is discarded) attends with the image queries only and returns no text output."""
        q_img, k_img, v_img = self._qkv(self.linear_qkv, self.q_layernorm, self.k_layernorm, img, img_rope)
        q_txt, k_txt, v_txt = self._qkv(self.linear_added_qkv, self.added_q_layernorm, self.added_k_layernorm,
                                        txt, txt_rope)
        n_txt = q_txt.shape[0] if text_queries else 0
        query = torch.cat([q_txt, q_img]) if text_queries else q_img
        out = self.core_attention(query, k_img, v_img, key_mask=key_mask, prefix_kv=(k_txt, v_txt))
        img_out = self.linear_proj(out[n_txt:])
        if not text_queries:
            return img_out, None
        return img_out, self.linear_added_proj(out[:n_txt])


def _mlp(spec: ModuleSpec, config):
    return build_module(spec, config=config, ffn_hidden_size=config.ffn_hidden_size)


def _gated_residual(x: torch.Tensor, gate: torch.Tensor, projected: Projected) -> torch.Tensor:
    """x + gate * (out + bias) as (x + gate * bias) + gate * out: two passes over the tokens, the
    Row-parallel bias riding on the residual (gate and bias are per sample, [1, b, D] / [D])."""
    out, bias = projected
    if bias is not None:
        x = x + gate * bias
    return torch.addcmul(x, gate, out)


class QwenImageLayer(MegatronModule):
    """One dual-stream block. ``layer_number`` is 1-based and global (as in Megatron)."""

    def __init__(self, config, submodules: QwenImageLayerSubmodules, layer_number: int = 1) -> None:
        super().__init__(config)
        d = config.hidden_size
        text_config = replicated_input_config(config)
        self.layer_number = layer_number
        # The model's output reads only the image stream: the last block's text output is dead work
        # (diffusers computes it and drops it), so that block skips its text queries, text output
        # projection, text MLP and second text modulation. Their parameters stay (checkpoints, export)
        # and get zero gradient, as in diffusers.
        self.text_output = layer_number < config.num_layers
        # temb is per sample and replicated: no sequence-parallel gather on its way in.
        self.img_mod = column_linear(text_config, submodules.modulation, d, 6 * d, gather_output=True)
        self.txt_mod = column_linear(text_config, submodules.modulation, d, 6 * d, gather_output=True)
        self.attention = build_module(submodules.attention, config=config)
        self.img_mlp = _mlp(submodules.img_mlp, config)
        self.txt_mlp = _mlp(submodules.txt_mlp, text_config)

    def _modulation(self, linear, temb_act: torch.Tensor, tokens_split_over_tp: bool) -> list[torch.Tensor]:
        """(shift, scale, gate) x 2, each [1, b, D]."""
        mod, _ = linear(temb_act)
        if tokens_split_over_tp:
            # Under SP each TP rank modulates different image tokens: sum the modulation's gradient
            # over TP before the gathered output hands each rank its slice.
            mod = copy_to_tensor_model_parallel_region(mod)
        return [m.unsqueeze(0) for m in mod.chunk(6, dim=-1)]

    @staticmethod
    def _norm(x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, (x.shape[-1],), eps=EPS)  # in the activations' dtype, as diffusers

    def forward(self, img: torch.Tensor, txt: torch.Tensor, temb_act: torch.Tensor, img_rope: Rope, txt_rope: Rope,
                key_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """img [s_img, b, D], txt [s_txt, b, D], temb_act = SiLU(temb) [b, D] -> (img, txt or None)."""
        i_shift, i_scale, i_gate, i_shift2, i_scale2, i_gate2 = self._modulation(
            self.img_mod, temb_act, self.config.sequence_parallel)
        t_shift, t_scale, t_gate, t_shift2, t_scale2, t_gate2 = self._modulation(self.txt_mod, temb_act, False)
        img_attn, txt_attn = self.attention(self._norm(img) * (1 + i_scale) + i_shift,
                                            self._norm(txt) * (1 + t_scale) + t_shift, img_rope, txt_rope, key_mask,
                                            text_queries=self.text_output)
        img = _gated_residual(img, i_gate, img_attn)
        img = _gated_residual(img, i_gate2, self.img_mlp(self._norm(img) * (1 + i_scale2) + i_shift2))
        if img.dtype == torch.float16:  # diffusers clips both streams in fp16
            img = img.clip(-65504, 65504)
        if not self.text_output:
            return img, None
        txt = _gated_residual(txt, t_gate, txt_attn)
        txt = _gated_residual(txt, t_gate2, self.txt_mlp(self._norm(txt) * (1 + t_scale2) + t_shift2))
        return img, (txt.clip(-65504, 65504) if txt.dtype == torch.float16 else txt)
