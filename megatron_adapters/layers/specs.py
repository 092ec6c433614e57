"""What every family's layer spec shares: the choice of parallel linears (megatron-core's local ones or
Transformer Engine's) and the core attention."""

from __future__ import annotations

from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.spec_utils import ModuleSpec

from megatron_adapters.layers.attention import SDPAttention


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


def spec_for(kind: str, build) -> ModuleSpec:
    """``build(column, row, core_attention)`` with megatron-core's own parallel linears (``local``: torch
    ops, any device) or Transformer Engine's (``te``: FP8 per the TransformerConfig's recipe; refused
    with the reason where TE cannot run). The core attention is our SDPA either way (exact CP by K/V
    all-gather; TE's DotProductAttention is the next step once measured against it). Shared by every
    model's layer spec."""
    if kind == "local":
        return build(ColumnParallelLinear, RowParallelLinear, SDPAttention)
    if kind == "te":
        ok, why = te_available()
        if not ok:
            raise RuntimeError(f"model.spec=te was asked for but {why}; use model.spec=local")
        from megatron.core.extensions.transformer_engine import TEColumnParallelLinear, TERowParallelLinear

        return build(TEColumnParallelLinear, TERowParallelLinear, SDPAttention)
    raise ValueError(f"model.spec={kind!r}: choose 'local' (torch ops, any device) or 'te' (Transformer Engine)")
