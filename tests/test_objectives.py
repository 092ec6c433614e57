"""pdmd.core.objectives against closed forms, autograd and Monte-Carlo estimates written here independently."""

import math

import pytest
import torch
import torch.nn.functional as F

from pdmd.core.objectives import (
    cfg_velocity,
    dmd_surrogate,
    dmd_velocity_grad,
    dmd_velocity_loss,
    dmd_weight,
    dmd_x0_grad,
    dmd_x0_loss,
    naive_velocity_target,
    subinterval_fake_loss,
    subinterval_loss_weight,
    subinterval_velocity_target,
    subinterval_x0_target,
)
from pdmd.core.schedule import PhasePlan, renoise, transition

torch.set_num_threads(1)
F64 = torch.float64


def _gen(seed):
    return torch.Generator().manual_seed(seed)


# --- closed-form Gaussian marginals (x0 ~ N(m, sd^2)), derived here, not taken from pdmd -------------
def gaussian_velocity(x, t, m, sd):
    """E[eps - x0 | x_t = x] = (x - E[x0 | x]) / t for x0 ~ N(m, sd^2)."""
    var_t = (1 - t) ** 2 * sd**2 + t**2
    e_x0 = m + (1 - t) * sd**2 / var_t * (x - (1 - t) * m)
    return (x - e_x0) / t


def gaussian_log_density(x, t, m, sd):
    var_t = (1 - t) ** 2 * sd**2 + t**2
    return -((x - (1 - t) * m) ** 2) / (2 * var_t) - 0.5 * torch.log(2 * math.pi * torch.as_tensor(var_t))


def _regress(y, x):
    """Least squares y ~ c0 + c1 x, with standard errors."""
    design = torch.stack([torch.ones_like(x), x], dim=1)
    coef = torch.linalg.lstsq(design, y[:, None]).solution.squeeze(1)
    resid = y - design @ coef
    cov = resid.var() * torch.linalg.inv(design.T @ design)
    return coef, cov.diagonal().sqrt()


# --- the subinterval target ------------------------------------------------------------------------
@pytest.mark.parametrize("t", [0.45, 0.7, 0.95])
def test_subinterval_target_is_unbiased_gaussian_data(t):
    """E[psi* | x_t] equals the true marginal velocity; the naive target's conditional mean does not.

    For Gaussian data everything is jointly Gaussian, so E[target | x_t] is exactly linear in x_t and a
    least-squares fit recovers it."""
    g = _gen(11)
    n, s, m, sd = 400_000, 0.4, 0.7, 0.6
    x0 = m + sd * torch.randn(n, generator=g, dtype=F64)
    x_s = (1 - s) * x0 + s * torch.randn(n, generator=g, dtype=F64)
    eps = torch.randn(n, generator=g, dtype=F64)
    x_t = renoise(x_s, eps, s, t)
    exact_intercept = float(gaussian_velocity(torch.tensor(0.0, dtype=F64), t, m, sd))
    exact_slope = float(gaussian_velocity(torch.tensor(1.0, dtype=F64), t, m, sd)) - exact_intercept
    exact = torch.tensor([exact_intercept, exact_slope], dtype=F64)

    coef, se = _regress(subinterval_velocity_target(x_s, eps, s, t), x_t)
    assert bool(((coef - exact).abs() < 5 * se).all()), (coef, exact, se)
    coef_naive, se_naive = _regress(naive_velocity_target(x_s, eps, s, t), x_t)
    assert float(((coef_naive - exact).abs() / se_naive).max()) > 20


def _atom_velocity_by_score(x, t, atoms):
    """v = -x/(1-t) - t/(1-t) * d/dx log p_t(x), with the score of the atom mixture by autograd."""
    x = x.clone().requires_grad_(True)
    a = torch.tensor(atoms, dtype=x.dtype)
    log_p = torch.logsumexp(-((x[:, None] - (1 - t) * a) ** 2) / (2 * t**2), dim=1)
    (score,) = torch.autograd.grad(log_p.sum(), x)
    return (-x / (1 - t) - t / (1 - t) * score).detach()


