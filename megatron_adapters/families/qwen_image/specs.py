"""Layer specs for the Qwen-Image block: local (torch ops; runs anywhere, used by the CPU tests) and
Transformer Engine (TE linears; FP8 through TE's recipes; GPU only)."""

from __future__ import annotations

from megatron.core.tensor_parallel import ColumnParallelLinear
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec

from megatron_adapters.families.qwen_image.layer import (
    QwenImageLayer,
    QwenImageLayerSubmodules,
    QwenJointAttention,
    QwenJointAttentionSubmodules,
)
from megatron_adapters.layers.norms import SequenceParallelNorm
from megatron_adapters.layers.specs import spec_for

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
    return spec_for("local", _layer_spec)


def te_layer_spec() -> ModuleSpec:
    return spec_for("te", _layer_spec)


def layer_spec(kind: str) -> ModuleSpec:
    return spec_for(kind, _layer_spec)
