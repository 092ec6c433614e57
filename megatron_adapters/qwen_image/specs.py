"""Layer specs for the Qwen-Image block: local (torch ops; runs anywhere, used by the CPU tests) and
Transformer Engine (TE linears; FP8 through TE's recipes; GPU only)."""

from __future__ import annotations

from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec

from megatron_adapters.attention import SDPAttention
from megatron_adapters.norms import SequenceParallelNorm
from megatron_adapters.qwen_image.layer import (
    QwenImageLayer,
    QwenImageLayerSubmodules,
    QwenJointAttention,
    QwenJointAttentionSubmodules,
)
from megatron_adapters.wan.specs import te_available

# Per-head q/k RMSNorm (diffusers RMSNorm(head_dim)); the model's other norms are LayerNorms.
HEAD_RMS_NORM = ModuleSpec(module=SequenceParallelNorm, params={"normalization": "RMSNorm"})


def _layer_spec(column, row, core_attention) -> ModuleSpec:
    return ModuleSpec(
        module=QwenImageLayer,
        submodules=QwenImageLayerSubmodules(
            # Always Megatron's own linear: TE's Column-parallel linear cannot gather its output.
            modulation=ColumnParallelLinear,
            attention=ModuleSpec(
                module=QwenJointAttention,
                submodules=QwenJointAttentionSubmodules(
                    linear_qkv=column, linear_added_qkv=column,
                    q_layernorm=HEAD_RMS_NORM, k_layernorm=HEAD_RMS_NORM,
                    added_q_layernorm=HEAD_RMS_NORM, added_k_layernorm=HEAD_RMS_NORM,
                    core_attention=core_attention, linear_proj=row, linear_added_proj=row,
                ),
            ),
            img_mlp=ModuleSpec(module=MLP, submodules=MLPSubmodules(linear_fc1=column, linear_fc2=row)),
            txt_mlp=ModuleSpec(module=MLP, submodules=MLPSubmodules(linear_fc1=column, linear_fc2=row)),
        ),
    )


def local_layer_spec() -> ModuleSpec:
    """Megatron-core's own parallel linears and our SDPA attention (exact CP by K/V all-gather)."""
    return _layer_spec(ColumnParallelLinear, RowParallelLinear, SDPAttention)


def te_layer_spec() -> ModuleSpec:
    """TE's linears (FP8 per the TransformerConfig's fp8 recipe) with our joint attention core, as for Wan."""
    ok, why = te_available()
    if not ok:
        raise RuntimeError(f"model.spec=te was asked for but {why}; use model.spec=local")
    from megatron.core.extensions.transformer_engine import TEColumnParallelLinear, TERowParallelLinear

    return _layer_spec(TEColumnParallelLinear, TERowParallelLinear, SDPAttention)


def layer_spec(kind: str) -> ModuleSpec:
    if kind == "local":
        return local_layer_spec()
    if kind == "te":
        return te_layer_spec()
    raise ValueError(f"model.spec={kind!r}: choose 'local' (torch ops, any device) or 'te' (Transformer Engine)")
