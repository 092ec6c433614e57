"""The distillation levers added with the exact-teacher benchmark (student/fake beta1, method.sgts_min_step,
method.fake_warmup, model.teacher.exact): validated with messages that name the key, and left out of a
run's identity while at their defaults so that runs started before they existed still resume."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pdmd.core.config import LATER_KEYS, ConfigError, OptimConfig, load_config, lr_at
from pdmd.core.method import PhaseTrainer
from pdmd.core.schedule import PhasePlan

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> str:
    from pdmd.bench.tiny_models import write_tiny_wan22_teacher

    return str(write_tiny_wan22_teacher(tmp_path_factory.mktemp("levers") / "teacher"))


def _cfg(teacher: str, *overrides: str):
    return load_config(ROOT / "configs" / "tiny_wan22.yaml", [f"model.teacher.path={teacher}", *overrides])


def test_later_keys_at_defaults_leave_the_identity_unchanged(teacher):
    base = _cfg(teacher)
    ident = base.identity()
    assert "beta1" not in ident["student"] and "exact" not in ident["model"]["teacher"]
    assert "sgts_min_step" not in ident["method"] and "fake_warmup" not in ident["method"]
    for key, value in (("student.beta1", "0.9"), ("fake.beta1", "0.5"), ("method.sgts_min_step", "2"),
                       ("method.fake_warmup", "10"), ("student.lr_decay", "linear"), ("fake.lr_decay", "cosine"),
                       ("student.ema", "0.99"), ("method.fake_rollout_reuse", "5")):
        changed = _cfg(teacher, f"{key}={value}")
        assert changed.hash() != base.hash(), key
    assert len(LATER_KEYS) == 10


@pytest.mark.parametrize("override, message", [
    ("method.sgts_min_step=0", "method.sgts_min_step=0 must be a step of the sampler, 1..4"),
    ("method.sgts_min_step=5", "method.sgts_min_step=5"),
    ("method.fake_warmup=-1", "method.fake_warmup=-1 must be an integer >= 0"),
    ("student.lr_decay=step", "student.lr_decay='step': choose one of"),
    ("student.ema=1.0", "student.ema=1.0 must be in"),
    ("fake.ema=0.9", "fake.ema: only the student keeps a moving average"),
    ("method.fake_rollout_reuse=0", "method.fake_rollout_reuse=0 must be an integer >= 1"),
    ("parallel.cp_comm=te", "parallel.cp_comm='te': choose all_gather or ulysses"),
    ("parallel.pp_layers=[1,2]", "one block count >= 1 per pipeline stage"),
    ("model.teacher.exact=/no/such/file.safetensors", "model.teacher.exact=/no/such/file.safetensors: no such file"),
])
def test_bad_lever_values_name_the_key(teacher, override, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        _cfg(teacher, override)


def test_lr_decay_schedules():
    """constant keeps lr; linear and cosine start at lr and reach 0 at the phase's end (step = steps)."""
    for kind, mid in (("constant", 1e-4), ("linear", 5e-5), ("cosine", 5e-5)):
        o = OptimConfig(lr=1e-4, lr_decay=kind)
        assert lr_at(o, 0, 100) == pytest.approx(1e-4)
        assert lr_at(o, 50, 100) == pytest.approx(mid)
        assert lr_at(o, 100, 100) == pytest.approx(1e-4 if kind == "constant" else 0.0, abs=1e-12)
    cos = OptimConfig(lr=1.0, lr_decay="cosine")
    assert lr_at(cos, 25, 100) == pytest.approx(0.5 * (1 + 2**-0.5))


class _Recorder:
    """A backend stub that records which step's velocity each rollout asks for last (the SGTS stop)."""

    dp_rank = 0
    device = torch.device("cpu")

    def __init__(self) -> None:
        self.times: list[float] = []

    def velocity(self, role, x, t, text, cond=None):
        self.times.append(float(t[0]))
        return torch.zeros_like(x)


def test_sgts_min_step_keeps_early_steps_out_of_the_draw(teacher):
    """One phase of 4 steps: SGTS stops anywhere in 1..4; with sgts_min_step=2 never at step 1 (pure noise)."""
    plan = PhasePlan.from_config({"num_steps": 4, "shift": 5.0, "num_phases": 1})
    stops = {}
    for min_step in (1, 2):
        method = _cfg(teacher, "plan.num_phases=1", "plan.renoise_clamp=null", f"method.sgts_min_step={min_step}").method
        backend = _Recorder()
        trainer = PhaseTrainer(backend, plan, 1, method, (4, 1, 2, 2), seed=0)
        stops[min_step] = set()
        for step in range(40):
            backend.times.clear()
            rollout = trainer.rollout(torch.zeros(1, 3, 8), trainer._gen(step, "generator"))
            stops[min_step].add(rollout.step)
    assert stops[1] == {0, 1, 2, 3} and stops[2] == {1, 2, 3}
