"""Our Megatron Qwen-Image model computes diffusers' QwenImageTransformer2DModel: outputs, input gradients
and every parameter gradient (fp32, rel err <= 1e-5) with a padded text mask, at TP=1, TP=2, TP=2+SP,
PP=2, CP=2, TP2 x CP2 + SP, TP2 x PP2 + SP and PP2 x CP2, for a single image and an edit-style pair of
images; checkpoints reshard; bad checkpoints are rejected by key; unsupported configs are refused."""

from __future__ import annotations

import pytest
import torch

from pdmd.core.tensors import rel_err
from tests import tiny_qwen
from tests.multirank import run_ranks

pytestmark = pytest.mark.multirank
RTOL = 1e-5
LAYOUTS = {  # name: (world size, layout kwargs)
    "tp1": (1, {}),
    "tp2": (2, {"tp": 2}),
    "tp2_sp": (2, {"tp": 2, "sequence_parallel": True}),
    "pp2": (2, {"pp": 2}),
    "cp2": (2, {"cp": 2}),
    "tp2_cp2_sp": (4, {"tp": 2, "cp": 2, "sequence_parallel": True}),
    "tp2_pp2_sp": (4, {"tp": 2, "pp": 2, "sequence_parallel": True}),
    "pp2_cp2": (4, {"pp": 2, "cp": 2}),
}
NORMS = ("q_layernorm.weight", "k_layernorm.weight")


def _run_layout(rank, world_size, layout, cases, ckpt_dir, extra_checks):
    """Train step for every case; extra checks: save a checkpoint and show that the per-head norms'
    TP gradient sum matters ("checkpoint"), refuse image tokens that do not split ("indivisible")."""
    from megatron_adapters.runtime.parallel import ParallelLayout, initialize

    ctx = initialize(ParallelLayout(**layout))
    results = {}
    for name, (cfg_dict, state_dict, inp) in cases.items():
        tc, model = tiny_qwen.build_megatron(ctx, cfg_dict, state_dict)
        out, xgrad, grads = tiny_qwen.train_step(tc, model, inp)
        results[name] = dict(out=out, xgrad=xgrad, grads=grads, first=model.layer_offset, count=len(model.blocks))
    if "bf16" in extra_checks:
        from megatron_adapters.families.qwen_image.config import QwenImageConfig, transformer_config
        from megatron_adapters.families.qwen_image.convert import load_from_diffusers
        from megatron_adapters.families.qwen_image.model import build_qwen_image_model
        from megatron_adapters.families.qwen_image.specs import local_layer_spec

        cfg_dict, state_dict, inp = cases["t2i"]
        cfg = QwenImageConfig.from_dict(cfg_dict)
        model = build_qwen_image_model(transformer_config(cfg, ctx.model_parallel_kwargs(), params_dtype=torch.bfloat16),
                                       cfg, local_layer_spec())
        load_from_diffusers(model, dict_reader(state_dict))
        with torch.no_grad():
            results["bf16"] = tiny_qwen.call(model, dict(inp, text=inp["text"].bfloat16()),
                                             inp["latents"].bfloat16()).float()
    if "indivisible" in extra_checks:
        cfg_dict, state_dict, inp = cases["t2i"]
        _, model = tiny_qwen.build_megatron(ctx, cfg_dict, state_dict)
        try:  # 9 image tokens do not split over 2 sequence-parallel ranks
            with torch.no_grad():
                model(inp["latents"][:, :9], inp["timestep"], inp["text"], inp["text_mask"], [(1, 3, 3)])
        except ValueError as exc:
            results["indivisible"] = str(exc)
    if "checkpoint" in extra_checks:
        from megatron.core import dist_checkpointing

        from megatron_adapters.families.qwen_image.config import QwenImageConfig, transformer_config
        from megatron_adapters.families.qwen_image.convert import load_from_diffusers
        from megatron_adapters.families.qwen_image.model import build_qwen_image_model
        from megatron_adapters.families.qwen_image.specs import local_layer_spec

        cfg_dict, state_dict, inp = cases["t2i"]
        _, model = tiny_qwen.build_megatron(ctx, cfg_dict, state_dict)
        dist_checkpointing.save(model.sharded_state_dict(), ckpt_dir)
        # Without qk_layernorm, finalize_model_grads leaves each rank with its own heads' share.
        cfg = QwenImageConfig.from_dict(cfg_dict)
        tc = transformer_config(cfg, ctx.model_parallel_kwargs(), qk_layernorm=False)
        model = build_qwen_image_model(tc, cfg, local_layer_spec())
        load_from_diffusers(model, dict_reader(state_dict))
        _, _, grads = tiny_qwen.train_step(tc, model, inp)
        results["unreduced_norm_grads"] = {k: g for k, g in grads.items() if k.endswith(NORMS)}
    return dict(pp=ctx.pp_rank, tp=ctx.tp_rank, cp=ctx.cp_rank, results=results)


