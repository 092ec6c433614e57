"""pdmd.core.schedule: conventions, shift, the paper's timesteps, the transition kernel, and PhasePlan."""

from fractions import Fraction

import pytest
import torch

from pdmd.core.schedule import (
    PhasePlan,
    add_noise,
    few_step_timesteps,
    flow_velocity,
    from_diffusers_timestep,
    renoise,
    shift,
    to_diffusers_timestep,
    transition,
    unshift,
    x0_from_velocity,
)

torch.set_num_threads(1)

WAN = {"num_steps": 4, "shift": 5.0, "num_phases": 2}
QWEN = {"num_steps": 4, "shift": 3.0, "num_phases": 2}


def ks_statistic(a: torch.Tensor, b: torch.Tensor) -> float:
    """Two-sample Kolmogorov-Smirnov statistic."""
    both = torch.cat([a, b]).sort().values
    cdf_a = torch.searchsorted(a.sort().values, both, right=True) / len(a)
    cdf_b = torch.searchsorted(b.sort().values, both, right=True) / len(b)
    return float((cdf_a - cdf_b).abs().max())


# --- conventions -----------------------------------------------------------------------------------
def test_flow_conventions_round_trip():
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 4, 5, generator=g, dtype=torch.float64)
    eps = torch.randn(3, 4, 5, generator=g, dtype=torch.float64)
    t = torch.tensor([0.1, 0.5, 1.0], dtype=torch.float64)
    x_t = add_noise(x0, eps, t)
    assert torch.allclose(x_t[1], 0.5 * x0[1] + 0.5 * eps[1])
    assert torch.equal(x_t[2], eps[2])
    v = flow_velocity(x0, eps)
    assert torch.allclose(v, eps - x0)
    assert torch.allclose(x0_from_velocity(x_t, v, t), x0)
    assert to_diffusers_timestep(0.9375) == 937.5
    assert from_diffusers_timestep(625.0) == 0.625


