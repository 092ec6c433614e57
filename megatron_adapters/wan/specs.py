"""Layer specs for the Wan block: local (torch ops; runs anywhere, used by the CPU tests) and
Transformer Engine (TE linears and attention; FP8 through TE's recipes; GPU only)."""

from __future__ import annotations

from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec

from megatron_adapters.attention import AllHeadsRMSNorm, SDPAttention
from megatron_adapters.norms import SequenceParallelNorm
from megatron_adapters.wan.layer import (
    WanCrossAttention,
    WanCrossAttentionSubmodules,
    WanLayer,
    WanLayerSubmodules,
    WanSelfAttention,
    WanSelfAttentionSubmodules,
)


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
    """Megatron-core's own parallel linears and our SDPA attention (exact CP by K/V all-gather)."""
    return _layer_spec(ColumnParallelLinear, RowParallelLinear, SDPAttention)


def te_available() -> tuple[bool, str]:
    """Whether Transformer Engine can be used here, and why not if it can't."""
    try:
        import transformer_engine  # noqa: F401
        from megatron.core.extensions import transformer_engine as _te  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - any import failure means no TE
        return False, f"Transformer Engine is not importable ({type(exc).__name__}: {exc})"
    import torch

    if not torch.cuda.is_available():
        return False, "Transformer Engine needs CUDA"
    return True, ""


def te_layer_spec() -> ModuleSpec:
    """TE's linears (FP8 per the TransformerConfig's fp8 recipe) with our attention core.

    The core attention stays ours (SDPA, flash kernels on GPU) because Wan's bidirectional attention
    with all-heads q/k norm sits between the projections; TE's DotProductAttention is the next step
    once it is measured against ours (docs/benchmarks.md).
    """
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
