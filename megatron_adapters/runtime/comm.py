"""Autograd-aware collectives that Megatron-core does not provide in the form our DiTs need.

Each works on gloo as on NCCL (gloo has no reduce-scatter, and torch.distributed.nn's all_gather
backward breaks on gloo sub-groups, so these are written with all_reduce / all_gather / all_to_all_single).
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def group_size(group: dist.ProcessGroup | None) -> int:
    return 1 if group is None else dist.get_world_size(group)


class _AllReduceSum(torch.autograd.Function):
    """y = sum over ranks of x, when every rank's y feeds a *different* computation: the gradient of
    each x is the sum of all ranks' gradients of y (unlike Megatron's reduce_from_tp_region)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        y = x.clone()
        dist.all_reduce(y, group=group)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def all_reduce_sum(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Sum ``x`` over ``group`` with the gradient of a sum whose result every rank uses differently."""
    if group_size(group) == 1:
        return x
    return _AllReduceSum.apply(x, group)


class _GatherAlongDim(torch.autograd.Function):
    """Concatenate every rank's ``x`` along ``dim``. Backward: the sum over ranks of the gradient of
    the whole (each rank used the gathered tensor in its own computation), sliced to this rank."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, dim: int, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.dim, ctx.group = dim, group
        ctx.rank, ctx.size = dist.get_rank(group), dist.get_world_size(group)
        ctx.local = x.shape[dim]
        parts = [torch.empty_like(x) for _ in range(ctx.size)]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=dim)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad.narrow(ctx.dim, ctx.rank * ctx.local, ctx.local).contiguous(), None, None


def all_gather_for_shared_use(x: torch.Tensor, dim: int, group: dist.ProcessGroup | None) -> torch.Tensor:
    """All-gather along ``dim`` where every rank then uses the whole (e.g. K/V under context parallel)."""
    if group_size(group) == 1:
        return x
    return _GatherAlongDim.apply(x, dim, group)


class _GatherReplicated(torch.autograd.Function):
    """Concatenate every rank's ``x`` along ``dim`` where what follows is the same on every rank
    (replicated loss or head). Backward: each rank keeps its own slice of the (identical) gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, dim: int, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.dim, ctx.rank, ctx.local = dim, dist.get_rank(group), x.shape[dim]
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=dim)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad.narrow(ctx.dim, ctx.rank * ctx.local, ctx.local).contiguous(), None, None


def gather_for_replicated_use(x: torch.Tensor, dim: int, group: dist.ProcessGroup | None) -> torch.Tensor:
    """All-gather along ``dim`` when the computation after it is identical on every rank."""
    if group_size(group) == 1:
        return x
    return _GatherReplicated.apply(x, dim, group)


def _all_to_all(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """Chunk j of dim 0 goes to rank j; the result's chunk j came from rank j."""
    x = x.contiguous()
    out = torch.empty_like(x)  # of the contiguous tensor: all_to_all_single writes chunk-major memory
    dist.all_to_all_single(out, x, group=group)
    return out


def _seq_to_heads(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    size = dist.get_world_size(group)
    s, b, h, d = x.shape
    chunks = x.reshape(s, b, size, h // size, d).permute(2, 0, 1, 3, 4)  # [ranks, s, b, h/ranks, d]
    return _all_to_all(chunks, group).reshape(size * s, b, h // size, d)


def _heads_to_seq(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    size = dist.get_world_size(group)
    s, b, h, d = x.shape
    chunks = _all_to_all(x.reshape(size, s // size, b, h, d), group)  # chunk j: rank j's heads of my tokens
    return chunks.permute(1, 2, 0, 3, 4).reshape(s // size, b, size * h, d)


class _UlyssesAllToAll(torch.autograd.Function):
    """Ulysses' exchange: tokens -> heads ([s/cp, b, h, d] -> [s, b, h/cp, d]) or back; the gradient takes
    the other direction."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup, to_heads: bool) -> torch.Tensor:
        ctx.group, ctx.to_heads = group, to_heads
        return (_seq_to_heads if to_heads else _heads_to_seq)(x, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return (_heads_to_seq if ctx.to_heads else _seq_to_heads)(grad, ctx.group), None, None


def sequence_to_heads(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Ulysses' first all-to-all over ``group`` ([s/n, b, h, d] -> [s, b, h/n, d]); ranks hold contiguous
    token chunks in rank order, as :func:`split_for_rank` cuts them. Needs h % n == 0."""
    if group_size(group) == 1:
        return x
    if x.shape[2] % group_size(group):
        raise ValueError(f"{x.shape[2]} heads do not split over {group_size(group)} context-parallel ranks (Ulysses)")
    return _UlyssesAllToAll.apply(x, group, True)


def heads_to_sequence(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Ulysses' second all-to-all: [s, b, h/n, d] -> [s/n, b, h, d]."""
    if group_size(group) == 1:
        return x
    return _UlyssesAllToAll.apply(x, group, False)


def split_for_rank(x: torch.Tensor, dim: int, group: dist.ProcessGroup | None) -> torch.Tensor:
    """This rank's contiguous slice of a replicated tensor (backward: zeros elsewhere, by autograd)."""
    size = group_size(group)
    if size == 1:
        return x
    if x.shape[dim] % size:
        raise ValueError(f"cannot split {x.shape[dim]} tokens evenly over {size} ranks (dim {dim})")
    return x.chunk(size, dim=dim)[dist.get_rank(group)]


def cp_group() -> dist.ProcessGroup | None:
    """The context-parallel group, or None when CP is 1 (every helper here takes None as "no group")."""
    from megatron.core import parallel_state  # lazy: the helpers above run without Megatron

    if parallel_state.get_context_parallel_world_size() == 1:
        return None
    return parallel_state.get_context_parallel_group()


def tp_group() -> dist.ProcessGroup | None:
    """The tensor-parallel group, or None when TP is 1."""
    from megatron.core import parallel_state  # lazy: the helpers above run without Megatron

    if parallel_state.get_tensor_model_parallel_world_size() == 1:
        return None
    return parallel_state.get_tensor_model_parallel_group()