def test_shift_matches_diffusers_flow_match_scheduler():
    """Our shift against the formula diffusers' FlowMatchEulerDiscreteScheduler applies to its sigmas."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    for value in (1.0, 3.0, 5.0, 7.0):
        sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=value)
        unshifted = torch.linspace(1, 1000, 1000, dtype=torch.float64).flip(0) / 1000
        assert len(sched.sigmas) == 1000
        assert torch.allclose(shift(unshifted, value).float(), sched.sigmas.float(), atol=1e-6)


def test_shift_properties_and_inverse():
    u = torch.linspace(0, 1, 101, dtype=torch.float64)
    assert torch.allclose(shift(u, 1.0), u)
    t = shift(u, 5.0)
    assert t[0] == 0 and t[-1] == 1 and bool((t.diff() > 0).all())
    assert bool((t[1:-1] > u[1:-1]).all())  # shift > 1 moves mass towards noise
    assert torch.allclose(unshift(t, 5.0), u)
    assert shift(0.5, 5.0) == pytest.approx(2.5 / 3)


# --- the paper's timesteps -------------------------------------------------------------------------
def test_wan_and_qwen_timesteps_are_the_papers():
    wan = PhasePlan.from_config(WAN)
    assert wan.diffusers_timesteps == pytest.approx((1000.0, 937.5, 2500 / 3, 625.0))
    assert [round(x) for x in wan.diffusers_timesteps] == [1000, 938, 833, 625]
    qwen = PhasePlan.from_config(QWEN)
    assert qwen.diffusers_timesteps == pytest.approx((1000.0, 900.0, 750.0, 500.0))
    assert few_step_timesteps(4, 5.0) == wan.timesteps


def test_custom_uniform_points():
    assert few_step_timesteps(2, 3.0, uniform_points=[1.0, 0.5]) == pytest.approx((1.0, 0.75))
    with pytest.raises(ValueError, match="uniform_points has 1 entries"):
        few_step_timesteps(2, 3.0, uniform_points=[1.0])


# --- transition kernel -----------------------------------------------------------------------------
@pytest.mark.parametrize(("s", "t"), [(0.0, 0.3), (0.5, 0.75), (0.8333, 0.9), (0.2, 1.0), (0.6, 0.6000001)])
def test_transition_against_paper_formula_exact_arithmetic(s, t):
    """a = (1-t)/(1-s) and b^2 = t^2 - a^2 s^2, evaluated in exact rational arithmetic."""
    a, b = transition(s, t)
    fs, ft = Fraction(s), Fraction(t)
    fa = (1 - ft) / (1 - fs)
    fb2 = ft**2 - fa**2 * fs**2
    assert a == pytest.approx(float(fa), rel=1e-14)
    assert b == pytest.approx(float(fb2) ** 0.5, rel=1e-9)


def test_transition_tensor_broadcast_and_floats():
    a, b = transition(0.5, 0.75)
    assert isinstance(a, float) and isinstance(b, float)
    s = torch.tensor([0.0, 0.5, 0.9])
    a, b = transition(s, torch.tensor([0.3, 0.75, 0.95]))
    assert a.dtype == torch.float64 and a.shape == (3,)
    assert a[0] == pytest.approx(0.7) and b[0] == pytest.approx(0.3)  # s = 0: the usual marginal
    a, b = transition(0.2, torch.tensor([0.3, 0.5]))
    assert b.shape == (2,)


def test_renoise_reproduces_the_marginal_monte_carlo():
    """x_s from the exact marginal, carried to t by the kernel, has the exact marginal at t."""
    g = torch.Generator().manual_seed(1)
    n, s, t = 200_000, 0.4, 0.7
    atoms = torch.tensor([-1.0, 0.0, 1.0, 2.0], dtype=torch.float64)
    x0 = atoms[torch.randint(4, (n,), generator=g)]
    x_s = add_noise(x0, torch.randn(n, generator=g, dtype=torch.float64), s)
    x_t = renoise(x_s, torch.randn(n, generator=g, dtype=torch.float64), s, t)
    direct = add_noise(atoms[torch.randint(4, (n,), generator=g)],
                       torch.randn(n, generator=g, dtype=torch.float64), t)
    assert ks_statistic(x_t, direct) < 0.01  # ~2.3x the 1% critical value at this n would be 0.012
    # and the joint: Cov(x_t, x_s) = a Var(x_s)
    a, _ = transition(s, t)
    cov = ((x_t - x_t.mean()) * (x_s - x_s.mean())).mean()
    assert float(cov) == pytest.approx(a * float(x_s.var()), rel=0.02)


@pytest.mark.parametrize(
    ("s", "t", "message"),
    [
        (0.5, 0.5, r"t must be strictly greater than s .*; got t=0.5 <= s=0.5$"),
        (0.6, 0.4, r"got t=0.4 <= s=0.6"),
        (-0.1, 0.4, r"s must lie in \[0, 1\); got s=-0.1"),
        (1.0, 1.0, r"s must lie in \[0, 1\); got s=1.0"),
        (0.2, 1.5, r"t must lie in \(0, 1\]; got t=1.5"),
        (0.2, float("nan"), r"t must lie in \(0, 1\]; got t=nan"),
    ],
)
def test_transition_rejects_bad_times(s, t, message):
    with pytest.raises(ValueError, match=message):
        transition(s, t)


def test_transition_names_the_bad_element():
    with pytest.raises(ValueError, match=r"t=0.2 <= s=0.5 at index 1"):
        transition(torch.tensor([0.1, 0.5]), torch.tensor([0.3, 0.2]))
    with pytest.raises(ValueError, match=r"must be a scalar or have shape \[B\]"):
        renoise(torch.zeros(3, 2), torch.zeros(3, 2), 0.1, torch.tensor([0.5, 0.6]))


# --- PhasePlan -------------------------------------------------------------------------------------
def test_wan_plan_structure():
    plan = PhasePlan.from_config(WAN)
    assert plan.num_steps == 4 and plan.num_phases == 2 and list(plan.phases) == [1, 2]
    assert plan.boundaries == pytest.approx((1.0, 5 / 6, 0.0))
    assert plan.steps_per_phase == (2, 2)
    assert list(plan.steps_in_phase(1)) == [0, 1] and list(plan.steps_in_phase(2)) == [2, 3]
    # the step that starts on the boundary (t = 833) belongs to phase 2
    assert plan.phase_of_step(2) == 2 and plan.timesteps[2] == plan.boundaries[1]
    assert plan.phase_start(1) == 1.0 and plan.phase_end(1) == pytest.approx(5 / 6)
    assert plan.phase_start(2) == pytest.approx(5 / 6) and plan.phase_end(2) == 0.0
    # reverse nested: (t_k, 1) -- the paper's phase-1 (0.833, 1) and phase-2 (0, 1)
    assert plan.renoise_interval(1) == pytest.approx((5 / 6, 1.0))
    assert plan.renoise_interval(2) == pytest.approx((0.0, 1.0))
    assert plan.renoise_shift == 5.0


def test_qwen_plan_phase_one_interval():
    plan = PhasePlan.from_config(QWEN)
    assert plan.renoise_interval(1) == pytest.approx((0.75, 1.0))
    assert plan.phase_end(1) == 0.75


def test_disjoint_clamp_and_min_gap():
    disjoint = PhasePlan.from_config({**WAN, "renoise": "disjoint"})
    assert disjoint.renoise_interval(1) == pytest.approx((5 / 6, 1.0))
    assert disjoint.renoise_interval(2) == pytest.approx((0.0, 5 / 6))
    clamped = PhasePlan.from_config({**WAN, "renoise_clamp": [[0.875, 1.0], None]})
    assert clamped.renoise_interval(1) == (0.875, 1.0)
    assert clamped.renoise_interval(2) == (0.0, 1.0)
    gapped = PhasePlan.from_config({**QWEN, "min_gap": 0.02})
    assert gapped.renoise_interval(1) == pytest.approx((0.77, 1.0))
    assert gapped.renoise_interval(2) == pytest.approx((0.02, 1.0))


def test_config_forms_agree_and_round_trip():
    plan = PhasePlan.from_config(WAN)
    assert PhasePlan.from_config({"num_steps": 4, "shift": 5.0, "steps_per_phase": [2, 2]}) == plan
    assert PhasePlan.from_config({"num_steps": 4, "shift": 5.0, "boundaries": [1, 0.8333333333, 0]}) == plan
    assert PhasePlan.from_steps(4, 5.0, [2, 2], renoise_shift=5.0) == plan
    assert PhasePlan.from_config(plan.to_config()) == plan
    uneven = PhasePlan.from_config({"num_steps": 4, "shift": 5.0, "steps_per_phase": [1, 3],
                                    "renoise_shift": 3.0})
    assert uneven.boundaries == pytest.approx((1.0, 0.9375, 0.0)) and uneven.renoise_shift == 3.0
    single = PhasePlan.from_config({"num_steps": 4, "shift": 5.0})  # one phase: plain DMD, s = 0
    assert single.num_phases == 1 and single.renoise_interval(1) == (0.0, 1.0)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"num_steps": 0, "shift": 5.0}, r"num_steps must be an integer >= 1; got num_steps=0"),
        ({"num_steps": 4, "shift": 5.0, "steps_per_phase": [2, 0, 2]}, r"steps_per_phase\[1\] \(phase 2\) must be an integer >= 1; got .*=0"),
        ({"num_steps": 4, "shift": 5.0, "steps_per_phase": [2, 1]}, r"sums to 3 but there are 4 steps"),
        ({"num_steps": 4, "shift": 5.0, "num_phases": 3}, r"num_phases=3 does not divide num_steps=4"),
        ({"num_steps": 4, "shift": 5.0, "boundaries": [1, 0.625, 0.8333333333, 0]},
         r"boundaries must be strictly decreasing; got boundaries\[1\]=0.625 then boundaries\[2\]=0.83"),
        ({"num_steps": 4, "shift": 5.0, "boundaries": [1, 0.8, 0]}, r"boundaries\[1\]=0.8 is not one of"),
        ({"num_steps": 4, "shift": 5.0, "boundaries": [1, 0.625]}, r"must start at 1 and end at 0"),
        ({"timesteps": [1.0, 0.5, 0.7]}, r"timesteps must be strictly decreasing; got timesteps\[1\]=0.5"),
        ({"timesteps": [0.9, 0.5]}, r"timesteps must start at 1 \(pure noise\); got timesteps=\[0.9, 0.5\]"),
        ({"num_steps": 4, "shift": -1.0}, r"shift must be a finite number > 0 .*; got shift=-1.0"),
        ({"num_steps": 4, "shift": 5.0, "renoise": "nested"}, r"renoise must be one of .*got renoise='nested'"),
        ({"num_steps": 4, "shift": 5.0, "num_phases": 2, "renoise_clamp": [[0.875, 1.0]]},
         r"renoise_clamp needs one entry per phase \(2\)"),
        ({"num_steps": 4, "shift": 5.0, "num_phases": 2, "renoise_clamp": [[0.5, 0.8], None]},
         r"phase 1: the re-noise interval is empty"),
        ({"num_steps": 4, "shift": 5.0, "min_gap": 1.5}, r"min_gap must be a number in \[0, 1\); got min_gap=1.5"),
        ({"num_steps": 4, "shfit": 5.0}, r"unknown phase-plan key\(s\) \['shfit'\]"),
        ({"num_steps": 4, "shift": 5.0, "num_phases": 2, "steps_per_phase": [2, 2]}, r"give only one of"),
    ],
)
def test_bad_plans_name_the_value(config, message):
    with pytest.raises(ValueError, match=message):
        PhasePlan.from_config(config)


def test_bad_phase_and_step_indices():
    plan = PhasePlan.from_config(WAN)
    for bad in (0, 3, 1.0):
        with pytest.raises(ValueError, match=rf"phase must be an integer in 1..2 \(1-based\); got phase={bad!r}"):
            plan.renoise_interval(bad)
    with pytest.raises(ValueError, match=r"step must be an integer in 0..3; got step=4"):
        plan.phase_of_step(4)


# --- drawing re-noise times ------------------------------------------------------------------------
def _truncated_shifted_reference(lo, hi, value, n, seed):
    """Rejection sampling: the paper's full-range draw (u uniform, then shift) kept if in (lo, hi)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    while sum(len(o) for o in out) < n:
        t = shift(torch.rand(200_000, generator=g, dtype=torch.float64), value)
        out.append(t[(t > lo) & (t <= hi)])
    return torch.cat(out)[:n]


