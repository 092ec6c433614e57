"""Layer specs for the Wan block: local (torch ops; runs anywhere, used by the CPU tests) and
Transformer Engine (TE linears and attention; FP8 through TE's recipes; GPU only)."""

from __future__ import annotations

from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec

from megatron_adapters.families.wan.layer import (
    WanCrossAttention,
    WanCrossAttentionSubmodules,
    WanLayer,
    WanLayerSubmodules,
    WanSelfAttention,
    WanSelfAttentionSubmodules,
)
from megatron_adapters.layers.attention import AllHeadsRMSNorm
from megatron_adapters.layers.norms import SequenceParallelNorm
from megatron_adapters.layers.specs import spec_for


def _layer_spec(column, row, core_attention) -> ModuleSpec:
    return ModuleSpec(
        module=WanLayer,
        submodules=WanLayerSubmodules(
            self_attention=ModuleSpec(
                module=WanSelfAttention,
                submodules=WanSelfAttentionSubmodules(
                    linear_qkv=column, q_norm=AllHeadsRMSNorm, k_norm=AllHeadsRMSNorm,
                    core_attention=core_attention, linear_proj=row,
                ),
            ),
            cross_attention=ModuleSpec(
                module=WanCrossAttention,
                submodules=WanCrossAttentionSubmodules(
                    linear_q=column, linear_kv=column, q_norm=AllHeadsRMSNorm, k_norm=AllHeadsRMSNorm,
                    core_attention=core_attention, linear_proj=row,
                ),
            ),
            cross_attn_norm=SequenceParallelNorm,
            mlp=ModuleSpec(module=MLP, submodules=MLPSubmodules(linear_fc1=column, linear_fc2=row)),
        ),
    )


def local_layer_spec() -> ModuleSpec:
    return spec_for("local", _layer_spec)


def te_layer_spec() -> ModuleSpec:
    return spec_for("te", _layer_spec)


def layer_spec(kind: str) -> ModuleSpec:
    return spec_for(kind, _layer_spec)
