"""Flow-matching conventions, the shifted few-step schedule, and the Phased DMD phase plan.

Conventions (Wan2.x, Qwen-Image): x_t = (1 - t) x0 + t eps, velocity v = eps - x0, t in [0, 1], and the
timestep a diffusers model is fed is 1000 t. Between two noise levels s < t the forward process is Markov:
x_t = a x_s + b eps' with a = (1-t)/(1-s), b^2 = t^2 - a^2 s^2 (see docs/method.md).

Scalars or tensors: s and t may be Python numbers, 0-d tensors, or tensors of shape [B] that broadcast
over the trailing dimensions of x. Arguments a user can get wrong raise ValueError naming the value.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

NUM_TRAIN_TIMESTEPS = 1000
RENOISE_MODES = ("reverse_nested", "disjoint")
Time = float | Tensor

# Interior boundaries given in a config are matched to the step grid within this tolerance (then snapped).
_GRID_TOL = 1e-6


# --- validation and broadcasting helpers -----------------------------------------------------------
def _fmt(value: float, dtype: torch.dtype = torch.float64) -> str:
    """A number for an error message: repr for float64, 7 digits for lower precision (no 0.200000003)."""
    return repr(float(value)) if dtype == torch.float64 else f"{float(value):.7g}"


def _first_bad(value: Time, ok: Tensor) -> str:
    """Describe the first element of ``value`` where ``ok`` is False (for error messages)."""
    if not isinstance(value, Tensor):
        return _fmt(value)
    if value.dim() == 0:
        return _fmt(value, value.dtype)
    idx = int((~ok).flatten().nonzero()[0])
    return f"{_fmt(value.flatten()[idx], value.dtype)} (at index {idx})"


def check_time(name: str, value: Time, *, low: float = 0.0, high: float = 1.0,
               low_open: bool = False, high_open: bool = False) -> None:
    """Raise ValueError unless every element of ``value`` lies in the stated interval (NaN fails)."""
    v = torch.as_tensor(value, dtype=torch.float64) if not isinstance(value, Tensor) else value.detach()
    ok = (v > low) if low_open else (v >= low)
    ok = ok & ((v < high) if high_open else (v <= high))
    if not bool(ok.all()):
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise ValueError(f"{name} must lie in {interval}; got {name}={_first_bad(value, ok)}")


def check_s_t(s: Time, t: Time) -> None:
    """Validate a subinterval: 0 <= s < t <= 1 elementwise (b = 0 at t == s, so t must exceed s)."""
    check_time("s", s, high_open=True)
    check_time("t", t, low_open=True)
    s_dtype, t_dtype = (v.dtype if isinstance(v, Tensor) else torch.float64 for v in (s, t))
    sv, tv = (torch.as_tensor(v.detach() if isinstance(v, Tensor) else float(v), dtype=torch.float64)
              for v in (s, t))
    sv, tv = torch.broadcast_tensors(sv.to(tv.device), tv)
    ok = tv > sv
    if not bool(ok.all()):
        idx = int((~ok).flatten().nonzero()[0])
        where = f" at index {idx}" if ok.dim() else ""
        raise ValueError(
            "t must be strictly greater than s (re-noise goes from s up to t); "
            f"got t={_fmt(tv.flatten()[idx], t_dtype)} <= s={_fmt(sv.flatten()[idx], s_dtype)}{where}"
        )


def check_int(name: str, value: Any, minimum: int = 1) -> None:
    """Raise ValueError unless ``value`` is an int (not a bool) >= ``minimum``."""
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}; got {name}={value!r}")


def _check_decreasing(name: str, values: Sequence[float]) -> None:
    for i in range(1, len(values)):
        if not values[i] < values[i - 1]:
            raise ValueError(f"{name} must be strictly decreasing; got {name}[{i - 1}]={values[i - 1]!r} "
                             f"then {name}[{i}]={values[i]!r}")


def coefficient(value: Time, x: Tensor, name: str = "t") -> Tensor:
    """``value`` as a float64 tensor on x's device that broadcasts over ``x``: [] stays, [B] -> [B, 1, ...].

    Coefficients are computed in float64 (they are [B]-sized, so this is free) and cast to
    :func:`work_dtype` only when combined with x: a float32 t one ulp above s must not round to b = 0.
    """
    if isinstance(value, Tensor):
        v = value.detach().to(device=x.device, dtype=torch.float64)
    else:
        v = torch.tensor(float(value), device=x.device, dtype=torch.float64)
    if v.dim() == 0:
        return v
    if v.dim() != 1 or x.dim() == 0 or v.shape[0] != x.shape[0]:
        raise ValueError(
            f"{name} must be a scalar or have shape [B] matching x's batch size {tuple(x.shape[:1])}; "
            f"got shape {tuple(v.shape)}"
        )
    return v.view(-1, *([1] * (x.dim() - 1)))


def work_dtype(*xs: Tensor) -> torch.dtype:
    """The dtype arithmetic on these tensors runs in: their promotion, at least float32."""
    dtype = torch.float32
    for x in xs:
        dtype = torch.promote_types(dtype, x.dtype)
    return dtype


# --- flow-matching conventions ---------------------------------------------------------------------
def add_noise(x0: Tensor, eps: Tensor, t: Time) -> Tensor:
    """x_t = (1 - t) x0 + t eps, in x0's dtype."""
    check_time("t", t)
    tc = coefficient(t, x0).to(work_dtype(x0, eps))
    return ((1 - tc) * x0 + tc * eps).to(x0.dtype)