@pytest.mark.parametrize(
    ("config", "phase"),
    [(WAN, 1), (WAN, 2), ({**WAN, "renoise": "disjoint"}, 2), ({**WAN, "renoise_clamp": [[0.875, 1], None]}, 1),
     (QWEN, 1)],
)
def test_drawn_t_is_the_truncated_shifted_distribution(config, phase):
    plan = PhasePlan.from_config(config)
    lo, hi = plan.renoise_interval(phase)
    n = 20_000
    drawn = plan.draw_renoise_t(phase, n, torch.Generator().manual_seed(2), dtype=torch.float64)
    assert bool((drawn > lo).all()) and bool((drawn <= hi).all())
    reference = _truncated_shifted_reference(lo, hi, plan.renoise_shift, n, seed=3)
    assert ks_statistic(drawn, reference) < 0.02  # 0.1% critical value at n = m = 20000 is ~0.0195


def test_ks_check_has_power_against_the_affine_alternative():
    """Shifting first and squeezing into (lo, hi) is a different law; the KS check above must see it."""
    plan = PhasePlan.from_config(WAN)
    lo, hi = plan.renoise_interval(1)
    g = torch.Generator().manual_seed(4)
    affine = lo + (hi - lo) * shift(torch.rand(20_000, generator=g, dtype=torch.float64), 5.0)
    reference = _truncated_shifted_reference(lo, hi, 5.0, 20_000, seed=3)
    assert ks_statistic(affine, reference) > 0.1


