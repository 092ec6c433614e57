"""How our DiT layers build Megatron's parallel linears, shared by the models.

Column-parallel linears split their output features (heads) over TP, Row-parallel ones their input
features and sum over TP. A layer that reads a tensor replicated on every TP rank (a text context,
a per-sample timestep embedding) builds its linears from ``replicated_input_config``: with sequence
parallelism on, a linear would otherwise all-gather (Column) or reduce-scatter (Row) along tokens.
"""

from __future__ import annotations

import dataclasses

import torch
from megatron.core.transformer.spec_utils import ModuleSpec, build_module


def column_linear(config, spec: type | ModuleSpec, in_size: int, out_size: int, *, gather_output: bool = False,
                  skip_bias_add: bool = False):
    """A Column-parallel linear with bias (output features split over TP unless ``gather_output``).

    ``skip_bias_add``: return the bias for the caller to fuse (Megatron's local linears add it in a
    separate pass over a fresh output; see ``add_bias_``)."""
    return build_module(spec, in_size, out_size, config=config, init_method=config.init_method, bias=True,
                        gather_output=gather_output, skip_bias_add=skip_bias_add, is_expert=False)


def row_linear(config, spec: type | ModuleSpec, in_size: int, out_size: int, *, skip_bias_add: bool = False):
    """A Row-parallel linear with bias, its input already split over TP (``skip_bias_add`` as above)."""
    return build_module(spec, in_size, out_size, config=config, init_method=config.output_layer_init_method,
                        bias=True, input_is_parallel=True, skip_bias_add=skip_bias_add, is_expert=False)


def add_bias_(out: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Add a Column-parallel linear's skipped bias in place: its output is a fresh tensor its backward
    does not keep. (Not for Row-parallel outputs: at TP=1 their reduce returns its input as a view,
    which autograd forbids modifying in place; fold their bias into the next op instead.)"""
    return out if bias is None else out.add_(bias)


def replicated_input_config(config):
    """``config`` with sequence parallelism off, for layers whose input is the same on every TP rank."""
    if not config.sequence_parallel:
        return config
    return dataclasses.replace(config, sequence_parallel=False)