def flow_velocity(x0: Tensor, eps: Tensor) -> Tensor:
    """The flow-matching velocity target v = eps - x0 (what Wan and Qwen-Image predict)."""
    return eps - x0


def x0_from_velocity(x_t: Tensor, v: Tensor, t: Time) -> Tensor:
    """x0 = x_t - t v: the clean estimate implied by a velocity prediction at time t."""
    check_time("t", t)
    tc = coefficient(t, x_t).to(work_dtype(x_t, v))
    return (x_t - tc * v).to(torch.promote_types(x_t.dtype, v.dtype))


def to_diffusers_timestep(t: Time) -> Time:
    """The timestep a diffusers flow-matching transformer expects: 1000 t."""
    return t * NUM_TRAIN_TIMESTEPS


def from_diffusers_timestep(timestep: Time) -> Time:
    """Inverse of :func:`to_diffusers_timestep`."""
    return timestep / NUM_TRAIN_TIMESTEPS


def shift(u: Time, shift: float) -> Time:
    """The time shift sigma(u) = shift u / (1 + (shift - 1) u); maps [0, 1] onto itself, keeps 0 and 1.

    Used both for the few-step timesteps and, after a uniform draw, for re-noise times.
    """
    return _apply_shift(u, shift)


def _apply_shift(u: Time, value: float) -> Time:
    _check_shift(value)
    check_time("u", u)
    return value * u / (1 + (value - 1) * u)


def unshift(t: Time, shift: float) -> Time:
    """Inverse of :func:`shift`: u = t / (shift - (shift - 1) t)."""
    _check_shift(shift)
    check_time("t", t)
    return t / (shift - (shift - 1) * t)


def _check_shift(value: float) -> None:
    if not (isinstance(value, numbers.Real) and math.isfinite(value) and value > 0):
        raise ValueError(f"shift must be a finite number > 0 (1 means no shift); got shift={value!r}")


def few_step_timesteps(num_steps: int, shift: float = 1.0,
                       uniform_points: Sequence[float] | None = None) -> tuple[float, ...]:
    """Start times of the few-step sampler: uniform points 1, 1 - 1/N, ..., 1/N, then shifted.

    Wan (shift 5, 4 steps) gives 1, 0.9375, 0.8333, 0.625; Qwen-Image (shift 3) gives 1, 0.9, 0.75, 0.5.
    The sampler then steps each start time to the next and the last one to t = 0.
    """
    if uniform_points is None:
        check_int("num_steps", num_steps)
        uniform_points = [1 - i / num_steps for i in range(num_steps)]
    elif len(uniform_points) != num_steps:
        raise ValueError(f"uniform_points has {len(uniform_points)} entries but num_steps={num_steps!r}")
    times = tuple(float(_apply_shift(float(u), shift)) for u in uniform_points)
    _check_timesteps(times)
    return times


