"""LoRA on the parallel linears of both model families (Qwen-Image: both streams): off = teacher exactly,
zero-initialised B = teacher exactly, gradients only in LoRA parameters, the initialisation does not depend
on TP, and TP=2 (with and without SP) computes what TP=1 computes; Qwen-Image's gathered modulation
projections are refused as targets."""

from __future__ import annotations

import zlib

import pytest
import torch

from pdmd.core.tensors import rel_err
from tests import tiny_qwen, tiny_wan
from tests.multirank import run_ranks

pytestmark = pytest.mark.multirank
RANK = 4
FAMILIES = {"wan": tiny_wan, "qwen": tiny_qwen}
LAYOUTS = {"wan": {"tp1": (1, {}), "tp2": (2, {"tp": 2}), "tp2_sp": (2, {"tp": 2, "sequence_parallel": True})},
           "qwen": {"tp1": (1, {}), "tp2_sp": (2, {"tp": 2, "sequence_parallel": True})}}
CASES = [(family, layout) for family, layouts in LAYOUTS.items() for layout in layouts]
QWEN_STREAM_TARGETS = {"linear_qkv", "linear_proj", "linear_added_qkv", "linear_added_proj", "linear_fc1",
                       "linear_fc2"}


def _full_b(name: str, rows: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    return 0.1 * torch.randn(rows, RANK, generator=g)


def _run(rank, world_size, family, layout, cfg_dict, state_dict, inp):
    from megatron_adapters.layers.lora import LoRAConfig, apply_lora, lora_disabled
    from megatron_adapters.runtime.parallel import ParallelLayout, initialize

    tiny = FAMILIES[family]
    ctx = initialize(ParallelLayout(**layout))
    tp = layout.get("tp", 1)
    tc, model = tiny.build_megatron(ctx, cfg_dict, state_dict)
    refused = ""
    if family == "qwen":
        try:
            apply_lora(model, LoRAConfig(rank=RANK, targets=("img_mod",)))
        except ValueError as exc:
            refused = str(exc)
    for p in model.parameters():  # the teacher is frozen (Megatron's linears take their frozen-weight path)
        p.requires_grad_(False)
    x = inp["latents"]
    with torch.no_grad():
        teacher = tiny.call(model, inp, x)
        wrappers = apply_lora(model, LoRAConfig(rank=RANK, alpha=8.0, seed=3))
        zero_b = tiny.call(model, inp, x)
        names = {id(m): n for n, m in model.named_modules()}
        init_a = {}
        for m in wrappers:
            name = names[id(m)]
            init_a[name] = m.lora_A.detach().clone()
            rows = m.lora_B.shape[0] * (tp if m.kind == "column" else 1)
            full = _full_b(name, rows)
            m.lora_B.copy_(full.chunk(tp, 0)[ctx.tp_rank] if m.kind == "column" else full)
        with lora_disabled(model):
            off = tiny.call(model, inp, x)
        on_no_grad = tiny.call(model, inp, x)
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    out, _, grads = tiny.train_step(tc, model, inp)
    kinds = {names[id(m)]: m.kind for m in wrappers}
    return dict(tp_rank=ctx.tp_rank, teacher=teacher, zero_b=zero_b, off=off, on=out, on_no_grad=on_no_grad,
                trainable=trainable, grads=grads, init_a=init_a, kinds=kinds, refused=refused)


def _assemble(ranks, what, exact):
    """Join per-TP-rank LoRA tensors: column B on dim 0, row A on dim 1, the others replicated (bit-equal
    with ``exact``; Qwen-Image's replicated gradients differ in the last bits between TP ranks)."""
    kinds = ranks[0]["kinds"]
    out = {}
    for key in ranks[0][what]:
        module = key.rsplit(".lora_", 1)[0] if ".lora_" in key else key
        letter = "A" if (key.endswith("lora_A") or what == "init_a") else "B"
        parts = [r[what][key] for r in ranks]
        if kinds[module] == "column" and letter == "B":
            out[key] = torch.cat(parts, 0)
        elif kinds[module] == "row" and letter == "A":
            out[key] = torch.cat(parts, 1)
        elif exact:
            assert all(torch.equal(parts[0], p) for p in parts), key
            out[key] = parts[0]
        else:
            assert all(torch.allclose(parts[0], p, rtol=1e-6, atol=1e-9) for p in parts), key
            out[key] = parts[0]
    return out


@pytest.fixture(scope="module")
def runs():
    """family -> layout -> every rank's result: a tiny diffusers model (Wan T2V, Qwen-Image with an
    edit-style pair of images and a padded prompt) converted and adapted at each layout."""
    torch.set_num_threads(1)
    out = {}
    for family, tiny in FAMILIES.items():
        model = tiny.diffusers_model("t2v") if family == "wan" else tiny.diffusers_model()
        sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
        inp = tiny.inputs("t2v", "even") if family == "wan" else tiny.inputs("edit")
        out[family] = {name: run_ranks(_run, world, family, layout, dict(model.config), sd, inp)
                       for name, (world, layout) in LAYOUTS[family].items()}
    return out


@pytest.mark.parametrize("family, layout", CASES, ids=[f"{f}-{lay}" for f, lay in CASES])
def test_adapters_off_and_zero_b_are_the_teacher(runs, family, layout):
    for r in runs[family][layout]:
        assert torch.equal(r["zero_b"], r["teacher"])
        assert torch.equal(r["off"], r["teacher"])
        assert rel_err(r["on_no_grad"], r["teacher"]) > 1e-3  # the adapters do something when on
        assert torch.allclose(r["on"], r["on_no_grad"], rtol=0, atol=1e-6)
        assert r["trainable"] and all(".lora_" in n for n in r["trainable"])
        assert set(r["grads"]) == set(r["trainable"])
        if family == "qwen":  # both streams' attention and MLP linears carry adapters
            assert {k.rsplit(".", 1)[-1] for k in r["kinds"]} == QWEN_STREAM_TARGETS
            assert any(".txt_mlp." in k for k in r["kinds"]) and any(".img_mlp." in k for k in r["kinds"])


TP_CASES = [(f, lay) for f, lay in CASES if lay != "tp1"]


@pytest.mark.parametrize("family, layout", TP_CASES, ids=[f"{f}-{lay}" for f, lay in TP_CASES])
def test_tensor_parallel_lora_equals_single_rank(runs, family, layout):
    ref, ranks = runs[family]["tp1"][0], runs[family][layout]
    assert rel_err(ranks[0]["on"], ref["on"]) <= 1e-5
    init = _assemble(ranks, "init_a", exact=True)
    assert init.keys() == ref["init_a"].keys()
    for k, v in init.items():
        assert torch.equal(v, ref["init_a"][k]), k  # TP-invariant initialisation
    grads = _assemble(ranks, "grads", exact=family == "wan")
    assert grads.keys() == ref["grads"].keys()
    for key, g in ref["grads"].items():
        if g.any():
            assert rel_err(grads[key], g) <= 1e-5, key
        else:  # Qwen-Image: adapters on the last block's text-only path feed nothing
            assert not grads[key].any(), key


def test_qwen_modulation_projections_are_refused_as_targets(runs):
    message = runs["qwen"]["tp1"][0]["refused"]
    assert "img_mod" in message and "gathers its output" in message
