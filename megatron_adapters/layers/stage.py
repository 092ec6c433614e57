"""What every DiT stage shares: its place in the pipeline, token sharding, and a reshardable checkpoint.

A model subclasses ``PipelineStage``, builds its ``blocks`` (this stage's share, even or not:
pdmd/core/pipeline_split.py, numbered globally from ``layer_offset``) and names in ``pp_replicated`` the children that every pipeline stage holds
(condition embedders). Those are tagged ``pipeline_parallel`` so ``finalize_model_grads`` sums their
gradients over PP (with ``config.has_cond_embedder``), and are saved once, from stage 0.
"""

from __future__ import annotations

import torch
from megatron.core import parallel_state
from megatron.core.dist_checkpointing.utils import replace_prefix_for_sharding
from megatron.core.enums import ModelType
from megatron.core.tensor_parallel.mappings import scatter_to_sequence_parallel_region
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

from megatron_adapters.conversion import Layout
from megatron_adapters.runtime.comm import cp_group, split_for_rank
from megatron_adapters.runtime.parallel import stage_layers


def stage_flags() -> dict[str, bool]:
    """pre_process / post_process for this pipeline rank's stage."""
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    rank = parallel_state.get_pipeline_model_parallel_rank()
    return {"pre_process": rank == 0, "post_process": rank == pp - 1}


class PipelineStage(MegatronModule):
    pp_replicated: tuple[str, ...] = ()

    def __init__(self, config, num_layers: int, *, pre_process: bool, post_process: bool) -> None:
        super().__init__(config)
        # What Megatron's schedules and finalize_model_grads ask of a model.
        self.model_type = ModelType.encoder_or_decoder
        self.share_embeddings_and_output_weights = False
        self.pre_process, self.post_process = pre_process, post_process
        self.input_tensor: torch.Tensor | None = None
        # this stage's blocks: an even split, an uneven one, or parallel.pp_layers (stage_layers)
        self.layer_offset, self.layers_per_stage = stage_layers(num_layers)

    def tag_pipeline_replicated(self, module: torch.nn.Module) -> None:
        """Mark a child every stage holds: its gradients are summed over the PP group."""
        pp_size = parallel_state.get_pipeline_model_parallel_world_size()
        for p in module.parameters():
            p.pipeline_parallel = pp_size > 1

    def set_input_tensor(self, input_tensor) -> None:
        """Called by Megatron's pipeline schedules with the previous stage's output."""
        if isinstance(input_tensor, list):
            (input_tensor,) = input_tensor
        self.input_tensor = input_tensor

    def shard_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """[S, ...] replicated -> this rank's tokens: CP slice, then SP scatter."""
        x = split_for_rank(x, 0, cp_group())
        if self.config.sequence_parallel:
            x = scatter_to_sequence_parallel_region(x)
        return x

    def conversion_layout(self) -> Layout:
        """This rank's piece for the diffusers <-> Megatron conversion table."""
        return Layout(
            tp_rank=parallel_state.get_tensor_model_parallel_rank(),
            tp=parallel_state.get_tensor_model_parallel_world_size(),
            first_block=self.layer_offset,
            num_blocks=len(self.blocks),
            pre_process=self.pre_process,
            post_process=self.post_process,
        )

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None):
        """Reshardable checkpoint: blocks under their GLOBAL index, PP-replicated children saved once
        (from stage 0), everything replicated across TP saved once."""
        out = {}
        for i, block in enumerate(self.blocks):
            local, global_ = f"{prefix}blocks.{i}.", f"{prefix}blocks.{self.layer_offset + i}."
            block_sd = block.sharded_state_dict(prefix=local, sharded_offsets=sharded_offsets, metadata=metadata)
            replace_prefix_for_sharding(block_sd, local, global_)
            out.update(block_sd)
        pp_rank = parallel_state.get_pipeline_model_parallel_rank()
        for name, module in self.named_children():
            if name == "blocks":
                continue
            sd = make_sharded_tensors_for_checkpoint(module.state_dict(prefix="", keep_vars=True),
                                                     f"{prefix}{name}.", {}, sharded_offsets)
            if name in self.pp_replicated:  # only stage 0's copy is the main one
                for sh in sd.values():
                    sh.replica_id = (pp_rank, *tuple(sh.replica_id)[1:])
            out.update(sd)
        for name, param in self.named_parameters(recurse=False):
            out.update(make_sharded_tensors_for_checkpoint({name: param}, prefix, {}, sharded_offsets))
        return out