def _check_timesteps(times: Sequence[float]) -> None:
    if len(times) == 0 or times[0] != 1.0:
        raise ValueError(f"timesteps must start at 1 (pure noise); got timesteps={list(times)!r}")
    for i, t in enumerate(times):
        if not (0.0 < t <= 1.0):
            raise ValueError(f"timesteps must lie in (0, 1]; got timesteps[{i}]={t!r}")
    _check_decreasing("timesteps", times)


# --- the Markov transition between two noise levels ------------------------------------------------
def transition(s: Time, t: Time) -> tuple[Time, Time]:
    """(a, b) of the conditional kernel x_t = a x_s + b eps for 0 <= s < t <= 1.

    a = (1-t)/(1-s); b = sqrt(t^2 - a^2 s^2), computed as sqrt((t-s)(t+s-2ts))/(1-s) which is the same
    quantity without the cancellation near t = s. Floats in give floats out; tensors give float64 tensors.
    """
    check_s_t(s, t)
    if not isinstance(s, Tensor) and not isinstance(t, Tensor):
        s, t = float(s), float(t)
        return (1 - t) / (1 - s), math.sqrt((t - s) * (t + s - 2 * t * s)) / (1 - s)
    s64, t64 = (torch.as_tensor(v, dtype=torch.float64) for v in (s, t))
    return _transition(s64.to(t64.device), t64)


