"""LoRA on the parallel linears: off = teacher exactly, zero-initialised B = teacher exactly, gradients
only in LoRA parameters, and TP=2 (with and without SP) computes what TP=1 computes."""

from __future__ import annotations

import zlib

import pytest
import torch

from tests import tiny_wan
from tests.multirank import run_ranks

pytestmark = pytest.mark.multirank
RANK = 4


def _full_b(name: str, rows: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    return 0.1 * torch.randn(rows, RANK, generator=g)


def _run(rank, world_size, layout, cfg_dict, state_dict, inp):
    from megatron_adapters.lora import LoRAConfig, apply_lora, lora_disabled
    from megatron_adapters.parallel import ParallelLayout, initialize

    ctx = initialize(ParallelLayout(**layout))
    tp = layout.get("tp", 1)
    tc, model = tiny_wan.build_megatron(ctx, cfg_dict, state_dict)
    args = (inp["latents"], inp["timestep"], inp["text"])
    for p in model.parameters():  # the teacher is frozen (Megatron's linears take their frozen-weight path)
        p.requires_grad_(False)
    with torch.no_grad():
        teacher = model(*args)
        wrappers = apply_lora(model, LoRAConfig(rank=RANK, alpha=8.0, seed=3))
        zero_b = model(*args)
        names = {id(m): n for n, m in model.named_modules()}
        init_a = {}
        for m in wrappers:
            name = names[id(m)]
            init_a[name] = m.lora_A.detach().clone()
            rows = m.lora_B.shape[0] * (tp if m.kind == "column" else 1)
            full = _full_b(name, rows)
            m.lora_B.copy_(full.chunk(tp, 0)[ctx.tp_rank] if m.kind == "column" else full)
        with lora_disabled(model):
            off = model(*args)
        on_no_grad = model(*args)
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    out, _, grads = tiny_wan.train_step(tc, model, inp)
    kinds = {names[id(m)]: m.kind for m in wrappers}
    return dict(tp_rank=ctx.tp_rank, teacher=teacher, zero_b=zero_b, off=off, on=out, on_no_grad=on_no_grad,
                trainable=trainable, grads=grads, init_a=init_a, kinds=kinds)


def _assemble(ranks, what):
    """Join per-TP-rank LoRA tensors: column B on dim 0, row A on dim 1, the others replicated."""
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
        else:
            assert all(torch.equal(parts[0], p) for p in parts), key
            out[key] = parts[0]
    return out


@pytest.fixture(scope="module")
def runs():
    torch.set_num_threads(1)
    model = tiny_wan.diffusers_model("t2v")
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    inp = tiny_wan.inputs("t2v", "even")
    cfg = dict(model.config)
    return {name: run_ranks(_run, world, layout, cfg, sd, inp)
            for name, (world, layout) in {"tp1": (1, {}), "tp2": (2, {"tp": 2}),
                                          "tp2_sp": (2, {"tp": 2, "sequence_parallel": True})}.items()}


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("layout", ["tp1", "tp2", "tp2_sp"])
def test_adapters_off_and_zero_b_are_the_teacher(runs, layout):
    for r in runs[layout]:
        assert torch.equal(r["zero_b"], r["teacher"])
        assert torch.equal(r["off"], r["teacher"])
        assert rel_err(r["on_no_grad"], r["teacher"]) > 1e-3  # the adapters do something when on
        assert torch.allclose(r["on"], r["on_no_grad"], rtol=0, atol=1e-6)
        assert r["trainable"] and all(".lora_" in n for n in r["trainable"])
        assert set(r["grads"]) == set(r["trainable"])


@pytest.mark.parametrize("layout", ["tp2", "tp2_sp"])
def test_tensor_parallel_lora_equals_single_rank(runs, layout):
    ref = runs["tp1"][0]
    ranks = runs[layout]
    assert rel_err(ranks[0]["on"], ref["on"]) <= 1e-5
    init = _assemble(ranks, "init_a")
    assert init.keys() == ref["init_a"].keys()
    for k, v in init.items():
        assert torch.equal(v, ref["init_a"][k]), k  # TP-invariant initialisation
    grads = _assemble(ranks, "grads")
    assert grads.keys() == ref["grads"].keys()
    for k, g in grads.items():
        assert rel_err(g, ref["grads"][k]) <= 1e-5, k
