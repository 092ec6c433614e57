"""The perfect teacher of the toy benchmark: the closed-form mixture velocity (pdmd/bench/mixture.py) against a
Monte-Carlo estimate of E[eps - x0 | x_t], its prompt lookup and file (pdmd/bench/exact_teacher.py), and the
trainer backend serving it as the teacher role through the same call the networks answer."""

from __future__ import annotations

import pytest
import torch

from pdmd.bench.exact_teacher import ExactTeacher
from pdmd.bench.mixture import MixtureTask

torch.set_num_threads(1)
SHAPE = (1, 1, 2, 2)  # D = 4: importance sampling of the posterior is accurate in few dimensions


def _monte_carlo_velocity(task: MixtureTask, x: torch.Tensor, t: float, prompts: list[int], n: int,
                          gen: torch.Generator) -> tuple[torch.Tensor, float]:
    """E[eps - x0 | x_t = x] by self-normalised importance sampling: x0 from the prompts' mixtures (each
    prompt equally likely), weighted by the likelihood N(x; (1 - t) x0, t^2); also the effective sample size."""
    x0 = torch.cat([task.sample(torch.full((n,), p), gen, dtype=torch.float64)[0] for p in prompts]).flatten(1)
    logw = -0.5 * ((x - (1 - t) * x0) ** 2).sum(1) / t**2
    w = torch.softmax(logw, 0)
    eps = (x - (1 - t) * x0) / t
    return (w[:, None] * (eps - x0)).sum(0), float(1 / w.pow(2).sum())


@pytest.mark.parametrize("t", [0.2, 0.5, 0.8, 0.95])
def test_closed_form_velocity_matches_monte_carlo(t):
    """Conditional (one prompt) and marginal (prompt None: every prompt's modes) velocities at points near
    a mode, against 400k-draw importance sampling (agreement to a few 1e-3 where the ESS is large)."""
    task = MixtureTask.make(2, 3, SHAPE, seed=0)
    gen = torch.Generator().manual_seed(1)
    for prompts, idx in (([0], torch.tensor([0])), ([1], torch.tensor([1])), ([0, 1], None)):
        x = (1 - t) * task.means[prompts[0], 1] + 0.3 * torch.randn(task.dim, generator=gen, dtype=torch.float64)
        mc, ess = _monte_carlo_velocity(task, x, t, prompts, 400_000 // len(prompts), gen)
        exact = task.velocity(x[None], t, idx)[0]
        assert ess > 2000, (t, prompts, ess)
        assert torch.allclose(exact, mc, atol=0.02), (t, prompts, exact, mc)


def test_velocity_limits_and_shapes():
    """t = 1: E[eps | x] = x and x0 has the prior mean; t -> 0: v = -x (E[eps | x0] = 0). Shapes and dtype kept."""
    task = MixtureTask.make(2, 3, (2, 1, 2, 2), seed=3)
    x = torch.randn(5, 2, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    idx = torch.tensor([0, 1, 1, 0, 1])
    v1 = task.velocity(x, 1.0, idx)
    prior_mean = (task.weights[idx, :, None] * task.means[idx]).sum(1).reshape(x.shape).float()
    assert v1.shape == x.shape and v1.dtype == x.dtype
    assert torch.allclose(v1, x - prior_mean, atol=1e-5)
    assert torch.allclose(task.velocity(x, 1e-9, idx), -x, atol=1e-5)
    per_sample = task.velocity(x, torch.full((5,), 0.4), idx)
    assert torch.allclose(per_sample, task.velocity(x, 0.4, idx))
    with pytest.raises(ValueError, match="elements per sample"):
        task.velocity(torch.zeros(2, 3), 0.5, torch.tensor([0, 1]))


def _teacher(task: MixtureTask, length: int = 6, width: int = 8) -> ExactTeacher:
    gen = torch.Generator().manual_seed(5)
    return ExactTeacher(task, torch.randn(task.num_prompts, length, width, generator=gen),
                        torch.randn(length, width, generator=gen))


def test_exact_teacher_knows_prompts_by_embedding_and_round_trips(tmp_path):
    task = MixtureTask.make(3, 2, SHAPE, seed=2)
    teacher = _teacher(task)
    text = torch.stack([teacher.prompt_embeds[2], teacher.negative_embeds, teacher.prompt_embeds[0]])
    assert teacher.prompt_index(text.bfloat16()).tolist() == [2, -1, 0]  # bf16 rounding still matches
    x = torch.randn(3, *SHAPE, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0.3, 0.6, 0.9])
    v = teacher.velocity(x, t, text)
    assert torch.allclose(v[0], task.velocity(x[:1], t[:1], torch.tensor([2]))[0])
    assert torch.allclose(v[1], task.velocity(x[1:2], t[1:2], None)[0])  # the negative prompt: the marginal
    loaded = ExactTeacher.load(teacher.save(tmp_path / "exact.safetensors"))
    assert torch.equal(loaded.velocity(x, t, text), v)
    with pytest.raises(ValueError, match="none of the exact teacher's 3 prompts"):
        teacher.prompt_index(text + 1.0)
    with pytest.raises(ValueError, match="same encoder"):
        teacher.prompt_index(torch.zeros(1, 6, 9))
    with pytest.raises(FileNotFoundError, match="no exact-teacher file"):
        ExactTeacher.load(tmp_path / "missing.safetensors")


def test_backend_serves_the_exact_teacher_as_the_teacher_role(wan_tiny, tmp_path):
    """model.teacher.exact: the backend's teacher velocity (conditional and, for the negative prompt,
    unconditional) is the closed form, whatever the teacher networks say; the fakes still answer."""
    from tests.multirank import run_ranks

    teacher_dir = wan_tiny.teacher
    task = MixtureTask.make(2, 3, (4, 2, 8, 8), seed=4)
    exact = _teacher(task, length=32, width=24)
    path = exact.save(tmp_path / "exact.safetensors")
    got = run_ranks(_backend_velocities, 1, str(teacher_dir), str(path), timeout=300)[0]
    text = torch.stack([exact.prompt_embeds[1], exact.negative_embeds, exact.prompt_embeds[0]])
    x = torch.randn(3, 4, 2, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0.95, 0.5, 0.1])  # both teacher experts' ranges
    assert torch.allclose(got["teacher"], exact.velocity(x, t, text), atol=1e-6)
    assert not torch.allclose(got["fake"], got["teacher"], atol=1e-2)


def _backend_velocities(rank: int, world: int, teacher: str, exact: str) -> dict[str, torch.Tensor]:
    from pathlib import Path

    from pdmd.core.config import load_config
    from pdmd.train import build_backend

    root = Path(__file__).resolve().parents[1]
    cfg = load_config(root / "configs" / "tiny_wan22.yaml",
                      [f"model.teacher.path={teacher}", f"model.teacher.exact={exact}", "data.shards=unused"])
    backend = build_backend(cfg)
    backend.setup_phase(2, 1, {}, (0.0, 1.0))
    loaded = ExactTeacher.load(exact)
    text = torch.stack([loaded.prompt_embeds[1], loaded.negative_embeds, loaded.prompt_embeds[0]])
    x = torch.randn(3, 4, 2, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0.95, 0.5, 0.1])
    return {role: backend.velocity(role, x, t, text) for role in ("teacher", "fake")}