def _transition(s: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    """Unchecked tensor version of :func:`transition` (callers validate)."""
    return (1 - t) / (1 - s), torch.sqrt((t - s) * (t + s - 2 * t * s)) / (1 - s)


def renoise(x_s: Tensor, eps: Tensor, s: Time, t: Time) -> Tensor:
    """x_t = a x_s + b eps: carry a sample at noise level s up to level t (in x_s's dtype)."""
    check_s_t(s, t)
    a, b = _transition(coefficient(s, x_s, "s"), coefficient(t, x_s, "t"))
    dtype = work_dtype(x_s, eps)
    return (a.to(dtype) * x_s + b.to(dtype) * eps).to(x_s.dtype)


# --- the phase plan --------------------------------------------------------------------------------
@dataclass(frozen=True)
class PhasePlan:
    """How the few-step sampler is split into phases, and where each phase re-noises.

    ``timesteps`` are the sampler's start times (t_0 = 1 first, strictly decreasing; the last step goes
    to 0). ``boundaries`` are 1 = t_0 > t_1 > ... > t_K = 0, each interior one on the step grid. Phase k
    (1-based, as in the paper) owns the steps starting in (t_k, t_{k-1}], so a step starting exactly on a
    boundary belongs to the later phase. Its expert maps x at t_{k-1} to x at s = t_k.

    Re-noise interval of phase k: (t_k, 1) for ``"reverse_nested"`` (the paper's choice) or
    (t_k, t_{k-1}) for ``"disjoint"`` (TDM's, the ablation); then intersected with the optional
    per-phase ``renoise_clamp`` (lo, hi) range (a teacher expert's range, e.g. Wan2.2's high-noise expert
    (0.875, 1) for phase 1); then the lower end is raised to at least s + ``min_gap``.

    Re-noise times are drawn as the paper says, u uniform then shifted by ``renoise_shift``. The interval
    is mapped into u-space first: t = shift(u_lo + (u_hi - u_lo) u) with u_lo = unshift(lo),
    u_hi = unshift(hi). So t has exactly the distribution of shift(U(0,1)) conditioned on lying in the
    interval (the full-range draw, truncated), and a disjoint or clamped interval keeps the same density
    shape as the full-range draw instead of being squeezed into it.
    """

    timesteps: tuple[float, ...]
    boundaries: tuple[float, ...]
    renoise: str = "reverse_nested"
    renoise_shift: float = 1.0
    renoise_clamp: tuple[tuple[float, float] | None, ...] | None = None
    min_gap: float = 0.0

    def __post_init__(self) -> None:
        times = tuple(float(t) for t in self.timesteps)
        _check_timesteps(times)
        object.__setattr__(self, "timesteps", times)
        object.__setattr__(self, "boundaries", _snap_boundaries(self.boundaries, times))
        if self.renoise not in RENOISE_MODES:
            raise ValueError(f"renoise must be one of {RENOISE_MODES}; got renoise={self.renoise!r}")
        _check_shift(self.renoise_shift)
        object.__setattr__(self, "renoise_shift", float(self.renoise_shift))
        if not (isinstance(self.min_gap, numbers.Real) and 0.0 <= self.min_gap < 1.0):
            raise ValueError(f"min_gap must be a number in [0, 1); got min_gap={self.min_gap!r}")
        clamp = self.renoise_clamp
        if clamp is not None:
            if isinstance(clamp, str | bytes) or len(clamp) != self.num_phases:
                raise ValueError(f"renoise_clamp needs one entry per phase ({self.num_phases}), each null or "
                                 f"[lo, hi]; got renoise_clamp={clamp!r}")
            for k, c in enumerate(clamp, start=1):
                if c is not None and (len(c) != 2 or not 0.0 <= float(c[0]) < float(c[1]) <= 1.0):
                    raise ValueError(f"renoise_clamp for phase {k} must be [lo, hi] with 0 <= lo < hi <= 1; "
                                     f"got {c!r}")
            clamp = tuple(None if c is None else (float(c[0]), float(c[1])) for c in clamp)
        object.__setattr__(self, "renoise_clamp", clamp)
        for k in self.phases:
            self.renoise_interval(k)  # raises if a clamp or min_gap empties the interval

    # --- structure -------------------------------------------------------------------------------
    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    @property
    def num_phases(self) -> int:
        return len(self.boundaries) - 1

    @property
    def phases(self) -> range:
        """Phase indices 1..K (1-based, matching t_k in the paper)."""
        return range(1, self.num_phases + 1)

    @property
    def steps_per_phase(self) -> tuple[int, ...]:
        return tuple(len(self.steps_in_phase(k)) for k in self.phases)

    @property
    def diffusers_timesteps(self) -> tuple[float, ...]:
        """The sampler's timesteps in diffusers units (1000 t): Wan shift 5 gives 1000, 937.5, 833.3, 625."""
        return tuple(float(to_diffusers_timestep(t)) for t in self.timesteps)

    def _check_phase(self, k: int) -> None:
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= self.num_phases:
            raise ValueError(f"phase must be an integer in 1..{self.num_phases} (1-based); got phase={k!r}")

    def phase_start(self, k: int) -> float:
        """t_{k-1}: the noise level phase k's expert starts from."""
        self._check_phase(k)
        return self.boundaries[k - 1]

    def phase_end(self, k: int) -> float:
        """s = t_k: the noise level of phase k's output, where the score re-noising starts."""
        self._check_phase(k)
        return self.boundaries[k]

    def steps_in_phase(self, k: int) -> range:
        """0-based indices into ``timesteps`` of the steps phase k's expert takes."""
        hi, lo = self.phase_start(k), self.phase_end(k)
        idx = [i for i, t in enumerate(self.timesteps) if lo < t <= hi]
        return range(idx[0], idx[-1] + 1)

    def phase_of_step(self, step: int) -> int:
        """The phase (1-based) whose expert takes step ``step`` (0-based)."""
        if not isinstance(step, int) or isinstance(step, bool) or not 0 <= step < self.num_steps:
            raise ValueError(f"step must be an integer in 0..{self.num_steps - 1}; got step={step!r}")
        return next(k for k in self.phases if step in self.steps_in_phase(k))

    # --- re-noising ------------------------------------------------------------------------------
    def renoise_interval(self, k: int) -> tuple[float, float]:
        """(lo, hi) that phase k draws its score-evaluation times t from; lo >= s = t_k."""
        s = self.phase_end(k)
        lo, hi = s, (1.0 if self.renoise == "reverse_nested" else self.phase_start(k))
        clamp = self.renoise_clamp[k - 1] if self.renoise_clamp else None
        if clamp is not None:
            lo, hi = max(lo, clamp[0]), min(hi, clamp[1])
        lo = max(lo, s + self.min_gap)
        if not lo < hi:
            raise ValueError(f"phase {k}: the re-noise interval is empty ({self.renoise} interval from "
                             f"s={s:g}, clamp={clamp}, min_gap={self.min_gap:g}); widen renoise_clamp or lower min_gap")
        return lo, hi

    def sample_renoise_t(self, k: int, u: Tensor) -> Tensor:
        """Map uniform u in [0, 1] to t in phase k's interval, shift applied after the draw (see class doc).

        The result has u's dtype (float32 or float64) and is kept strictly above s even after rounding
        to that dtype (u = 0 lands on the next representable value above s), so it is always a valid t.
        """
        if u.dtype not in (torch.float32, torch.float64):
            raise ValueError(f"u must be a float32 or float64 tensor; got dtype {u.dtype}")
        check_time("u", u)
        return self._t_from_u(k, u.to(torch.float64), u.dtype)

    def draw_renoise_t(self, k: int, batch_size: int, generator: torch.Generator | None = None,
                       device: torch.device | str | None = None,
                       dtype: torch.dtype = torch.float32) -> Tensor:
        """Draw ``batch_size`` re-noise times for phase k (shape [B], strictly above s).

        u is drawn in float64 on the generator's device as 1 - U[0, 1), i.e. in (0, 1], and the result is
        moved to ``device``: the same generator state gives the same t on every rank and device.
        """
        check_int("batch_size", batch_size)
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"dtype must be torch.float32 or torch.float64; got dtype={dtype}")
        gen_device = generator.device if generator is not None else torch.device("cpu")
        u = 1.0 - torch.rand(batch_size, generator=generator, dtype=torch.float64, device=gen_device)
        return self._t_from_u(k, u, dtype).to(device or gen_device)

    def _t_from_u(self, k: int, u: Tensor, dtype: torch.dtype) -> Tensor:
        """t = shift(u_lo + (u_hi - u_lo) u) in float64, cast to dtype, then kept strictly above s."""
        lo, hi = self.renoise_interval(k)
        u_lo, u_hi = unshift(lo, self.renoise_shift), unshift(hi, self.renoise_shift)
        t = _apply_shift(u_lo + (u_hi - u_lo) * u, self.renoise_shift).clamp(lo, hi).to(dtype)
        s = self.phase_end(k)
        s_cast = torch.tensor(s, dtype=dtype, device=u.device)
        too_low = (t.to(torch.float64) <= s) | (t <= s_cast)
        return torch.where(too_low, torch.nextafter(s_cast, s_cast + 1), t)

    # --- construction ----------------------------------------------------------------------------
    @classmethod
    def from_steps(cls, num_steps: int, shift: float, steps_per_phase: Sequence[int], **options: Any) -> PhasePlan:
        """Build from a step count, a shift, and how many consecutive steps each phase takes."""
        times = few_step_timesteps(num_steps, shift)
        return cls(times, _boundaries_from_steps(times, steps_per_phase), **options)

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> PhasePlan:
        """Build from a mapping (a YAML section). Keys:

        - the steps: ``timesteps`` (explicit t's, first 1) or ``num_steps`` with ``shift`` (default 1)
          and optional ``uniform_points``;
        - the phases: ``boundaries`` (1, ..., 0), ``steps_per_phase``, or ``num_phases`` (equal split;
          default 1, which is plain DMD with s = 0);
        - re-noising: ``renoise`` ("reverse_nested" | "disjoint"), ``renoise_shift`` (default: ``shift``,
          else 1), ``renoise_clamp`` (per phase null or [lo, hi]), ``min_gap`` (default 0).

        E.g. the paper's Wan setting: {"num_steps": 4, "shift": 5, "num_phases": 2}.
        """
        unknown = set(config) - _CONFIG_KEYS
        if unknown:
            raise ValueError(f"unknown phase-plan key(s) {sorted(unknown)}; allowed: {sorted(_CONFIG_KEYS)}")
        step_shift = float(config.get("shift", 1.0))
        if "timesteps" in config:
            if {"num_steps", "uniform_points", "shift"} & set(config):
                raise ValueError("give either timesteps or num_steps/shift/uniform_points, not both")
            times = tuple(float(t) for t in config["timesteps"])
        else:
            if "num_steps" not in config:
                raise ValueError("the phase plan needs num_steps (with shift) or an explicit timesteps list")
            times = few_step_timesteps(config["num_steps"], step_shift, config.get("uniform_points"))
        _check_timesteps(times)
        given = [key for key in ("boundaries", "steps_per_phase", "num_phases") if key in config]
        if len(given) > 1:
            raise ValueError(f"give only one of boundaries, steps_per_phase, num_phases; got {given}")
        if "boundaries" in config:
            boundaries = tuple(float(b) for b in config["boundaries"])
        elif "steps_per_phase" in config:
            boundaries = _boundaries_from_steps(times, config["steps_per_phase"])
        else:
            boundaries = _boundaries_from_steps(times, _equal_split(len(times), config.get("num_phases", 1)))
        clamp = config.get("renoise_clamp")
        return cls(
            times,
            boundaries,
            renoise=config.get("renoise", "reverse_nested"),
            renoise_shift=float(config.get("renoise_shift", step_shift)),
            renoise_clamp=None if clamp is None else tuple(None if c is None else tuple(c) for c in clamp),
            min_gap=float(config.get("min_gap", 0.0)),
        )

    def to_config(self) -> dict[str, Any]:
        """A plain dict (for the run manifest) that :meth:`from_config` turns back into this plan."""
        return {
            "timesteps": list(self.timesteps),
            "boundaries": list(self.boundaries),
            "renoise": self.renoise,
            "renoise_shift": self.renoise_shift,
            "renoise_clamp": None if self.renoise_clamp is None
            else [None if c is None else list(c) for c in self.renoise_clamp],
            "min_gap": self.min_gap,
        }