@pytest.mark.parametrize("t", [0.6, 0.85])
def test_subinterval_target_is_unbiased_atom_data(t):
    """E[(psi* - v(x_t)) 1{x_t in bin}] = 0 for every bin: the conditional mean matches, non-Gaussian data."""
    g = _gen(12)
    n, s, atoms = 400_000, 0.5, (-1.0, 0.0, 1.0, 2.0)
    x0 = torch.tensor(atoms, dtype=F64)[torch.randint(4, (n,), generator=g)]
    x_s = (1 - s) * x0 + s * torch.randn(n, generator=g, dtype=F64)
    eps = torch.randn(n, generator=g, dtype=F64)
    x_t = renoise(x_s, eps, s, t)
    v_true = _atom_velocity_by_score(x_t, t, atoms)
    edges = torch.quantile(x_t[:100_000], torch.linspace(0, 1, 9, dtype=F64)[1:-1])
    bins = torch.bucketize(x_t, edges)

    def max_z(target):
        diff = target - v_true
        z = [diff[bins == k].mean() / (diff[bins == k].std() / math.sqrt(int((bins == k).sum())))
             for k in range(8)]
        return float(torch.stack(z).abs().max())

    assert max_z(subinterval_velocity_target(x_s, eps, s, t)) < 4.5
    assert max_z(naive_velocity_target(x_s, eps, s, t)) > 10


def test_subinterval_target_limits_and_x0_form():
    g = _gen(13)
    x0 = torch.randn(4, 3, generator=g, dtype=F64)
    eps = torch.randn(4, 3, generator=g, dtype=F64)
    t = torch.tensor([0.2, 0.5, 0.8, 1.0], dtype=F64)
    # s = 0: plain flow matching, x_s = x0 and the target is eps - x0
    assert torch.allclose(subinterval_velocity_target(x0, eps, 0.0, t), eps - x0)
    assert torch.allclose(subinterval_velocity_target(x0, eps, 1e-10, t), eps - x0, atol=1e-8)
    assert torch.allclose(subinterval_x0_target(x0, eps, 0.0, t), x0)
    # x0 form is x_t - t * velocity form
    s = 0.15
    x_s = (1 - s) * x0 + s * torch.randn(4, 3, generator=g, dtype=F64)
    x_t = renoise(x_s, eps, s, t)
    v = subinterval_velocity_target(x_s, eps, s, t)
    assert torch.allclose(subinterval_x0_target(x_s, eps, s, t), x_t - t[:, None] * v)
    # the paper's coefficient form at one point, by hand: s = 0.5, t = 0.75, b = sqrt(0.5)
    val = subinterval_velocity_target(torch.tensor([1.0], dtype=F64), torch.tensor([1.0], dtype=F64), 0.5, 0.75)
    assert float(val) == pytest.approx(((0.25 * 0.75 + 0.25 * 0.25) / (0.25 * math.sqrt(0.5))) - 2.0)


# --- the fake loss ---------------------------------------------------------------------------------
def test_fake_loss_matches_equation_13_by_hand():
    g = _gen(14)
    x_s = torch.randn(5, 2, 3, generator=g, dtype=F64)
    eps = torch.randn(5, 2, 3, generator=g, dtype=F64)
    v_pred = torch.randn(5, 2, 3, generator=g, dtype=F64, requires_grad=True)
    s = torch.tensor([0.0, 0.3, 0.5, 0.5, 0.8], dtype=F64)
    t = torch.tensor([0.05, 0.31, 0.9, 0.6, 1.0], dtype=F64)
    target = subinterval_velocity_target(x_s, eps, s, t)
    a = (1 - t) / (1 - s)
    b = (t**2 - a**2 * s**2).sqrt()
    per = [min(10.0, 1 / float(b[i]) ** 2) * ((b[i] * v_pred[i] - b[i] * target[i]) ** 2).mean() for i in range(5)]
    expected = torch.stack(per).mean()
    loss = subinterval_fake_loss(v_pred, x_s, eps, s, t)
    assert torch.allclose(loss, expected)
    assert subinterval_loss_weight(s, t)[1] < 1 and subinterval_loss_weight(s, t)[2] == 1.0
    loss.backward()
    assert v_pred.grad is not None and float(v_pred.grad.abs().sum()) > 0


def test_fake_loss_without_weight_is_plain_mse():
    g = _gen(15)
    x_s, eps, v_pred = (torch.randn(3, 4, 4, generator=g) for _ in range(3))
    s, t = torch.tensor([0.1, 0.5, 0.7]), torch.tensor([0.2, 0.55, 0.99])
    loss = subinterval_fake_loss(v_pred, x_s, eps, s, t, max_weight=None)
    assert torch.allclose(loss, F.mse_loss(v_pred, subinterval_velocity_target(x_s, eps, s, t)))


