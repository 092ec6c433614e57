"""Our Megatron Wan model computes diffusers' WanTransformer3DModel: outputs, input gradients and every
parameter gradient (fp32, rel err <= 1e-5), at TP=1, TP=2, TP=2+SP, PP=2, CP=2 and TP2 x CP2 (+SP), for
T2V-, I2V- and TI2V-shaped tiny models; checkpoints reshard; bad checkpoints are rejected."""

from __future__ import annotations

import pytest
import torch

from pdmd.core.tensors import rel_err
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


def _run_layout(rank, world_size, layout, cases, ckpt_dir, save):
    """Train step for every case; at TP=2 also save a checkpoint and run once with a per-rank q/k norm."""
    from megatron_adapters.runtime.parallel import ParallelLayout, initialize

    ctx = initialize(ParallelLayout(**layout))
    results = {}
    for name, (cfg_dict, state_dict, inp) in cases.items():
        tc, model = tiny_wan.build_megatron(ctx, cfg_dict, state_dict)
        out, xgrad, grads = tiny_wan.train_step(tc, model, inp)
        results[name] = dict(out=out, xgrad=xgrad, grads=grads, first=model.layer_offset, count=len(model.blocks))
        if save and name == "t2v":
            from megatron.core import dist_checkpointing

            import megatron_adapters.layers.attention as attention

            dist_checkpointing.save(model.sharded_state_dict(), ckpt_dir)
            reduce = attention.all_reduce_sum
            attention.all_reduce_sum = lambda x, group: x  # each rank normalises over its own heads only
            with torch.no_grad():
                results["per_rank_qk_norm"] = model(inp["latents"], inp["timestep"], inp["text"])
            attention.all_reduce_sum = reduce
    return dict(pp=ctx.pp_rank, tp=ctx.tp_rank, cp=ctx.cp_rank, results=results)


def _load_checkpoint(rank, world_size, layout, cfg_dict, state_dict, ckpt_dir):
    """Load the TP=2 checkpoint at another layout; at TP=1 also try bad diffusers checkpoints."""
    from megatron.core import dist_checkpointing

    from megatron_adapters.conversion import ConversionError, TensorReader
    from megatron_adapters.families.wan.config import WanConfig, transformer_config
    from megatron_adapters.families.wan.convert import load_from_diffusers
    from megatron_adapters.families.wan.model import build_wan_model
    from megatron_adapters.families.wan.specs import local_layer_spec
    from megatron_adapters.runtime.parallel import ParallelLayout, initialize

    ctx = initialize(ParallelLayout(**layout))
    cfg = WanConfig.from_dict(cfg_dict)
    model = build_wan_model(transformer_config(cfg, ctx.model_parallel_kwargs()), cfg, local_layer_spec())
    before = {k: v.clone() for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    errors = {}
    bad_inputs = {
        "missing": {k: v for k, v in state_dict.items() if k != "blocks.1.attn1.to_k.weight"},
        "shape": {**state_dict, "proj_out.bias": state_dict["proj_out.bias"][:-1]},
        "unknown": {**state_dict, "blocks.0.attn1.to_z.weight": state_dict["proj_out.bias"]},
    }
    if layout == {}:
        for what, bad in bad_inputs.items():
            try:
                load_from_diffusers(model, TensorReader(bad))
            except ConversionError as exc:
                errors[what] = str(exc)
    untouched = all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    loaded = dist_checkpointing.load(model.sharded_state_dict(), ckpt_dir)
    model.load_state_dict(loaded, strict=False)
    state = {k: v.clone() for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    return dict(pp=ctx.pp_rank, tp=ctx.tp_rank, first=model.layer_offset, count=len(model.blocks), state=state,
                errors=errors, untouched=untouched)


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
    from megatron_adapters.families.wan.config import WanConfig
    from megatron_adapters.families.wan.convert import wan_rules

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


def test_per_rank_qk_norm_would_be_wrong(references, layout_results):
    """Wan's q/k RMSNorm spans all heads: normalising each TP rank's heads alone is another function."""
    get, _ = layout_results
    ranks = get("tp2")
    _, _, _, (ref_out, _, _) = references["t2v", "odd"]
    assert rel_err(ranks[0]["results"]["per_rank_qk_norm"], ref_out) > 1e-3
    assert rel_err(ranks[0]["results"]["t2v"]["out"], ref_out) <= RTOL


def _stages(ranks):
    pp = max(r["pp"] for r in ranks) + 1
    return [next((r["first"], r["count"]) for r in ranks if r["pp"] == s) for s in range(pp)]


@pytest.mark.parametrize("target", [("tp1", 1, {}), ("pp2", 2, {"pp": 2})], ids=lambda t: t[0])
def test_checkpoint_saved_at_tp2_loads_bit_exactly(references, layout_results, target):
    from megatron_adapters.conversion import diffusers_from_shards
    from megatron_adapters.families.wan.config import WanConfig
    from megatron_adapters.families.wan.convert import wan_rules

    get, ckpt = layout_results
    get("tp2")  # writes the checkpoint
    cfg_dict, sd, _, _ = references["t2v", "odd"]
    _, world, layout = target
    ranks = run_ranks(_load_checkpoint, world, layout, cfg_dict, sd, ckpt)
    shards = {(r["pp"], r["tp"]): r["state"] for r in ranks}
    back = diffusers_from_shards(shards, wan_rules(WanConfig.from_dict(cfg_dict)), _stages(ranks), 1)
    assert back.keys() == sd.keys()
    for k, v in back.items():
        assert torch.equal(v, sd[k]), k
    if layout == {}:
        errors = ranks[0]["errors"]
        assert "'blocks.1.attn1.to_k.weight'" in errors["missing"]
        assert "'proj_out.bias'" in errors["shape"] and "shape" in errors["shape"]
        assert "'blocks.0.attn1.to_z.weight'" in errors["unknown"]
        assert ranks[0]["untouched"]  # a rejected checkpoint loads nothing


@pytest.mark.parametrize("tp", [2, 4])
def test_round_trip_diffusers_megatron_diffusers_is_bit_exact(tp):
    from megatron_adapters.conversion import Layout, TensorReader, diffusers_from_shards, megatron_shard
    from megatron_adapters.families.wan.config import WanConfig
    from megatron_adapters.families.wan.convert import wan_rules

    cfg_dict = dict(tiny_wan.VARIANTS["i2v"], num_attention_heads=4, added_kv_proj_dim=64)
    model = tiny_wan.diffusers_model("i2v") if tp == 2 else None
    if model is None:
        from diffusers import WanTransformer3DModel

        torch.manual_seed(0)
        model = WanTransformer3DModel(**cfg_dict)
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    cfg = WanConfig.from_dict(dict(model.config))
    rules = wan_rules(cfg)
    layouts = [Layout(tp_rank=r, tp=tp, first_block=0, num_blocks=cfg.num_layers) for r in range(tp)]
    shards = {(0, r): megatron_shard(TensorReader(sd), rules, layouts[r]) for r in range(tp)}
    q0 = shards[(0, 0)]["blocks.0.self_attention.linear_qkv.weight"]
    assert q0.shape[0] == 3 * cfg.hidden_size // tp  # each rank holds q, k and v of its own heads
    back = diffusers_from_shards(shards, rules, [(0, cfg.num_layers)], tp)
    assert back.keys() == sd.keys()
    for k, v in back.items():
        assert torch.equal(v, sd[k]), k