def dict_reader(state_dict):
    from megatron_adapters.conversion import TensorReader

    return TensorReader(state_dict)


def _load_checkpoint(rank, world_size, layout, cfg_dict, state_dict, ckpt_dir):
    """Load the TP=2 checkpoint at another layout; at TP=1 also try bad diffusers checkpoints."""
    from megatron.core import dist_checkpointing

    from megatron_adapters.conversion import ConversionError
    from megatron_adapters.families.qwen_image.config import QwenImageConfig, transformer_config
    from megatron_adapters.families.qwen_image.convert import load_from_diffusers
    from megatron_adapters.families.qwen_image.model import build_qwen_image_model
    from megatron_adapters.families.qwen_image.specs import local_layer_spec
    from megatron_adapters.runtime.parallel import ParallelLayout, initialize

    ctx = initialize(ParallelLayout(**layout))
    cfg = QwenImageConfig.from_dict(cfg_dict)
    model = build_qwen_image_model(transformer_config(cfg, ctx.model_parallel_kwargs()), cfg, local_layer_spec())
    before = {k: v.clone() for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    errors = {}
    bad_inputs = {
        "missing": {k: v for k, v in state_dict.items() if k != "transformer_blocks.1.attn.add_k_proj.weight"},
        "shape": {**state_dict, "proj_out.bias": state_dict["proj_out.bias"][:-1]},
        "unknown": {**state_dict, "transformer_blocks.0.attn.to_z.weight": state_dict["proj_out.bias"]},
        "head_norm": {**state_dict, "transformer_blocks.0.attn.norm_added_q.weight": state_dict["txt_norm.weight"]},
    }
    if layout == {}:
        for what, bad in bad_inputs.items():
            try:
                load_from_diffusers(model, dict_reader(bad))
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
    model = tiny_qwen.diffusers_model()
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    refs = {}
    for case in tiny_qwen.CASES:
        inp = tiny_qwen.inputs(case)
        refs[case] = (dict(model.config), sd, inp, tiny_qwen.diffusers_reference(model, inp))
    return refs


@pytest.fixture(scope="module")
def layout_results(references, tmp_path_factory):
    ckpt = str(tmp_path_factory.mktemp("qwen_ckpt_tp2"))
    cache = {}

    def get(name):
        if name not in cache:
            world, layout = LAYOUTS[name]
            cases = {c: references[c][:3] for c in tiny_qwen.CASES}
            extra = {"tp1": {"bf16"}, "tp2": {"checkpoint"}, "tp2_sp": {"indivisible"}}.get(name, set())
            cache[name] = run_ranks(_run_layout, world, layout, cases, ckpt, extra, timeout=400)
        return cache[name]

    return get, ckpt


def _stages(ranks, key=None):
    pp = max(r["pp"] for r in ranks) + 1
    pick = (lambda r: r["results"][key]) if key else (lambda r: r)
    return [next((pick(r)["first"], pick(r)["count"]) for r in ranks if r["pp"] == s) for s in range(pp)]


def _assemble(ranks, case, tp):
    """Output / input grad from the ranks that have them; parameter grads back in diffusers names."""
    from megatron_adapters.conversion import diffusers_from_shards
    from megatron_adapters.families.qwen_image.config import QwenImageConfig
    from megatron_adapters.families.qwen_image.convert import qwen_image_rules

    cp0 = [r for r in ranks if r["cp"] == 0]
    out = next(r["results"][case]["out"] for r in cp0 if r["results"][case]["out"] is not None)
    # Under CP each rank's input gradient covers its own tokens, scaled by cp (Megatron's schedule
    # multiplies the loss by the CP size, DDP divides parameter gradients by it): sum and divide.
    first_stage = [r for r in ranks if r["pp"] == 0 and r["tp"] == 0]
    xgrad = sum(r["results"][case]["xgrad"] for r in first_stage) / len(first_stage)
    shards = {(r["pp"], r["tp"]): r["results"][case]["grads"] for r in cp0}
    rules = qwen_image_rules(QwenImageConfig.from_dict(tiny_qwen.CONFIG))
    return out, xgrad, diffusers_from_shards(shards, rules, _stages(cp0, case), tp)


@pytest.mark.parametrize("case", list(tiny_qwen.CASES))
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_equals_diffusers(references, layout_results, layout, case):
    get, _ = layout_results
    ranks = get(layout)
    _, _, _, (ref_out, ref_xgrad, ref_grads) = references[case]
    out, xgrad, grads = _assemble(ranks, case, LAYOUTS[layout][1].get("tp", 1))
    assert rel_err(out, ref_out) <= RTOL
    assert rel_err(xgrad, ref_xgrad) <= RTOL
    assert grads.keys() == ref_grads.keys()
    for name, g in grads.items():
        assert rel_err(g, ref_grads[name]) <= RTOL, name


def test_per_head_norm_grads_need_the_tp_sum(references, layout_results):
    """Each TP rank normalises its own heads with the shared [head_dim] weight: summed over TP (what
    qk_layernorm=True makes finalize_model_grads do) the gradient is right, per rank it is not."""
    get, _ = layout_results
    ranks = get("tp2")
    _, _, _, (_, _, ref_grads) = references["t2i"]
    unreduced = ranks[0]["results"]["unreduced_norm_grads"]
    assert len(unreduced) == 8
    for key, g in unreduced.items():
        dkey = key.replace("blocks.", "transformer_blocks.").replace("attention.", "attn.")
        dkey = dkey.replace("added_q_layernorm", "norm_added_q").replace("added_k_layernorm", "norm_added_k")
        dkey = dkey.replace("q_layernorm", "norm_q").replace("k_layernorm", "norm_k")
        if ref_grads[dkey].any():  # the last block's text queries feed nothing: zero gradient either way
            assert rel_err(g, ref_grads[dkey]) > 1e-2, key


def test_bf16_is_as_close_to_fp32_as_diffusers_bf16(references, layout_results):
    """Same bf16 casts as diffusers (e.g. the timestep frequencies stay fp32): our bf16 model is as far
    from the fp32 reference as diffusers' own bf16 model, and close to it."""
    get, _ = layout_results
    ours = get("tp1")[0]["results"]["bf16"]
    _, sd, inp, (ref_out, _, _) = references["t2i"]
    model = tiny_qwen.diffusers_model().to(torch.bfloat16)
    with torch.no_grad():
        theirs = tiny_qwen.diffusers_forward(model, dict(inp, text=inp["text"].bfloat16()),
                                             inp["latents"].bfloat16()).float()
    assert rel_err(ours, ref_out) <= 1.5 * rel_err(theirs, ref_out)
    assert rel_err(ours, theirs) <= 1e-2


def test_image_tokens_must_split_over_sp_ranks(layout_results):
    get, _ = layout_results
    message = get("tp2_sp")[0]["results"]["indivisible"]
    assert "9 image tokens do not split over 2 ranks" in message


@pytest.mark.parametrize("target", [("tp1", 1, {}), ("pp2", 2, {"pp": 2})], ids=lambda t: t[0])
def test_checkpoint_saved_at_tp2_loads_bit_exactly(references, layout_results, target):
    from megatron_adapters.conversion import diffusers_from_shards
    from megatron_adapters.families.qwen_image.config import QwenImageConfig
    from megatron_adapters.families.qwen_image.convert import qwen_image_rules

    get, ckpt = layout_results
    get("tp2")  # writes the checkpoint
    cfg_dict, sd, _, _ = references["t2i"]
    _, world, layout = target
    ranks = run_ranks(_load_checkpoint, world, layout, cfg_dict, sd, ckpt)
    shards = {(r["pp"], r["tp"]): r["state"] for r in ranks}
    back = diffusers_from_shards(shards, qwen_image_rules(QwenImageConfig.from_dict(cfg_dict)), _stages(ranks), 1)
    assert back.keys() == sd.keys()
    for k, v in back.items():
        assert torch.equal(v, sd[k]), k
    if layout == {}:
        errors = ranks[0]["errors"]
        assert "'transformer_blocks.1.attn.add_k_proj.weight'" in errors["missing"]
        assert "'proj_out.bias'" in errors["shape"] and "shape" in errors["shape"]
        assert "'transformer_blocks.0.attn.to_z.weight'" in errors["unknown"]
        assert "'blocks.0.attention.added_q_layernorm.weight'" in errors["head_norm"]
        assert ranks[0]["untouched"]  # a rejected checkpoint loads nothing


@pytest.mark.parametrize("tp", [2, 4])
def test_round_trip_diffusers_megatron_diffusers_is_bit_exact(tp):
    from megatron_adapters.conversion import Layout, TensorReader, diffusers_from_shards, megatron_shard
    from megatron_adapters.families.qwen_image.config import QwenImageConfig
    from megatron_adapters.families.qwen_image.convert import qwen_image_rules

    model = tiny_qwen.diffusers_model(num_attention_heads=4)
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    cfg = QwenImageConfig.from_dict(dict(model.config))
    rules = qwen_image_rules(cfg)
    layouts = [Layout(tp_rank=r, tp=tp, first_block=0, num_blocks=cfg.num_layers) for r in range(tp)]
    shards = {(0, r): megatron_shard(TensorReader(sd), rules, layouts[r]) for r in range(tp)}
    d = cfg.hidden_size
    assert shards[(0, 0)]["blocks.0.attention.linear_added_qkv.weight"].shape == (3 * d // tp, d)
    assert shards[(0, 0)]["blocks.0.img_mod.weight"].shape == (6 * d // tp, d)  # modulation split, not replicated
    assert shards[(0, 0)]["blocks.0.attention.q_layernorm.weight"].shape == (cfg.attention_head_dim,)
    back = diffusers_from_shards(shards, rules, [(0, cfg.num_layers)], tp)
    assert back.keys() == sd.keys()
    for k, v in back.items():
        assert torch.equal(v, sd[k]), k


@pytest.mark.parametrize("key,value,needle", [
    ("zero_cond_t", True, "zero_cond_t=True"),
    ("use_additional_t_cond", True, "use_additional_t_cond=True"),
    ("use_layer3d_rope", True, "use_layer3d_rope=True"),
    ("guidance_embeds", True, "guidance_embeds=True"),
    ("axes_dims_rope", (4, 6, 8), "sums to 18"),
    ("sample_size", 64, "unknown QwenImageTransformer2DModel config keys ['sample_size']"),
])
def test_unsupported_configs_are_refused(key, value, needle):
    from megatron_adapters.families.qwen_image.config import QwenImageConfig

    with pytest.raises(ValueError, match=None) as info:
        QwenImageConfig.from_dict({**tiny_qwen.CONFIG, key: value})
    assert needle in str(info.value)


def test_real_config_reads_with_diffusers_defaults():
    from megatron_adapters.families.qwen_image.config import QwenImageConfig

    cfg = QwenImageConfig.from_dict({"_class_name": "QwenImageTransformer2DModel", "_diffusers_version": "0.35.0"})
    assert (cfg.hidden_size, cfg.num_layers, cfg.ffn_dim, cfg.out_features) == (3072, 60, 12288, 64)
    assert cfg.axes_dims_rope == (16, 56, 56)


def test_img_shapes_are_checked():
    from megatron_adapters.families.qwen_image.embeddings import image_segments

    assert image_segments([[(1, 2, 3)], [(1, 2, 3)]], 6) == ((1, 2, 3),)
    with pytest.raises(ValueError, match="differ between samples"):
        image_segments([[(1, 2, 3)], [(1, 3, 2)]], 6)
    with pytest.raises(ValueError, match="hold 6 tokens but the image sequence has 8"):
        image_segments([(1, 2, 3)], 8)


def test_teacher_reads_from_a_sharded_diffusers_folder(tmp_path):
    """save_pretrained with small shards writes an index: each TP rank reads its slices from the files."""
    from megatron_adapters.conversion import Layout, SafetensorsReader, TensorReader, megatron_shard
    from megatron_adapters.families.qwen_image.config import QwenImageConfig
    from megatron_adapters.families.qwen_image.convert import qwen_image_rules

    model = tiny_qwen.diffusers_model()
    model.save_pretrained(tmp_path, max_shard_size="40KB")
    assert len(list(tmp_path.glob("*.safetensors"))) > 1 and list(tmp_path.glob("*.index.json"))
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    rules = qwen_image_rules(QwenImageConfig.from_json(tmp_path))
    for rank in range(2):
        layout = Layout(tp_rank=rank, tp=2, first_block=1, num_blocks=1, pre_process=False)
        from_files = megatron_shard(SafetensorsReader(tmp_path), rules, layout)
        from_memory = megatron_shard(TensorReader(sd), rules, layout)
        assert from_files.keys() == from_memory.keys()
        for k, v in from_files.items():
            assert torch.equal(v, from_memory[k]), k


def test_te_spec_without_transformer_engine_says_so():
    from megatron_adapters.families.qwen_image.specs import layer_spec
    from megatron_adapters.layers.specs import te_available

    if te_available()[0]:
        pytest.skip("Transformer Engine is available here")
    with pytest.raises(RuntimeError, match="use model.spec=local"):
        layer_spec("te")
    with pytest.raises(ValueError, match="choose 'local'"):
        layer_spec("fast")
