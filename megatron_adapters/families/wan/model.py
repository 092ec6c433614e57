"""WanModel: the whole Wan DiT on Megatron-core, one pipeline stage of it per rank.

Full tensors in, full tensors out: ``forward(latents [B,C,F,H,W], timestep [B] or [B,S], text [B,L,Dt])``
returns the velocity [B,C,F,H,W] on the last pipeline stage (hidden states [s, B, D] elsewhere).
Inside, tokens are split over context-parallel ranks (contiguous slices) and, with sequence
parallelism, over tensor-parallel ranks. SP shards are gathered before the output head; CP shards
after it (the head's output is small), with a backward that routes each token's gradient to the
rank that owns it.

Pipeline parallelism: stage 0 owns the patch embedding, the last stage the output head; every stage
computes the (small) condition embedder itself from the batch, whose parameters are tagged
``pipeline_parallel`` so ``finalize_model_grads`` sums their gradients over the PP group.
"""

from __future__ import annotations

import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
)
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from torch import nn

from megatron_adapters.families.wan.config import WanConfig
from megatron_adapters.families.wan.embeddings import (
    ConditionEmbedder,
    patchify_grid,
    rope_angles,
    unpatchify,
)
from megatron_adapters.layers.stage import PipelineStage
from megatron_adapters.runtime.comm import cp_group, gather_for_replicated_use, split_for_rank, tp_group
from megatron_adapters.runtime.fp8 import fp8_context


class WanModel(PipelineStage):
    pp_replicated = ("condition_embedder",)  # every stage computes the time/text embeddings itself

    def __init__(self, config, wan: WanConfig, layer_spec: ModuleSpec, *, pre_process: bool = True,
                 post_process: bool = True) -> None:
        super().__init__(config, wan.num_layers, pre_process=pre_process, post_process=post_process)
        self.wan = wan
        d, dtype = wan.hidden_size, config.params_dtype

        if pre_process:
            self.patch_embedding = nn.Conv3d(wan.in_channels, d, kernel_size=wan.patch_size, stride=wan.patch_size,
                                             dtype=dtype)
        self.condition_embedder = ConditionEmbedder(d, wan.freq_dim, wan.text_dim, wan.image_dim,
                                                    wan.pos_embed_seq_len).to(dtype)
        self.tag_pipeline_replicated(self.condition_embedder)
        self.blocks = nn.ModuleList(
            build_module(layer_spec, config=config, layer_number=self.layer_offset + i + 1,
                         image_context=wan.added_kv_proj_dim is not None, cross_attn_norm=wan.cross_attn_norm)
            for i in range(self.layers_per_stage)
        )
        if post_process:
            self.proj_out = nn.Linear(d, wan.out_channels * wan.patch_volume, dtype=dtype)
            self.scale_shift_table = nn.Parameter(torch.randn(1, 2, d, dtype=dtype) / d**0.5)

    # -- forward ----------------------------------------------------------------------------------
    def forward(self, latents: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor,
                image: torch.Tensor | None = None, text_mask: torch.Tensor | None = None) -> torch.Tensor:
        grid = patchify_grid(latents.shape, self.wan.patch_size)
        num_tokens = grid[0] * grid[1] * grid[2]
        if timestep.dim() == 2 and timestep.shape[1] != num_tokens:
            raise ValueError(f"per-token timesteps have {timestep.shape[1]} entries for {num_tokens} tokens")

        temb, proj, context, image_context = self.condition_embedder(timestep, text, image)
        context = context.transpose(0, 1)  # [L, B, D]
        if image_context is not None:
            image_context = image_context.transpose(0, 1)
        if proj.dim() == 4:  # per-token timesteps: [B, S, 6, D] -> this rank's tokens [s, B, 6, D]
            block_temb = self.shard_tokens(proj.transpose(0, 1))
        else:  # one timestep per sample: under SP each TP rank modulates different tokens
            block_temb = copy_to_tensor_model_parallel_region(proj) if self.config.sequence_parallel else proj
        cos, sin = rope_angles(grid, self.wan.attention_head_dim)
        rope = (split_for_rank(cos, 0, cp_group()).to(latents.device),
                split_for_rank(sin, 0, cp_group()).to(latents.device))

        if self.pre_process:
            x = self.patch_embedding(latents.to(self.patch_embedding.weight.dtype))
            x = self.shard_tokens(x.flatten(2).permute(2, 0, 1).contiguous())  # [s, B, D]
        else:
            x = self.input_tensor
        recompute = self.config.recompute_granularity == "full" and self.training and torch.is_grad_enabled()
        if recompute and not x.requires_grad:
            # A LoRA student's blocks get a frozen embedding's output: Megatron's (reentrant) checkpoint
            # would then see no input needing grad and give the adapters inside no gradient at all.
            x = x.detach().requires_grad_(True)
        with fp8_context(self.config):
            for block in self.blocks:
                if recompute:  # keep only each block's input; its activations are rebuilt in the backward
                    x = tensor_parallel.checkpoint(_call_block(block), False, x, context, block_temb, rope[0],
                                                   rope[1], image_context, text_mask)
                else:
                    x = block(x, context, block_temb, rope, image_context, text_mask)
        if not self.post_process:
            return x
        # The head runs on this CP rank's tokens (all of them across TP); only its small output is
        # gathered over CP, whose backward hands each rank the gradient of its own tokens. That keeps
        # Megatron's CP convention (loss x cp in the schedule, gradients averaged over DP x CP) exact.
        if self.config.sequence_parallel:
            x = gather_for_replicated_use(x, 0, tp_group())
        out = gather_for_replicated_use(self._head(x, temb), 0, cp_group())
        return unpatchify(out, grid, self.wan.patch_size)

    def _head(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        """[s, B, D] tokens of this CP rank -> [s, B, patch * C_out]."""
        table = self.scale_shift_table.float()
        if temb.dim() == 3:  # [B, S, D] per token -> this CP rank's [s, B, 2, D]
            temb = split_for_rank(temb.transpose(0, 1), 0, cp_group())
            mod = table.unsqueeze(0) + temb.float().unsqueeze(2)
            shift, scale = mod[:, :, 0], mod[:, :, 1]
        else:  # [B, D]
            mod = table + temb.float().unsqueeze(1)  # [B, 2, D]
            shift, scale = mod[None, :, 0], mod[None, :, 1]
        h = torch.nn.functional.layer_norm(x.float(), (x.shape[-1],), eps=self.wan.eps)
        h = (h * (1 + scale) + shift).to(x.dtype)
        return self.proj_out(h)


def _call_block(block):
    """The block as a function of tensors only (Megatron's checkpoint saves its arguments for backward)."""

    def run(x, context, temb, cos, sin, image_context, text_mask):
        return block(x, context, temb, (cos, sin), image_context, text_mask)

    return run


def build_wan_model(config, wan: WanConfig, layer_spec: ModuleSpec) -> WanModel:
    """The stage of the model that this pipeline rank holds."""
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    rank = parallel_state.get_pipeline_model_parallel_rank()
    return WanModel(config, wan, layer_spec, pre_process=rank == 0, post_process=rank == pp - 1)
