"""Normalisation layers that are correct under Megatron's sequence parallelism.

Megatron-core's torch fallback norm refuses sequence parallel (Apex/TE ones are GPU-only). Under SP
each tensor-parallel rank normalises a different slice of the sequence, so the norm's weight and bias
get partial gradients; tagging them ``sequence_parallel`` makes ``finalize_model_grads`` all-reduce
those gradients over the TP group, which is exactly what TE's norms rely on too.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class SequenceParallelNorm(torch.nn.Module):
    """LayerNorm or RMSNorm (``normalization``, else ``config.normalization``) built the way Megatron
    builds its norms. A model mixing both (Qwen-Image: RMSNorm on q/k and text, LayerNorm elsewhere)
    names the kind per norm in its spec."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, elementwise_affine: bool = True,
                 bias: bool = True, normalization: str | None = None) -> None:
        super().__init__()
        self.kind = normalization or getattr(config, "normalization", "LayerNorm")
        if self.kind not in ("LayerNorm", "RMSNorm"):
            raise ValueError(f"normalization={self.kind!r}: SequenceParallelNorm supports LayerNorm and RMSNorm")
        self.hidden_size = hidden_size
        self.eps = eps
        # Parameters in the model's dtype, as Megatron's own norms (a bf16 model with fp32 norm weights
        # breaks the distributed optimizer's checkpoint); the computation is fp32 regardless.
        dtype = getattr(config, "params_dtype", torch.float32)
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=dtype)) if elementwise_affine else None
        use_bias = elementwise_affine and bias and self.kind == "LayerNorm"
        self.bias = torch.nn.Parameter(torch.zeros(hidden_size, dtype=dtype)) if use_bias else None
        sp = bool(getattr(config, "sequence_parallel", False))
        for p in self.parameters():
            p.sequence_parallel = sp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Computed in fp32 whatever the activation dtype (as diffusers' FP32LayerNorm and TE's norms do).
        w = None if self.weight is None else self.weight.float()
        if self.kind == "RMSNorm":
            return F.rms_norm(x.float(), (self.hidden_size,), w, self.eps).to(x.dtype)
        b = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), (self.hidden_size,), w, b, self.eps).to(x.dtype)
