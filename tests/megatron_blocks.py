"""A plain Megatron-core TransformerBlock from a local (torch-only) spec, for the foundation tests.

The layer is megatron-core's own GPT layer spec with our sequence-parallel-safe norm in place of the
torch fallback norm (which refuses SP). Weights are moved between layouts by explicit slicing here,
independently of Megatron's checkpointing, so the tests compare two different routes.
"""

from __future__ import annotations

import torch

HIDDEN, HEADS, FFN, LAYERS = 32, 4, 64, 2
SEQ, BATCH = 8, 2

# Megatron's ColumnParallelLinear shards dim 0 (weight and bias), RowParallelLinear dim 1 of the weight.
COLUMN = ("linear_qkv.weight", "linear_qkv.bias", "linear_fc1.weight", "linear_fc1.bias")
ROW = ("linear_proj.weight", "linear_fc2.weight")


def make_config(*, tp: int = 1, pp: int = 1, sp: bool = False, **extra):
    from megatron.core.transformer import TransformerConfig

    return TransformerConfig(
        num_layers=LAYERS,
        hidden_size=HIDDEN,
        num_attention_heads=HEADS,
        ffn_hidden_size=FFN,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        sequence_parallel=sp,
        use_cpu_initialization=True,
        params_dtype=torch.float32,
        pipeline_dtype=torch.float32,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        batch_p2p_comm=False,
        **extra,
    )


def build_block(config, *, pre_process: bool = True, post_process: bool = True):
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_block import (
        TransformerBlock,
        TransformerBlockSubmodules,
        get_num_layers_to_build,
    )

    from megatron_adapters.layers.norms import SequenceParallelNorm

    layer = get_gpt_layer_local_spec()
    layer.submodules.input_layernorm = SequenceParallelNorm
    layer.submodules.pre_mlp_layernorm = SequenceParallelNorm
    n = get_num_layers_to_build(config)
    spec = TransformerBlockSubmodules(layer_specs=[layer] * n, layer_norm=SequenceParallelNorm)
    from megatron.core.enums import ModelType

    class StageBlock(TransformerBlock):
        def set_input_tensor(self, input_tensor):
            # The pipeline schedules pass a list with one tensor per model chunk input.
            if isinstance(input_tensor, list):
                (input_tensor,) = input_tensor
            super().set_input_tensor(input_tensor)

    block = StageBlock(config, spec, pre_process=pre_process, post_process=post_process)
    block.model_type = ModelType.encoder_or_decoder  # what the pipeline schedules ask a model for
    return block


def tensor_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The module's tensors (Megatron layers also put ``_extra_state`` entries, often None, in state_dict)."""
    return {k: v.detach().clone() for k, v in module.state_dict().items() if not k.endswith("_extra_state")}


def load_tensors(module: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Load exactly ``tensors``: every parameter/buffer must be given, nothing unknown."""
    result = module.load_state_dict(tensors, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("_extra_state")]
    if missing or result.unexpected_keys:
        raise KeyError(f"missing {missing}, unexpected {result.unexpected_keys}")


def shard_for_tp(full: dict[str, torch.Tensor], tp_rank: int, tp: int) -> dict[str, torch.Tensor]:
    """Slice a TP=1 state dict into the piece TP rank ``tp_rank`` of ``tp`` holds."""
    out = {}
    for name, value in full.items():
        if name.endswith(COLUMN):
            out[name] = value.chunk(tp, dim=0)[tp_rank].clone()
        elif name.endswith(ROW):
            out[name] = value.chunk(tp, dim=1)[tp_rank].clone()
        else:
            out[name] = value.clone()
    return out


def unshard_tp(pieces: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Inverse of shard_for_tp: join the TP pieces (replicated entries must agree)."""
    out = {}
    for name in pieces[0]:
        values = [p[name] for p in pieces]
        if name.endswith(COLUMN):
            out[name] = torch.cat(values, dim=0)
        elif name.endswith(ROW):
            out[name] = torch.cat(values, dim=1)
        else:
            out[name] = values[0]
    return out


def stage_layer_names(full: dict[str, torch.Tensor], pp_rank: int, pp: int) -> dict[str, str]:
    """Map a PP stage's local parameter names to the TP=1/PP=1 names (layers renumbered by offset)."""
    per_stage = LAYERS // pp
    mapping = {}
    for name in full:
        if name.startswith("layers."):
            idx = int(name.split(".")[1])
            if pp_rank * per_stage <= idx < (pp_rank + 1) * per_stage:
                local = f"layers.{idx - pp_rank * per_stage}." + name.split(".", 2)[2]
                mapping[local] = name
        elif pp_rank == pp - 1:  # final layernorm lives on the last stage
            mapping[name] = name
    return mapping


def inputs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Hidden states [s, b, h] and a fixed projection that turns the output into a scalar loss."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(SEQ, BATCH, HIDDEN, generator=g)
    w = torch.randn(SEQ, BATCH, HIDDEN, generator=g)
    return x, w
