"""The trainer backend at TP=2, at PP=2, with 2 micro-batches and with full activation recomputation (TP=2
+ SP) computes what it computes at TP=1 with one: teacher velocities, the student's update loss and every student gradient (through the schedule,
DDP, finalize and the distributed optimizer)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.multirank import run_ranks

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.multirank


def _step(rank, world_size, overrides):
    from megatron.core import parallel_state

    from megatron_adapters.backend import MegatronWanBackend
    from pdmd.config import load_config

    cfg = load_config(ROOT / "configs" / "tiny_wan22.yaml", overrides)
    backend = MegatronWanBackend(cfg)
    plan = cfg.phase_plan()
    backend.setup_phase(2, 1, {}, plan.renoise_interval(2))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, *cfg.train.latent_shape, generator=g)
    text = torch.randn(2, 32, 24, generator=g)
    target = torch.randn(2, *cfg.train.latent_shape, generator=g)
    t = torch.tensor([0.95, 0.3])  # one sample per teacher expert
    v_teacher = backend.velocity("teacher", x, t, text)
    t_in = torch.full((2,), 0.625)

    def loss_fn(v, idx):
        return 0.5 * ((x[idx] + (0.0 - 0.625) * v - target[idx]) ** 2).mean()

    model = backend.trainables["student"].model
    calls = []
    model.blocks[0].register_forward_hook(lambda *_: calls.append(1))
    out = backend.train_step("student", x, t_in, text, loss_fn)
    grads = {k: p.main_grad.clone() for k, p in model.named_parameters()}
    return dict(pp=parallel_state.get_pipeline_model_parallel_rank(), tp=parallel_state.get_tensor_model_parallel_rank(),
                first=model.layer_offset, count=len(model.blocks), v=v_teacher, loss=out["loss"], grads=grads,
                block_calls=len(calls))


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    from pdmd.tiny_models import write_tiny_wan22_teacher
    from tests.tiny_encoders import UMT5_DIM, build_dataset

    root = tmp_path_factory.mktemp("layouts")
    teacher = write_tiny_wan22_teacher(root / "teacher", text_dim=UMT5_DIM)
    shards, _ = build_dataset("umt5", root / "data")
    base = [f"model.teacher.path={teacher}", f"data.shards={shards}", "student.lora=null"]
    return {name: run_ranks(_step, world, base + extra)
            for name, (world, extra) in {"tp1": (1, []), "tp2": (2, ["parallel.tp=2"]),
                                         "pp2": (2, ["parallel.pp=2"]),
                                         "tp1_mb2": (1, ["train.num_micro_batches=2"]),
                                         "tp2_recompute": (2, ["parallel.tp=2", "parallel.sequence_parallel=true",
                                                               "model.recompute=full"])}.items()}


def _diffusers_grads(ranks):
    from megatron_adapters.conversion import diffusers_from_shards
    from megatron_adapters.wan.config import WanConfig
    from megatron_adapters.wan.convert import wan_rules
    from pdmd.tiny_models import TINY_WAN

    shards = {(r["pp"], r["tp"]): r["grads"] for r in ranks}
    pp = max(r["pp"] for r in ranks) + 1
    stages = [next((r["first"], r["count"]) for r in ranks if r["pp"] == s) for s in range(pp)]
    tp = max(r["tp"] for r in ranks) + 1
    return diffusers_from_shards(shards, wan_rules(WanConfig.from_dict({**TINY_WAN, "text_dim": 24})), stages, tp)


@pytest.mark.parametrize("layout", ["tp2", "pp2", "tp1_mb2", "tp2_recompute"])
def test_backend_layout_equals_single_rank(layouts, layout):
    ref, other = layouts["tp1"], layouts[layout]
    passes = 2 if layout == "tp1_mb2" else 1  # micro-batches
    recomputed = 2 if layout.endswith("recompute") else 1  # the backward runs each block's forward again
    assert {r["block_calls"] for r in other if r["first"] == 0} == {passes * recomputed}
    for r in other:  # every rank gets the velocity and the loss
        assert torch.allclose(r["v"], ref[0]["v"], rtol=1e-5, atol=1e-6)
        assert abs(r["loss"] - ref[0]["loss"]) <= 1e-5 * abs(ref[0]["loss"])
    ref_grads, grads = _diffusers_grads(ref), _diffusers_grads(other)
    assert grads.keys() == ref_grads.keys()
    for name, g in grads.items():
        assert ((g - ref_grads[name]).norm() / ref_grads[name].norm().clamp_min(1e-20)) <= 1e-5, name