# --- the DMD weight and generator gradients ---------------------------------------------------------
def test_dmd_weight_against_general_formula_and_limit():
    for s, t in [(0.0, 0.5), (0.3, 0.4), (5 / 6, 0.9), (0.5, 1.0)]:
        a, _ = transition(s, t)
        alpha, sigma = 1 - t, t
        assert dmd_weight(s, t) == pytest.approx(alpha * a / (alpha * sigma + sigma**2))
    assert dmd_weight(1e-12, 0.3) == pytest.approx(0.7**2 / 0.3)  # DMD's weight at s = 0
    w = dmd_weight(torch.tensor([0.0, 0.5]), torch.tensor([0.5, 0.75]))
    assert w.dtype == F64 and torch.allclose(w, torch.tensor([0.5, 0.25 ** 2 / (0.5 * 0.75)], dtype=F64))


def test_velocity_form_is_the_kl_gradient_through_the_kernel():
    """d/dx_s [log p_fake(x_t) - log p_real(x_t)] with x_t = a x_s + b eps equals w (v_real - v_fake)."""
    g = _gen(16)
    real, fake = (0.3, 0.8), (-0.2, 1.3)
    s = torch.tensor([0.0, 0.2, 0.6, 0.5], dtype=F64)
    t = torch.tensor([0.4, 0.7, 0.65, 0.95], dtype=F64)
    x_s = torch.randn(4, 6, generator=g, dtype=F64, requires_grad=True)
    eps = torch.randn(4, 6, generator=g, dtype=F64)
    x_t = renoise(x_s, eps, s, t)
    tc = t[:, None]
    kl = (gaussian_log_density(x_t, tc, *fake) - gaussian_log_density(x_t, tc, *real)).sum()
    (autograd,) = torch.autograd.grad(kl, x_s)
    x_t = x_t.detach()
    grad = dmd_velocity_grad(gaussian_velocity(x_t, tc, *real), gaussian_velocity(x_t, tc, *fake), s, t)
    assert torch.allclose(grad, autograd)


def test_x0_form_has_the_velocity_forms_direction_and_normaliser():
    g = _gen(17)
    s, t = torch.tensor([0.2, 0.5]), torch.tensor([0.6, 0.9])
    x_t, v_real, v_fake, x_gen = (torch.randn(2, 8, generator=g, dtype=F64) for _ in range(4))
    x0_real, x0_fake = x_t - t[:, None].double() * v_real, x_t - t[:, None].double() * v_fake
    g_x0 = dmd_x0_grad(x_gen, x0_real, x0_fake)
    g_v = dmd_velocity_grad(v_real, v_fake, s, t)
    ratio = g_x0 / g_v
    assert bool((ratio > 0).all()) and torch.allclose(ratio, ratio[:, :1].expand_as(ratio))
    norm = (x_gen - x0_real).abs().mean(dim=1, keepdim=True)
    assert torch.allclose(g_x0, (x0_fake - x0_real) / norm)
    # the normaliser is clamped at 1e-4 when the generator already sits on the real estimate
    assert torch.allclose(dmd_x0_grad(x0_real, x0_real, x0_fake), (x0_fake - x0_real) / 1e-4)


def test_surrogate_regression_form():
    """loss = 0.5 mean (x_gen - sg(x_gen - grad))^2: gradient grad / numel; same as 0.5 * MSE to target."""
    g = _gen(18)
    x_gen = torch.randn(3, 2, 5, generator=g, dtype=F64, requires_grad=True)
    grad = torch.randn(3, 2, 5, generator=g, dtype=F64)
    out = dmd_surrogate(x_gen, grad)
    assert torch.allclose(out.target, x_gen.detach() - grad) and not out.target.requires_grad
    assert torch.allclose(out.loss, 0.5 * F.mse_loss(x_gen, out.target))
    out.loss.backward()
    assert torch.allclose(x_gen.grad, grad / x_gen.numel())
    # the two convenience wrappers route through it
    v_real, v_fake = torch.randn(2, 3, 2, 5, generator=g, dtype=F64)
    s, t = torch.tensor([0.0, 0.3, 0.5], dtype=F64), torch.tensor([0.5, 0.9, 0.75], dtype=F64)
    vel = dmd_velocity_loss(x_gen.detach(), v_real, v_fake, s, t)
    assert torch.allclose(vel.grad, dmd_weight(s, t)[:, None, None] * (v_real - v_fake))
    x0 = dmd_x0_loss(x_gen.detach(), v_real, v_fake)
    assert torch.allclose(x0.target, x_gen.detach() - dmd_x0_grad(x_gen, v_real, v_fake))


