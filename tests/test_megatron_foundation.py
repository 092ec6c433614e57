"""The real Megatron-core stack on CPU/gloo: TP (with and without SP) and PP equal the single-rank
reference, and distributed checkpoints reshard bit-exactly (TP2 -> TP1, TP2 -> PP2)."""

from __future__ import annotations

import pytest
import torch

from pdmd.core.tensors import rel_err
from tests import megatron_blocks as mb
from tests.multirank import run_ranks

pytestmark = pytest.mark.multirank
RTOL = 1e-5


def _init(**layout):
    from megatron_adapters.runtime.parallel import ParallelLayout, initialize

    return initialize(ParallelLayout(**layout), seed=1234)


def _grads(module, attr: str) -> dict[str, torch.Tensor]:
    return {n: getattr(p, attr).detach().clone() for n, p in module.named_parameters()}


def _reference(rank, world_size):
    """TP=1/PP=1: weights, output, input and parameter gradients."""
    _init()
    block = mb.build_block(mb.make_config())
    x, w = mb.inputs()
    x.requires_grad_(True)
    out = block(hidden_states=x, attention_mask=None)
    (out * w).sum().backward()
    weights = mb.tensor_state(block)
    return weights, out.detach(), x.grad.clone(), _grads(block, "grad")


def _tensor_parallel(rank, world_size, weights, ckpt_dir):
    """TP=2 with and without sequence parallel, through Megatron's DDP and finalize_model_grads."""
    from megatron.core import dist_checkpointing
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads

    ctx = _init(tp=2)
    results = {}
    for sp in (False, True):
        config = mb.make_config(tp=2, sp=sp)
        block = mb.build_block(config)
        mb.load_tensors(block, mb.shard_for_tp(weights, ctx.tp_rank, 2))
        model = DistributedDataParallel(config, DistributedDataParallelConfig(), module=block)
        x, w = mb.inputs()
        if sp:  # each TP rank holds its slice of the sequence
            x, w = x.chunk(2, dim=0)[ctx.tp_rank], w.chunk(2, dim=0)[ctx.tp_rank]
        x = x.clone().requires_grad_(True)
        out = model(hidden_states=x, attention_mask=None)
        (out * w).sum().backward()
        finalize_model_grads([model])
        results[sp] = (out.detach(), x.grad.clone(), _grads(block, "main_grad"))
        if not sp:
            dist_checkpointing.save(block.sharded_state_dict(), ckpt_dir)
    return results


def _pipeline_parallel(rank, world_size, weights, ckpt_dir):
    """PP=2 through get_forward_backward_func (2 micro-batches), then load the TP=2 checkpoint at PP=2."""
    from functools import partial

    from megatron.core import dist_checkpointing
    from megatron.core.pipeline_parallel import get_forward_backward_func

    ctx = _init(pp=2)
    first, last = ctx.pp_rank == 0, ctx.pp_rank == 1
    config = mb.make_config(pp=2)
    block = mb.build_block(config, pre_process=first, post_process=last)
    names = mb.stage_layer_names(weights, ctx.pp_rank, 2)
    mb.load_tensors(block, {local: weights[full] for local, full in names.items()})

    x, w = mb.inputs()
    x.requires_grad_(True)
    micro = [(x[:, i : i + 1], w[:, i : i + 1]) for i in range(mb.BATCH)]
    outputs = []

    def loss_fn(w_mb, out):
        outputs.append(out.detach())
        loss = (out * w_mb).sum()
        return loss, {"loss": loss.detach()}

    def forward_step(data_iterator, model):
        x_mb, w_mb = next(data_iterator)
        return model(hidden_states=x_mb, attention_mask=None), partial(loss_fn, w_mb)

    get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter(micro), model=[block],
        num_microbatches=len(micro), seq_length=mb.SEQ, micro_batch_size=1, forward_only=False,
    )
    grads = {names[n]: g for n, g in _grads(block, "grad").items()}
    out = torch.cat(outputs, dim=1) if last else None
    x_grad = x.grad.clone() if first else None

    fresh = mb.build_block(config, pre_process=first, post_process=last)
    loaded = dist_checkpointing.load(fresh.sharded_state_dict(), ckpt_dir)
    fresh.load_state_dict(loaded, strict=True)
    reloaded = {names[n]: v for n, v in mb.tensor_state(fresh).items()}
    return out, x_grad, grads, reloaded


