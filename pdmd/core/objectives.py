"""The Phased DMD objectives: the fake score's target within a subinterval, its loss, the DMD generator
gradient (velocity form and x0-space normalised surrogate), and CFG for the real score.

Notation as in pdmd.core.schedule (flow matching, x_t = (1-t) x0 + t eps, v = eps - x0). Phase k's generator
output x_s lives at s = t_k; the scores are evaluated at x_t = a x_s + b eps with s < t. Paper equation
numbers refer to arXiv 2510.27684 v3; docs/method.md has the derivations.

s and t are Python numbers, 0-d tensors, or [B] tensors broadcast over the trailing dims of x.
Coefficients are computed in float64; arithmetic on x runs in x's dtype promoted to at least float32.
"""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import torch
from torch import Tensor

from pdmd.core.schedule import Time, _transition, check_s_t, coefficient, transition, work_dtype

DEFAULT_MAX_WEIGHT = 10.0
DEFAULT_NORM_MIN = 1e-4


# ---------------------------------------------------------------------------------------------------
# the fake score within a subinterval
# ---------------------------------------------------------------------------------------------------
def subinterval_velocity_target(x_s: Tensor, eps: Tensor, s: Time, t: Time) -> Tensor:
    """The unbiased velocity target at x_t = a x_s + b eps given only x_s (paper Eq. 11, flow case).

    psi* = [((1-s)^2 t + (1-t) s^2) / ((1-s)^2 b)] eps - x_s / (1-s); its conditional mean given x_t is
    the marginal velocity at x_t. At s = 0 it is eps - x0, ordinary flow matching. Returns x_s's dtype.
    """
    check_s_t(s, t)
    s64, t64 = coefficient(s, x_s, "s"), coefficient(t, x_s, "t")
    _, b = _transition(s64, t64)
    c_eps = ((1 - s64) ** 2 * t64 + (1 - t64) * s64**2) / ((1 - s64) ** 2 * b)
    c_x = 1 / (1 - s64)
    dtype = work_dtype(x_s, eps)
    return (c_eps.to(dtype) * eps - c_x.to(dtype) * x_s).to(x_s.dtype)


def subinterval_x0_target(x_s: Tensor, eps: Tensor, s: Time, t: Time) -> Tensor:
    """The same target in x0-prediction form: x_s/(1-s) - [(1-t) s^2 / ((1-s)^2 b)] eps.

    Equals x_t - t * subinterval_velocity_target; at s = 0 it is x0.
    """
    check_s_t(s, t)
    s64, t64 = coefficient(s, x_s, "s"), coefficient(t, x_s, "t")
    _, b = _transition(s64, t64)
    c_eps = (1 - t64) * s64**2 / ((1 - s64) ** 2 * b)
    dtype = work_dtype(x_s, eps)
    return ((1 / (1 - s64)).to(dtype) * x_s - c_eps.to(dtype) * eps).to(x_s.dtype)


def naive_velocity_target(x_s: Tensor, eps: Tensor, s: Time, t: Time) -> Tensor:
    """eps - x_s: treats x_s as if it were clean data. Biased for s > 0; kept only as the ablation."""
    check_s_t(s, t)
    return eps - x_s


def subinterval_loss_weight(s: Time, t: Time, max_weight: float | None = DEFAULT_MAX_WEIGHT) -> Time:
    """Per-sample weight of ||v_pred - target||^2 in paper Eq. 13: min(1, max_weight * b^2).

    This is min(max_weight, 1/b^2) * b^2: the loss on b*v is weighted by 1/b^2 clamped at max_weight,
    which tames the target's 1/b blow-up as t -> s. ``max_weight=None`` gives weight 1 (plain MSE).
    """
    if max_weight is not None:
        _check_positive("max_weight", max_weight)
    _, b = transition(s, t)
    if isinstance(b, Tensor):
        return torch.ones_like(b) if max_weight is None else torch.clamp(max_weight * b**2, max=1.0)
    return 1.0 if max_weight is None else min(1.0, max_weight * b * b)


def subinterval_fake_loss(v_pred: Tensor, x_s: Tensor, eps: Tensor, s: Time, t: Time,
                          max_weight: float | None = DEFAULT_MAX_WEIGHT) -> Tensor:
    """The fake score's loss within a subinterval (paper Eq. 13), a scalar.

    Per sample: min(max_weight, 1/b^2) * ||b v_pred - b psi*||^2 with ||.||^2 the mean over the sample's
    elements (so the scale does not depend on the latent size); then the mean over the batch.
    ``max_weight=None`` is LightX2V's plain MSE (identical to F.mse_loss(v_pred, psi*)).
    """
    target = subinterval_velocity_target(x_s, eps, s, t)
    return weighted_velocity_loss(v_pred, target, subinterval_loss_weight(s, t, max_weight))


def weighted_velocity_loss(v_pred: Tensor, target: Tensor, weight: Time) -> Tensor:
    """mean_i weight_i * mean_j (v_pred - target)^2_ij: per-sample MSE, weighted, averaged over batch."""
    if v_pred.shape != target.shape:
        raise ValueError(f"v_pred has shape {tuple(v_pred.shape)} but the target has {tuple(target.shape)}")
    dtype = work_dtype(v_pred, target)
    err = (v_pred.to(dtype) - target.to(dtype).detach()) ** 2
    per_sample = err.flatten(1).mean(dim=1) if err.dim() > 1 else err
    w = coefficient(weight, per_sample, "weight").to(dtype)
    return (w * per_sample).mean()