def test_cfg():
    g = _gen(19)
    cond, uncond = torch.randn(2, 3, 4, generator=g)
    assert torch.equal(cfg_velocity(cond, uncond, 1.0), cond)
    assert torch.allclose(cfg_velocity(cond, uncond, 0.0), uncond, atol=1e-6)
    assert torch.allclose(cfg_velocity(cond, uncond, 4.0), 4 * cond - 3 * uncond, atol=1e-6)
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="CFG scale must be a finite number >= 0"):
            cfg_velocity(cond, uncond, bad)
    with pytest.raises(ValueError, match=r"v_uncond has shape \(3, 5\)"):
        cfg_velocity(cond, torch.zeros(3, 5), 2.0)


# --- shapes, dtypes, errors -------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_shapes_and_dtypes(dtype):
    g = _gen(20)
    x_s, eps, v = (torch.randn(2, 3, 4, 5, generator=g).to(dtype) for _ in range(3))
    s, t = torch.tensor([0.1, 0.5]), torch.tensor([0.3, 0.9])
    for fn in (subinterval_velocity_target, subinterval_x0_target, naive_velocity_target):
        out = fn(x_s, eps, s, t)
        assert out.shape == x_s.shape and out.dtype == dtype
        assert fn(x_s, eps, 0.2, 0.6).shape == x_s.shape  # scalars
        assert fn(x_s, eps, torch.tensor(0.2), torch.tensor(0.6)).shape == x_s.shape  # 0-d
    loss = subinterval_fake_loss(v, x_s, eps, s, t)
    assert loss.dim() == 0 and loss.dtype == (F64 if dtype == F64 else torch.float32)
    out = dmd_velocity_loss(v, eps, x_s, s, t)
    assert out.target.dtype == (F64 if dtype == F64 else torch.float32) and out.target.shape == v.shape
    assert dmd_x0_loss(v, eps, x_s).grad.shape == v.shape
    with pytest.raises(ValueError, match=r"shape \[B\] matching x's batch size \(2,\); got shape \(3,\)"):
        subinterval_velocity_target(x_s, eps, 0.1, torch.tensor([0.3, 0.4, 0.5]))


def test_float32_time_one_ulp_above_s_stays_finite():
    """A float32 t just above s (what draw_renoise_t can return) must not collapse to b = 0."""
    plan = PhasePlan.from_config({"num_steps": 4, "shift": 5.0, "num_phases": 2})
    s = plan.phase_end(1)
    t = plan.sample_renoise_t(1, torch.zeros(2, dtype=torch.float32))
    x = torch.ones(2, 3)
    assert torch.isfinite(subinterval_velocity_target(x, x, s, t)).all()
    assert torch.isfinite(subinterval_fake_loss(x, x, x, s, t))


@pytest.mark.parametrize(
    "call",
    [
        lambda s, t, x: subinterval_velocity_target(x, x, s, t),
        lambda s, t, x: subinterval_x0_target(x, x, s, t),
        lambda s, t, x: naive_velocity_target(x, x, s, t),
        lambda s, t, x: subinterval_fake_loss(x, x, x, s, t),
        lambda s, t, x: dmd_weight(s, t),
        lambda s, t, x: dmd_velocity_grad(x, x, s, t),
        lambda s, t, x: dmd_velocity_loss(x, x, x, s, t),
    ],
)
def test_bad_times_are_rejected_by_every_function(call):
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=r"t must be strictly greater than s .*got t=0.3 <= s=0.3"):
        call(0.3, 0.3, x)
    with pytest.raises(ValueError, match=r"t=0.2 <= s=0.4 at index 1"):
        call(torch.tensor([0.1, 0.4], dtype=F64), torch.tensor([0.5, 0.2], dtype=F64), x)
    with pytest.raises(ValueError, match=r"s must lie in \[0, 1\); got s=-0.5"):
        call(-0.5, 0.3, x)
    with pytest.raises(ValueError, match=r"t must lie in \(0, 1\]; got t=1.2"):
        call(0.3, 1.2, x)


def test_bad_weights_and_normalisers():
    x = torch.zeros(2, 3)
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match=rf"max_weight must be a finite number > 0; got max_weight={bad}"):
            subinterval_fake_loss(x, x, x, 0.1, 0.5, max_weight=bad)
        with pytest.raises(ValueError, match=rf"norm_min must be a finite number > 0; got norm_min={bad}"):
            dmd_x0_grad(x, x, x, norm_min=bad)
