"""LoRA on the Qwen-Image model's parallel linears (both streams): off = teacher exactly, zero B = teacher
exactly, gradients only in LoRA parameters, TP=2 + SP computes what TP=1 computes; the gathered
modulation projections are refused as targets."""

from __future__ import annotations

import zlib

import pytest
import torch

from tests import tiny_qwen
from tests.multirank import run_ranks

pytestmark = pytest.mark.multirank
RANK = 4
STREAM_TARGETS = {"linear_qkv", "linear_proj", "linear_added_qkv", "linear_added_proj", "linear_fc1", "linear_fc2"}


def _full_b(name: str, rows: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    return 0.1 * torch.randn(rows, RANK, generator=g)


def _run(rank, world_size, layout, cfg_dict, state_dict, inp):
    from megatron_adapters.lora import LoRAConfig, apply_lora, lora_disabled
    from megatron_adapters.parallel import ParallelLayout, initialize

    ctx = initialize(ParallelLayout(**layout))
    tp = layout.get("tp", 1)
    tc, model = tiny_qwen.build_megatron(ctx, cfg_dict, state_dict)
    refused = ""
    try:
        apply_lora(model, LoRAConfig(rank=RANK, targets=("img_mod",)))
    except ValueError as exc:
        refused = str(exc)
    for p in model.parameters():  # the teacher is frozen
        p.requires_grad_(False)
    x = inp["latents"]
    with torch.no_grad():
        teacher = tiny_qwen.call(model, inp, x)
        wrappers = apply_lora(model, LoRAConfig(rank=RANK, alpha=8.0, seed=3))
        zero_b = tiny_qwen.call(model, inp, x)
        names = {id(m): n for n, m in model.named_modules()}
        for m in wrappers:
            name = names[id(m)]
            rows = m.lora_B.shape[0] * (tp if m.kind == "column" else 1)
            full = _full_b(name, rows)
            m.lora_B.copy_(full.chunk(tp, 0)[ctx.tp_rank] if m.kind == "column" else full)
        with lora_disabled(model):
            off = tiny_qwen.call(model, inp, x)
        on_no_grad = tiny_qwen.call(model, inp, x)
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    out, _, grads = tiny_qwen.train_step(tc, model, inp)
    kinds = {names[id(m)]: m.kind for m in wrappers}
    return dict(teacher=teacher, zero_b=zero_b, off=off, on=out, on_no_grad=on_no_grad, trainable=trainable,
                grads=grads, kinds=kinds, refused=refused)


@pytest.fixture(scope="module")
def runs():
    torch.set_num_threads(1)
    model = tiny_qwen.diffusers_model()
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    inp = tiny_qwen.inputs("edit")
    cfg = dict(model.config)
    layouts = {"tp1": (1, {}), "tp2_sp": (2, {"tp": 2, "sequence_parallel": True})}
    return {name: run_ranks(_run, world, layout, cfg, sd, inp) for name, (world, layout) in layouts.items()}


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


def _join(ranks, key, kind):
    """Column B is split on dim 0 and Row A on dim 1 over TP; the other LoRA factor is replicated."""
    module, letter = key.rsplit(".lora_", 1)
    parts = [r["grads"][key] for r in ranks]
    if (kind == "column" and letter == "B") or (kind == "row" and letter == "A"):
        return torch.cat(parts, 0 if kind == "column" else 1)
    assert all(torch.allclose(parts[0], p, rtol=1e-6, atol=1e-9) for p in parts), key
    return parts[0]


@pytest.mark.parametrize("layout", ["tp1", "tp2_sp"])
def test_adapters_off_and_zero_b_are_the_teacher(runs, layout):
    for r in runs[layout]:
        assert torch.equal(r["zero_b"], r["teacher"])
        assert torch.equal(r["off"], r["teacher"])
        assert rel_err(r["on_no_grad"], r["teacher"]) > 1e-3
        assert torch.allclose(r["on"], r["on_no_grad"], rtol=0, atol=1e-6)
        assert r["trainable"] and all(".lora_" in n for n in r["trainable"])
        assert set(r["grads"]) == set(r["trainable"])
        # Both streams' attention and MLP linears carry adapters.
        assert {k.rsplit(".", 1)[-1] for k in r["kinds"]} == STREAM_TARGETS
        assert any(".txt_mlp." in k for k in r["kinds"]) and any(".img_mlp." in k for k in r["kinds"])


def test_tensor_parallel_lora_equals_single_rank(runs):
    ref, ranks = runs["tp1"][0], runs["tp2_sp"]
    assert rel_err(ranks[0]["on"], ref["on"]) <= 1e-5
    assert ranks[0]["grads"].keys() == ref["grads"].keys()
    for key, g in ref["grads"].items():
        joined = _join(ranks, key, ref["kinds"][key.rsplit(".lora_", 1)[0]])
        if g.any():
            assert rel_err(joined, g) <= 1e-5, key
        else:  # adapters on the last block's text-only path feed nothing
            assert not joined.any(), key


def test_modulation_projections_are_refused_as_targets(runs):
    message = runs["tp1"][0]["refused"]
    assert "img_mod" in message and "gathers its output" in message
