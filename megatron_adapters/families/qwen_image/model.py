"""QwenImageModel: diffusers' QwenImageTransformer2DModel on Megatron-core, one pipeline stage per rank.

``forward(latents [B, S, C_in], sigma [B], text [B, L, D_text], text_mask [B, L] | None, img_shapes)``
takes what diffusers' transformer takes (packed 2x2 latent patches, sigma in [0, 1] -- the model
scales it by 1000 itself, the pipeline passes ``timestep / 1000``) and returns [B, S, 4 * C_out] on
the last pipeline stage.

Token layout. Image tokens are split over CP ranks (contiguous slices) and, with sequence
parallelism, over TP ranks, as in Wan. Text tokens are REPLICATED on every TP and CP rank:
- they are few (<= 512 prompt tokens, next to 4k-16k image tokens at 1024-2048 px), so replicating
  them costs a few percent of the block's work, while sharding them would need padding L to a
  multiple of cp x tp, slicing the text RoPE and mask, and gathering text K/V as well;
- it is exact under Megatron's CP convention: each CP rank's copy of the text stream only feeds that
  rank's image tokens (text outputs are discarded after the last block), so every path from a
  parameter to an output token runs on exactly one CP rank, as for the image tokens; the schedule's
  loss x cp and DDP's average over DP x CP then give the full gradient (tests check CP=2 and TP2xCP2).
Joint attention: each rank's queries are [all text; its image tokens]; keys/values are [text; all
image tokens] (image K/V all-gathered over CP).

Pipeline parallelism: the one tensor Megatron sends between stages is [text; image tokens of this
rank] = [L + S / (cp * tp_sp), B, D]. The schedule derives that shape from ``seq_length`` (divided by
cp, and by tp under SP), so pass ``schedule_seq_length(S, L)`` = L * cp * tp_sp + S as seq_length.
Stage 0 owns img_in/txt_norm/txt_in, the last stage norm_out/proj_out; every stage computes the
timestep embedder (parameters tagged ``pipeline_parallel``, gradients summed over PP).

Full recomputation (``recompute_granularity="full"``, training with grad only): each block keeps its
inputs and runs again in the backward through Megatron's ``tensor_parallel.checkpoint``, which restores
the TP RNG states (exact) and skips the last block's discarded text output (None).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel
from megatron.core.tensor_parallel.mappings import scatter_to_sequence_parallel_region
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from torch import nn

from megatron_adapters.families.qwen_image.config import EPS, QwenImageConfig
from megatron_adapters.families.qwen_image.embeddings import NormOut, TimeTextEmbed, image_segments, rope
from megatron_adapters.layers.builders import replicated_input_config
from megatron_adapters.layers.norms import SequenceParallelNorm
from megatron_adapters.layers.stage import PipelineStage, stage_flags
from megatron_adapters.runtime.comm import cp_group, gather_for_replicated_use, split_for_rank, tp_group
from megatron_adapters.runtime.fp8 import fp8_context


class QwenImageModel(PipelineStage):
    pp_replicated = ("time_text_embed",)

    def __init__(self, config, qwen: QwenImageConfig, layer_spec: ModuleSpec, *, pre_process: bool = True,
                 post_process: bool = True) -> None:
        super().__init__(config, qwen.num_layers, pre_process=pre_process, post_process=post_process)
        self.qwen = qwen
        d, dtype = qwen.hidden_size, config.params_dtype
        self.time_text_embed = TimeTextEmbed(d).to(dtype)
        self.tag_pipeline_replicated(self.time_text_embed)
        if pre_process:
            self.txt_norm = SequenceParallelNorm(replicated_input_config(config), qwen.joint_attention_dim, eps=EPS,
                                                 normalization="RMSNorm").to(dtype)
            self.img_in = nn.Linear(qwen.in_channels, d, dtype=dtype)
            self.txt_in = nn.Linear(qwen.joint_attention_dim, d, dtype=dtype)
        self.blocks = nn.ModuleList(
            build_module(layer_spec, config=config, layer_number=self.layer_offset + i + 1)
            for i in range(self.layers_per_stage)
        )
        if post_process:
            self.norm_out = NormOut(d).to(dtype)
            self.proj_out = nn.Linear(d, qwen.out_features, dtype=dtype)

    # -- pipeline plumbing ------------------------------------------------------------------------
    def token_shards(self) -> int:
        """Ranks sharing one sample's image tokens: cp, times tp under sequence parallelism."""
        tp = parallel_state.get_tensor_model_parallel_world_size() if self.config.sequence_parallel else 1
        return parallel_state.get_context_parallel_world_size() * tp

    def schedule_seq_length(self, num_image_tokens: int, text_len: int) -> int:
        """The ``seq_length`` to give Megatron's schedule so its p2p shape is [L + S / shards, B, D]."""
        return text_len * self.token_shards() + num_image_tokens

    # -- forward ----------------------------------------------------------------------------------
    def forward(self, latents: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor,
                text_mask: torch.Tensor | None = None, img_shapes=None) -> torch.Tensor:
        batch, num_image, _ = latents.shape
        text_len = text.shape[1]
        segments = image_segments(img_shapes, num_image)
        if num_image % self.token_shards():
            raise ValueError(f"{num_image} image tokens do not split over {self.token_shards()} ranks "
                             "(context parallel x sequence parallel): pick an image size that does")
        dtype = self.time_text_embed.timestep_embedder.linear_1.weight.dtype
        temb_act = F.silu(self.time_text_embed(timestep, dtype))  # every use of temb goes through SiLU
        img_rope, txt_rope = rope(segments, text_len, self.qwen.axes_dims_rope, latents.device)
        img_rope = split_for_rank(img_rope, 0, cp_group())
        key_mask = None
        if text_mask is not None:  # keys are [text; every image token]: image keys always attend
            if text_mask.shape != (batch, text_len):
                raise ValueError(f"text_mask has shape {tuple(text_mask.shape)}, expected {(batch, text_len)}")
            image_keys = torch.ones(batch, num_image, dtype=torch.bool, device=text_mask.device)
            key_mask = torch.cat([text_mask.to(torch.bool), image_keys], dim=1)

        if self.pre_process:
            x = split_for_rank(latents.transpose(0, 1), 0, cp_group())  # [S/cp, B, C_in]
            img = self.img_in(x.to(dtype))
            if self.config.sequence_parallel:
                img = scatter_to_sequence_parallel_region(img)
            txt = self.txt_in(self.txt_norm(text.to(dtype))).transpose(0, 1)  # [L, B, D]
        else:
            x = self.input_tensor
            expected = text_len + num_image // self.token_shards()
            if x.shape[0] != expected:
                raise ValueError(f"received {x.shape[0]} tokens from the previous stage, expected {expected}: "
                                 "pass schedule_seq_length(...) as the schedule's seq_length")
            txt, img = x[:text_len], x[text_len:]
        recompute = self.config.recompute_granularity == "full" and self.training and torch.is_grad_enabled()
        if recompute and not img.requires_grad:  # frozen embeddings (LoRA students): see WanModel.forward
            img = img.detach().requires_grad_(True)
        with fp8_context(self.config):
            for block in self.blocks:
                if recompute:  # keep only each block's inputs; its activations are rebuilt in the backward
                    img, txt = tensor_parallel.checkpoint(block, False, img, txt, temb_act, img_rope, txt_rope,
                                                          key_mask)
                else:
                    img, txt = block(img, txt, temb_act, img_rope, txt_rope, key_mask)
        if not self.post_process:
            return torch.cat([txt, img])
        # As in Wan: the head runs on this CP rank's tokens (all of them across TP), and only its
        # output is gathered over CP, so every rank back-propagates its own tokens exactly once.
        if self.config.sequence_parallel:
            img = gather_for_replicated_use(img, 0, tp_group())
        out = self.proj_out(self.norm_out(img, temb_act))
        return gather_for_replicated_use(out, 0, cp_group()).transpose(0, 1)


def build_qwen_image_model(config, qwen: QwenImageConfig, layer_spec: ModuleSpec) -> QwenImageModel:
    """The stage of the model that this pipeline rank holds."""
    return QwenImageModel(config, qwen, layer_spec, **stage_flags())
