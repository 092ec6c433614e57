"""Roles across phases: every phase's fakes start again from the teacher (not from the previous phase's
trained fakes), only the roles of the phase are built, and a frozen earlier expert is what phase 1 saved."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.multirank import run_ranks

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.multirank


def _phases(rank, world_size, overrides, expert_dir):
    from megatron_adapters.backend import MegatronBackend, _base_state
    from pdmd.core.config import load_config

    cfg = load_config(ROOT / "configs" / "tiny_wan22.yaml", overrides)
    backend = MegatronBackend(cfg)
    plan = cfg.phase_plan()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, *cfg.train.latent_shape, generator=g)
    text = torch.randn(2, 32, 24, generator=g)

    def state(role):
        return {k: v.clone() for k, v in _base_state(backend.trainables[role].model).items()}

    def teacher(e):
        return {k: v.clone() for k, v in _base_state(backend._new_model(e)).items()}

    out = {}
    backend.setup_phase(1, 0, {}, plan.renoise_interval(1))
    out["phase1_roles"] = sorted(backend.trainables)
    out["phase1_fake0_is_teacher"] = _equal(state("fake0"), teacher(0))
    t = torch.full((2,), 0.95)  # inside expert 0's range
    backend.train_step("fake0", x, t, text, lambda v, idx: (v ** 2).mean())
    out["phase1_fake0_moved"] = not _equal(state("fake0"), teacher(0))
    backend.save_expert(expert_dir)
    saved_student = {k: v.clone() for k, v in backend.trainables["student"].model.state_dict().items()
                     if ".lora_" not in k and not k.endswith("_extra_state")}

    backend.setup_phase(2, 1, {1: (0, str(expert_dir))}, plan.renoise_interval(2))
    out["phase2_roles"] = sorted(backend.trainables)
    out["phase2_fake0_is_teacher"] = _equal(state("fake0"), teacher(0))
    out["phase2_fake1_is_teacher"] = _equal(state("fake1"), teacher(1))
    expert = {k: v for k, v in backend.experts[1].state_dict().items() if not k.endswith("_extra_state")}
    # phase 1's student had zero-initialised LoRA B and no update: its merged expert is the teacher.
    out["expert1_is_phase1_student"] = _equal(expert, {k.replace(".base.", "."): v for k, v in saved_student.items()})
    return out


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_fakes_reinitialised_every_phase_and_earlier_expert_frozen(wan_tiny, tmp_path):
    (out,) = run_ranks(_phases, 1, wan_tiny.overrides, tmp_path / "expert1")
    assert out["phase1_roles"] == ["fake0", "student"]  # phase 1 re-noises inside expert 0's range only
    assert out["phase1_fake0_is_teacher"] and out["phase1_fake0_moved"]
    assert out["phase2_roles"] == ["fake0", "fake1", "student"]
    assert out["phase2_fake0_is_teacher"], "phase 2's fake0 must restart from the teacher, not phase 1's fake"
    assert out["phase2_fake1_is_teacher"]
    assert out["expert1_is_phase1_student"]


def _lora_grad_norms(rank, world_size, overrides):
    from megatron_adapters.backend import MegatronBackend
    from pdmd.core.config import load_config

    out = {}
    for recompute in ("none", "full"):
        cfg = load_config(ROOT / "configs" / "tiny_wan22.yaml", [*overrides, f"model.recompute={recompute}"])
        backend = MegatronBackend(cfg)
        backend.setup_phase(1, 0, {}, cfg.phase_plan().renoise_interval(1))
        g = torch.Generator().manual_seed(0)
        x = torch.randn(2, *cfg.train.latent_shape, generator=g)
        text = torch.randn(2, 32, 24, generator=g)
        target = torch.randn(2, *cfg.train.latent_shape, generator=g)
        res = backend.train_step("student", x, torch.full((2,), 0.95), text,
                                 lambda v, idx, target=target: ((v - target[idx]) ** 2).mean())
        out[recompute] = res["grad_norm"]
    return out


def test_recompute_trains_a_lora_student_like_no_recompute(wan_tiny):
    """A LoRA student's blocks get a frozen embedding's output; recomputation must still give its adapters
    their gradients (Megatron's reentrant checkpoint would silently give none)."""
    (out,) = run_ranks(_lora_grad_norms, 1, [*wan_tiny.overrides, "student.lora.rank=4"])
    assert out["none"] > 0
    assert out["full"] == pytest.approx(out["none"], rel=1e-5)


def _ema(rank, world_size, overrides, tmp):
    from megatron_adapters.backend import MegatronBackend
    from megatron_adapters.layers.lora import lora_modules
    from pdmd.core.config import load_config

    cfg = load_config(ROOT / "configs" / "tiny_wan22.yaml", [*overrides, "student.ema=0.9"])
    backend = MegatronBackend(cfg)
    backend.setup_phase(1, 0, {}, cfg.phase_plan().renoise_interval(1))
    student = backend.trainables["student"]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, *cfg.train.latent_shape, generator=g)
    text = torch.randn(2, 32, 24, generator=g)
    trained = {n: p for n, p in student.model.named_parameters() if p.requires_grad}
    expected = {n: p.detach().clone() for n, p in trained.items()}
    for n in range(3):
        target = torch.randn(2, *cfg.train.latent_shape, generator=g)
        backend.train_step("student", x, torch.full((2,), 0.95), text,
                           lambda v, idx, target=target: ((v - target[idx]) ** 2).mean())
        decay = min(0.9, (1 + n) / (10 + n))  # the documented warm-up
        for name, p in trained.items():
            expected[name] = decay * expected[name] + (1 - decay) * p.detach()
    out = {"averaged_only_adapters": sorted(student.ema) == sorted(trained) and all(".lora_" in n for n in trained),
           "ema_matches": all(torch.allclose(student.ema[n], expected[n], atol=1e-7) for n in trained),
           "ema_differs_from_last": any(not torch.equal(student.ema[n], trained[n].detach()) for n in trained)}
    last = {n: p.detach().clone() for n, p in trained.items()}
    backend.save_expert(tmp / "expert")
    out["live_weights_restored"] = all(torch.equal(trained[n].detach(), last[n]) for n in trained)
    module = lora_modules(student.model)[0]
    name = next(n for n, m in student.model.named_modules() if m is module)
    saved = backend.load_expert(0, tmp / "expert").state_dict()[f"{name}.weight"]
    merged = module.base.weight + module.scale * (expected[f"{name}.lora_B"] @ expected[f"{name}.lora_A"])
    out["expert_is_the_average"] = torch.allclose(saved, merged, atol=1e-6)
    backend.save(tmp / "ckpt", {"step": 3})
    kept = {n: v.clone() for n, v in student.ema.items()}
    for v in student.ema.values():
        v.zero_()
    student.ema_updates = 0
    extra = backend.load(tmp / "ckpt")
    out["checkpoint_round_trip"] = (extra == {"step": 3} and student.ema_updates == 3
                                    and all(torch.equal(student.ema[n], kept[n]) for n in kept))
    return out