def test_draw_is_deterministic_and_strictly_above_s():
    plan = PhasePlan.from_config(WAN)
    a = plan.draw_renoise_t(1, 8, torch.Generator().manual_seed(7))
    b = plan.draw_renoise_t(1, 8, torch.Generator().manual_seed(7))
    c = plan.draw_renoise_t(1, 8, torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.dtype == torch.float32 and a.shape == (8,)
    s = plan.phase_end(1)
    for dtype in (torch.float32, torch.float64):
        edge = plan.sample_renoise_t(1, torch.tensor([0.0, 1e-12, 1.0], dtype=dtype))
        assert edge.dtype == dtype
        assert bool((edge.double() > s).all()) and bool((edge > torch.tensor(s, dtype=dtype)).all())
        assert edge[-1] == 1.0
        transition(s, edge)  # valid: t > s


def test_draw_rejects_bad_arguments():
    plan = PhasePlan.from_config(WAN)
    with pytest.raises(ValueError, match=r"batch_size must be an integer >= 1; got batch_size=0"):
        plan.draw_renoise_t(1, 0)
    with pytest.raises(ValueError, match=r"u must lie in \[0, 1\]; got u=1.5"):
        plan.sample_renoise_t(1, torch.tensor([0.5, 1.5], dtype=torch.float64))
    with pytest.raises(ValueError, match=r"dtype must be torch.float32 or torch.float64"):
        plan.draw_renoise_t(1, 2, dtype=torch.bfloat16)