# ---------------------------------------------------------------------------------------------------
# the DMD generator gradient
# ---------------------------------------------------------------------------------------------------
class DMDLoss(NamedTuple):
    """A DMD generator objective in regression form.

    ``loss`` = 0.5 * mean((x_gen - target)^2) is differentiable in x_gen and its gradient with respect to
    x_gen is ``grad`` / x_gen.numel(). ``target`` = sg(x_gen - grad) lets a pipeline-parallel student be
    trained with an ordinary 0.5 * MSE(x_gen, target) step. target and grad are detached.
    """

    loss: Tensor
    target: Tensor
    grad: Tensor


def dmd_weight(s: Time, t: Time) -> Time:
    """w_{t|s} = alpha_t a / (alpha_t sigma_t + sigma_t^2) = (1-t)^2 / ((1-s) t) in the flow case.

    The velocity-form DMD weight including the Jacobian dx_t/dx_s = a of the re-noise kernel; at s = 0 it
    is DMD's (1-t)^2 / t. Floats give a float, tensors a float64 tensor.
    """
    check_s_t(s, t)
    if not isinstance(s, Tensor) and not isinstance(t, Tensor):
        s, t = float(s), float(t)
        return (1 - t) ** 2 / ((1 - s) * t)
    s64, t64 = (torch.as_tensor(v, dtype=torch.float64) for v in (s, t))
    s64 = s64.to(t64.device)
    return (1 - t64) ** 2 / ((1 - s64) * t64)


def dmd_velocity_grad(v_real: Tensor, v_fake: Tensor, s: Time, t: Time) -> Tensor:
    """DMD gradient with respect to x_s in velocity form: w_{t|s} (v_real - v_fake).

    From grad_x_t KL = score_fake - score_real = ((1-t)/t) (v_real - v_fake), times dx_t/dx_s = a.
    """
    if v_real.shape != v_fake.shape:
        raise ValueError(f"v_real has shape {tuple(v_real.shape)} but v_fake has {tuple(v_fake.shape)}")
    check_s_t(s, t)
    s64, t64 = coefficient(s, v_real, "s"), coefficient(t, v_real, "t")
    w = (1 - t64) ** 2 / ((1 - s64) * t64)
    dtype = work_dtype(v_real, v_fake)
    return (w.to(dtype) * (v_real.to(dtype) - v_fake.to(dtype))).detach()


def dmd_x0_grad(x_gen: Tensor, x0_real: Tensor, x0_fake: Tensor,
                norm_min: float = DEFAULT_NORM_MIN) -> Tensor:
    """DMD gradient in x0 space, normalised per sample (DMD/DMD2/LightX2V):
    (x0_fake - x0_real) / max(norm_min, mean|x_gen - x0_real|). Same sign as the velocity form.
    """
    _check_same_shape(x_gen, x0_real=x0_real, x0_fake=x0_fake)
    _check_positive("norm_min", norm_min)
    dtype = work_dtype(x_gen, x0_real, x0_fake)
    x_gen, x0_real, x0_fake = (x.detach().to(dtype) for x in (x_gen, x0_real, x0_fake))
    dims = tuple(range(1, x_gen.dim()))
    norm = (x_gen - x0_real).abs().mean(dim=dims, keepdim=True) if dims else (x_gen - x0_real).abs()
    return (x0_fake - x0_real) / norm.clamp(min=norm_min)


def dmd_surrogate(x_gen: Tensor, grad: Tensor) -> DMDLoss:
    """Turn a gradient into the regression form: target = sg(x_gen - grad), loss = 0.5 mean (x_gen - target)^2."""
    _check_same_shape(x_gen, grad=grad)
    dtype = work_dtype(x_gen, grad)
    grad = grad.detach().to(dtype)
    target = x_gen.detach().to(dtype) - grad
    loss = 0.5 * ((x_gen.to(dtype) - target) ** 2).mean()
    return DMDLoss(loss, target, grad)


def dmd_velocity_loss(x_gen: Tensor, v_real: Tensor, v_fake: Tensor, s: Time, t: Time) -> DMDLoss:
    """The generator objective with the velocity-form gradient w_{t|s} (v_real - v_fake)."""
    return dmd_surrogate(x_gen, dmd_velocity_grad(v_real, v_fake, s, t))


def dmd_x0_loss(x_gen: Tensor, x0_real: Tensor, x0_fake: Tensor,
                norm_min: float = DEFAULT_NORM_MIN) -> DMDLoss:
    """The generator objective with the x0-space normalised gradient (the common DMD2 surrogate)."""
    return dmd_surrogate(x_gen, dmd_x0_grad(x_gen, x0_real, x0_fake, norm_min))


# ---------------------------------------------------------------------------------------------------
# classifier-free guidance for the real score
# ---------------------------------------------------------------------------------------------------
def cfg_velocity(v_cond: Tensor, v_uncond: Tensor, scale: float) -> Tensor:
    """v_uncond + scale (v_cond - v_uncond), written as v_cond + (scale - 1)(v_cond - v_uncond) so that
    scale 1 returns exactly the conditional velocity (no guidance; a trainer may skip the uncond pass).

    The paper does not state its distillation CFG scale; LightX2V's Wan2.2-A14B recipe uses 4.0.
    """
    _check_same_shape(v_cond, v_uncond=v_uncond)
    if not (isinstance(scale, numbers.Real) and math.isfinite(scale) and scale >= 0):
        raise ValueError(f"CFG scale must be a finite number >= 0 (1 = no guidance); got scale={scale!r}")
    return v_cond + (scale - 1) * (v_cond - v_uncond)


def _check_positive(name: str, value: float) -> None:
    if not (isinstance(value, numbers.Real) and math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0; got {name}={value!r}")


def _check_same_shape(x: Tensor, **others: Tensor) -> None:
    for name, other in others.items():
        if other.shape != x.shape:
            raise ValueError(f"{name} has shape {tuple(other.shape)} but x has shape {tuple(x.shape)}")