def _load_at_tp1(rank, world_size, ckpt_dir):
    from megatron.core import dist_checkpointing

    _init()
    block = mb.build_block(mb.make_config())
    block.load_state_dict(dist_checkpointing.load(block.sharded_state_dict(), ckpt_dir), strict=True)
    return mb.tensor_state(block)


@pytest.fixture(scope="module")
def reference():
    return run_ranks(_reference, 1)[0]


@pytest.fixture(scope="module")
def tp2(reference, tmp_path_factory):
    ckpt = tmp_path_factory.mktemp("ckpt_tp2")
    return run_ranks(_tensor_parallel, 2, reference[0], str(ckpt)), str(ckpt)


@pytest.mark.parametrize("sp", [False, True], ids=["tp2", "tp2_sp"])
def test_tensor_parallel_matches_single_rank(reference, tp2, sp):
    _, ref_out, ref_xgrad, ref_grads = reference
    ranks, _ = tp2
    per_rank = [r[sp] for r in ranks]
    if sp:  # outputs and input grads are sequence slices
        out = torch.cat([r[0] for r in per_rank], dim=0)
        xgrad = torch.cat([r[1] for r in per_rank], dim=0)
    else:  # replicated: every rank holds the whole thing
        assert torch.equal(per_rank[0][0], per_rank[1][0])
        out, xgrad = per_rank[0][0], per_rank[0][1]
    assert rel_err(out, ref_out) <= RTOL
    assert rel_err(xgrad, ref_xgrad) <= RTOL
    grads = mb.unshard_tp([r[2] for r in per_rank])
    assert grads.keys() == ref_grads.keys()
    for name, g in grads.items():
        assert rel_err(g, ref_grads[name]) <= RTOL, name
    if sp:  # norm grads are partial per rank until finalize_model_grads all-reduces them over TP
        norm = "layers.0.input_layernorm.weight"
        assert torch.equal(per_rank[0][2][norm], per_rank[1][2][norm])


def test_pipeline_parallel_and_checkpoint_resharding(reference, tp2):
    weights, ref_out, ref_xgrad, ref_grads = reference
    _, ckpt = tp2
    stage0, stage1 = run_ranks(_pipeline_parallel, 2, weights, ckpt)
    # Megatron averages the per-micro-batch losses: gradients are the reference's / num_microbatches.
    scale = 1.0 / mb.BATCH
    assert rel_err(stage1[0], ref_out) <= RTOL
    assert rel_err(stage0[1], ref_xgrad * scale) <= RTOL
    grads = {**stage0[2], **stage1[2]}
    assert grads.keys() == ref_grads.keys()
    for name, g in grads.items():
        assert rel_err(g, ref_grads[name] * scale) <= RTOL, name
    # The TP=2 checkpoint loads at PP=2 bit-exactly.
    reloaded = {**stage0[3], **stage1[3]}
    assert reloaded.keys() == weights.keys()
    for name, value in reloaded.items():
        assert torch.equal(value, weights[name]), name


def test_checkpoint_saved_at_tp2_loads_at_tp1(reference, tp2):
    weights = reference[0]
    _, ckpt = tp2
    loaded = run_ranks(_load_at_tp1, 1, ckpt)[0]
    assert loaded.keys() == weights.keys()
    for name, value in loaded.items():
        assert torch.equal(value, weights[name]), name


def _ulysses_all_to_all(rank, world_size):
    import torch.distributed as dist

    from megatron_adapters.runtime.comm import heads_to_sequence, sequence_to_heads

    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(8, 2, 4, 3, generator=g), torch.randn(8, 2, 4, 3, generator=g)  # [tokens, b, heads, d]
    # a strided view, as attention's q/k/v are (unbind of the fused projection)
    mine = x.chunk(world_size, 0)[rank].transpose(0, 1).contiguous().transpose(0, 1).requires_grad_(True)
    y = sequence_to_heads(mine, dist.group.WORLD)
    (y * w.chunk(world_size, 2)[rank]).sum().backward()
    return (torch.equal(y, x.chunk(world_size, 2)[rank]), torch.equal(heads_to_sequence(y, dist.group.WORLD), mine),
            torch.equal(mine.grad, w.chunk(world_size, 0)[rank]))


def test_ulysses_all_to_all_trades_tokens_for_heads_and_back():
    """Rank r's tokens of every head -> every token of rank r's heads (and back), gradients the inverse."""
    for result in run_ranks(_ulysses_all_to_all, 2):
        assert result == (True, True, True)
