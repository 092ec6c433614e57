"""The Megatron TransformerConfig shared by the DiT families (LayerNorm, biased linears, tanh-GELU FFN)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """Wan's FFN activation (diffusers 'gelu-approximate')."""
    return F.gelu(x, approximate="tanh")


def dit_transformer_config(cfg: Any, parallel_kwargs: dict[str, Any], *, params_dtype: torch.dtype = torch.float32,
                       **overrides: Any):
    """Megatron TransformerConfig of a DiT block stack (Wan, Qwen-Image): ``cfg`` names num_layers, hidden_size,
    num_attention_heads, attention_head_dim, ffn_dim and eps; ``parallel_kwargs`` is the layout
    (``ParallelContext.model_parallel_kwargs()``); ``overrides`` are a family's own settings."""
    from megatron.core.transformer import TransformerConfig

    kwargs: dict[str, Any] = dict(
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        kv_channels=cfg.attention_head_dim,
        ffn_hidden_size=cfg.ffn_dim,
        layernorm_epsilon=cfg.eps,
        normalization="LayerNorm",
        add_bias_linear=True,
        gated_linear_unit=False,
        activation_func=gelu_tanh,
        bias_activation_fusion=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        **parallel_kwargs,
    )
    kwargs.update(overrides)
    config = TransformerConfig(**kwargs)
    # Every pipeline stage computes the time/text embeddings itself; finalize_model_grads all-reduces
    # the gradients of parameters tagged `pipeline_parallel` over the PP group when this is set.
    config.has_cond_embedder = True
    return config