_CONFIG_KEYS = {
    "timesteps", "num_steps", "shift", "uniform_points", "boundaries", "steps_per_phase", "num_phases",
    "renoise", "renoise_shift", "renoise_clamp", "min_gap",
}


def _equal_split(num_steps: int, num_phases: Any) -> list[int]:
    check_int("num_phases", num_phases)
    if num_steps % num_phases:
        raise ValueError(f"num_phases={num_phases} does not divide num_steps={num_steps}; "
                         "give steps_per_phase instead")
    return [num_steps // num_phases] * num_phases


def _boundaries_from_steps(times: Sequence[float], steps_per_phase: Sequence[int]) -> tuple[float, ...]:
    """Boundaries 1, ..., 0 from consecutive step counts per phase (each >= 1, summing to the steps)."""
    counts = list(steps_per_phase)
    for k, n in enumerate(counts, start=1):
        check_int(f"steps_per_phase[{k - 1}] (phase {k})", n)
    if sum(counts) != len(times):
        raise ValueError(f"steps_per_phase={counts} sums to {sum(counts)} but there are {len(times)} steps")
    starts = [sum(counts[:k]) for k in range(1, len(counts))]
    return (1.0, *(times[i] for i in starts), 0.0)


def _snap_boundaries(boundaries: Sequence[float], times: Sequence[float]) -> tuple[float, ...]:
    """Validate 1 = t_0 > ... > t_K = 0 with interior boundaries on the step grid; snap them onto it."""
    b = [float(x) for x in boundaries]
    if len(b) < 2:
        raise ValueError(f"boundaries need at least [1, 0] (one phase); got boundaries={b!r}")
    if b[0] != 1.0 or b[-1] != 0.0:
        raise ValueError(f"boundaries must start at 1 and end at 0; got boundaries={b!r}")
    _check_decreasing("boundaries", b)
    snapped = [1.0]
    for i, x in enumerate(b[1:-1], start=1):
        match = [t for t in times if abs(t - x) <= _GRID_TOL]
        if not match:
            raise ValueError(f"boundaries[{i}]={x!r} is not one of the step start times {list(times)}; "
                             "a phase must start where a step starts")
        snapped.append(match[0])
    return (*snapped, 0.0)