def test_student_ema_is_what_the_phase_exports_and_checkpoints(wan_tiny, tmp_path):
    """``student.ema``: the average of the adapters after each update (with its warm-up), exported as the
    phase's expert while the live weights keep training, and saved and restored with the checkpoint."""
    (out,) = run_ranks(_ema, 1, wan_tiny.overrides, tmp_path)
    assert all(out.values()), out


def _rollouts(rank, world_size, overrides):
    from megatron_adapters.backend import MegatronBackend
    from pdmd.core.config import load_config
    from pdmd.core.method import PhaseTrainer

    out = {}
    for reuse in (1, 2):
        cfg = load_config(ROOT / "configs" / "tiny_wan22.yaml",
                          [*overrides, "method.fake_ratio=4", f"method.fake_rollout_reuse={reuse}"])
        backend = MegatronBackend(cfg)
        backend.setup_phase(1, 0, {}, cfg.phase_plan().renoise_interval(1))
        trainer = PhaseTrainer(backend, cfg.phase_plan(), 1, cfg.method, cfg.train.latent_shape, cfg.seed)
        rollout, calls = trainer.rollout, []
        trainer.rollout = lambda *a, calls=calls, rollout=rollout, **k: calls.append(1) or rollout(*a, **k)
        text = torch.randn(2, 32, 24, generator=torch.Generator().manual_seed(0))
        losses = [trainer.fake_step(0, i, text)["fake_loss"] for i in range(4)]
        out[reuse] = (len(calls), losses)
    return out


def test_fake_updates_can_share_a_rollout(wan_tiny):
    """method.fake_rollout_reuse=2: four fake updates draw two rollouts (each update re-noises afresh); the
    first update of each pair is the same computation as without sharing."""
    (out,) = run_ranks(_rollouts, 1, wan_tiny.overrides)
    assert out[1][0] == 4 and out[2][0] == 2
    assert out[2][1][0] == out[1][1][0] and out[2][1][1] != out[1][1][1]
