"""Ground truth for the toy benchmark: per-prompt Gaussian mixtures over small Wan-shaped latents.

The diversity claim (Phased DMD keeps more of the teacher's modes than DMD2+SGTS) can only be measured
exactly when the data distribution is known. :class:`MixtureTask` is that distribution: for each of P
prompts a mixture of M Gaussians over latents of shape ``latent_shape`` (e.g. [4, 1, 8, 8], D = 256),
with exact sampling, exact log-density and exact mode posteriors. :func:`evaluate` turns a set of
generated samples into the issue-10 metrics, per prompt and averaged; pdmd/bench/plots.py draws them.

Parameters (all drawn from one seed by :meth:`MixtureTask.make`; defaults in brackets):

- Covariance: diagonal, ``std[p, m, d] = sigma[p, m] * u[p, m, d]`` with the mode scale
  ``sigma ~ U(0.15, 0.35)`` and a per-dimension factor ``u ~ U(0.8, 1.2)``. Diagonal keeps the density,
  sampling, Mahalanobis distances and the per-mode "sigma" exact and O(D), while modes still differ in
  both size and shape (so a sampler cannot fit them all with one isotropic spread).
- Means: smooth spatial patterns, so a tiny DiT with 1x2x2 patches learns them quickly. Each channel is
  a sum of 3 cosines ``a cos(2 pi (k . pos / size) + phi)`` over the spatial axes (every axis after the
  first, the channel axis) with integer frequencies |k| <= min(2, size // 2) per axis, amplitudes
  ``a ~ U(0.5, 1)`` and phases ``phi ~ U(0, 2 pi)``; the whole mean is then scaled to per-dimension RMS
  0.8. A mode's mean is redrawn until its per-dimension RMS distance to every earlier mode of the same
  prompt is >= 0.9 (independent draws give about 0.8 * sqrt(2) = 1.13). With D = 256 that puts means
  ~15-18 apart while a mode's own samples lie ~4 from its mean, ~5.7 from each other: the modes never
  overlap and ``assign`` is exact to machine precision on exact samples.
- Weights: a geometric profile ``w_k ~ r^k`` with max/min ratio 3 (r = 3^(-1/(M-1))), shuffled per
  prompt. Smallest weight: 0.13 (M = 4), 0.107 (M = 5), 0.090 (M = 6), 0.068 (M = 8); so with a few
  hundred samples per prompt the smallest mode gets tens of samples and its coverage is measurable.
- Groups (option ``groups`` > 1): each prompt's modes are split round-robin into that many groups and
  every mode of a group is moved by the group's own smooth offset of per-dimension RMS ``group_rms``
  (3.0). Far-apart groups make the high-noise steps matter: which group a sample joins is decided above
  t ~ 0.8, where a 4-step sampler's first phase works (the benchmark's task for phase 1).
- Scale: latents have per-dimension RMS about 0.84 (0.8 from the means, ~0.25 within a mode), close to
  the unit scale of the N(0, I) noise a flow-matching teacher starts from.

Metric references (:meth:`MixtureTask.reference`) are estimated, not closed form, but stratified by mode
so they carry almost no Monte-Carlo noise: E||x - y|| = sum_ij w_i w_j E||x_i - y_j|| with exact weights
and 1024 fixed-seed pairs per mode pair (in D = 256 the distance between two Gaussian draws concentrates
tightly), and the mixture's entropy sum_m w_m E_m[-log p(x)] with 1024 fixed-seed draws per mode.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

FORMAT_VERSION = 1
METRICS = ("coverage", "tv", "spread_ratio", "pairwise_ratio", "precision", "nll_per_dim")
THREE_SIGMA_MASS = math.erf(3 / math.sqrt(2))  # 0.99730020..., the mass of |Z| <= 3 in one dimension
COVERAGE_SHARE = 0.25  # a mode is covered when it gets at least this fraction of its true weight

DEFAULTS: dict[str, Any] = {
    "sigma_range": (0.15, 0.35),
    "dim_factor_range": (0.8, 1.2),
    "mean_rms": 0.8,
    "min_separation": 0.9,  # per-dimension RMS distance between two means of one prompt
    "weight_ratio": 3.0,  # largest / smallest mode weight
    "num_cosines": 3,
    "max_frequency": 2,
    "groups": 1,  # > 1: modes sit in that many far-apart groups (mode m in group m % groups)
    "group_rms": 3.0,  # per-dimension RMS of a group's centre offset (groups > 1 only)
}
_REF_PAIRS = 1024  # per mode pair (pairwise distance) and per mode (entropy)
_MAX_REDRAWS = 1000
_LOG_2PI = math.log(2 * math.pi)


# ---------------------------------------------------------------------------------------------------
# the chi-square quantile behind "within 3 sigma"
# ---------------------------------------------------------------------------------------------------
def chi2_quantile(p: float, dof: int) -> float:
    """The p-quantile of chi-square with ``dof`` degrees of freedom (bisection on the exact CDF).

    The CDF is the regularised lower incomplete gamma P(dof/2, q/2) (torch.special.gammainc), so no scipy
    is needed and no Wilson-Hilferty approximation: the answer is exact to ~1e-10.
    """
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must lie in (0, 1); got p={p!r}")
    if not isinstance(dof, int) or isinstance(dof, bool) or dof < 1:
        raise ValueError(f"dof must be an integer >= 1; got dof={dof!r}")
    a = torch.tensor(dof / 2, dtype=torch.float64)

    def cdf(q: float) -> float:
        return float(torch.special.gammainc(a, torch.tensor(q / 2, dtype=torch.float64)))

    lo, hi = 0.0, float(dof) + 10.0
    while cdf(hi) < p:
        hi *= 2
    for _ in range(200):
        mid = (lo + hi) / 2
        if cdf(mid) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-12 * hi:
            break
    return (lo + hi) / 2


# ---------------------------------------------------------------------------------------------------
# the task
# ---------------------------------------------------------------------------------------------------
@dataclass(eq=False)
class MixtureTask:
    """P prompts, each a mixture of M diagonal Gaussians over ``latent_shape`` (float64 parameters).

    ``weights`` [P, M] (rows sum to 1), ``means`` and ``stds`` [P, M, D] with D = prod(latent_shape).
    ``recipe`` records how :meth:`make` drew them (None for hand-built tasks). Tensors live on the CPU;
    methods move them to their input's device.
    """

    latent_shape: tuple[int, ...]
    weights: Tensor
    means: Tensor
    stds: Tensor
    recipe: dict[str, Any] | None = None
    _cache: dict[Any, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.latent_shape = tuple(int(s) for s in self.latent_shape)
        if not self.latent_shape or any(s < 1 for s in self.latent_shape):
            raise ValueError(f"latent_shape must be non-empty positive sizes; got {list(self.latent_shape)}")
        self.weights = torch.as_tensor(self.weights, dtype=torch.float64).cpu()
        self.means = torch.as_tensor(self.means, dtype=torch.float64).cpu()
        self.stds = torch.as_tensor(self.stds, dtype=torch.float64).cpu()
        if self.weights.dim() != 2:
            raise ValueError(f"weights must have shape [P, M]; got {tuple(self.weights.shape)}")
        want = (*self.weights.shape, self.dim)
        if tuple(self.means.shape) != want or tuple(self.stds.shape) != want:
            raise ValueError(f"means and stds must have shape [P, M, D] = {list(want)}; got "
                             f"{list(self.means.shape)} and {list(self.stds.shape)}")
        if not bool((self.weights > 0).all()) or not torch.allclose(
                self.weights.sum(1), torch.ones(self.num_prompts, dtype=torch.float64), atol=1e-9):
            raise ValueError("weights must be positive and each prompt's row must sum to 1")
        if not bool((self.stds > 0).all()) or not bool(torch.isfinite(self.means).all()):
            raise ValueError("stds must be positive and means finite")

    # --- construction ----------------------------------------------------------------------------
    @classmethod
    def make(cls, num_prompts: int, num_modes: int, latent_shape: Sequence[int], seed: int,
             **options: Any) -> MixtureTask:
        """Draw a task from ``seed`` (see the module docstring; ``options`` override :data:`DEFAULTS`).

        The same arguments give the same task on any machine with the same torch CPU generator.
        """
        for name, value, low in (("num_prompts", num_prompts, 1), ("num_modes", num_modes, 2)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}; got {name}={value!r}")
        unknown = set(options) - set(DEFAULTS)
        if unknown:
            raise ValueError(f"unknown option(s) {sorted(unknown)}; allowed: {sorted(DEFAULTS)}")
        opt = {**DEFAULTS, **options}
        shape = tuple(int(s) for s in latent_shape)
        gen = torch.Generator().manual_seed(int(seed))
        dim = math.prod(shape)

        r = float(opt["weight_ratio"]) ** (-1.0 / (num_modes - 1))
        profile = torch.tensor([r**k for k in range(num_modes)], dtype=torch.float64)
        profile /= profile.sum()
        weights = torch.stack([profile[torch.randperm(num_modes, generator=gen)] for _ in range(num_prompts)])

        means = torch.empty(num_prompts, num_modes, dim, dtype=torch.float64)
        for p in range(num_prompts):
            for m in range(num_modes):
                for _ in range(_MAX_REDRAWS):
                    mu = _smooth_pattern(shape, gen, int(opt["num_cosines"]), int(opt["max_frequency"]))
                    mu *= float(opt["mean_rms"]) / mu.pow(2).mean().sqrt()
                    if m == 0 or float(_rms_dist(mu, means[p, :m]).min()) >= float(opt["min_separation"]):
                        break
                else:
                    raise ValueError(f"could not place {num_modes} means at min_separation="
                                     f"{opt['min_separation']} in shape {list(shape)}; lower it or use fewer modes")
                means[p, m] = mu

        s_lo, s_hi = opt["sigma_range"]
        f_lo, f_hi = opt["dim_factor_range"]
        sigma = s_lo + (s_hi - s_lo) * torch.rand(num_prompts, num_modes, 1, generator=gen, dtype=torch.float64)
        factor = f_lo + (f_hi - f_lo) * torch.rand(num_prompts, num_modes, dim, generator=gen, dtype=torch.float64)
        groups = int(opt["groups"])
        if groups > 1:  # drawn last, so that groups=1 tasks are the ones drawn before this option existed
            for p in range(num_prompts):
                for g in range(groups):
                    centre = _smooth_pattern(shape, gen, int(opt["num_cosines"]), int(opt["max_frequency"]))
                    means[p, g::groups] += centre * float(opt["group_rms"]) / centre.pow(2).mean().sqrt()
        recipe = {"num_prompts": num_prompts, "num_modes": num_modes, "latent_shape": list(shape),
                  "seed": int(seed), "options": {k: list(v) if isinstance(v, tuple) else v for k, v in opt.items()}}
        return cls(shape, weights, means, sigma * factor, recipe)

    # --- shape ----------------------------------------------------------------------------------
    @property
    def num_prompts(self) -> int:
        return int(self.weights.shape[0])

    @property
    def num_modes(self) -> int:
        return int(self.weights.shape[1])

    @property
    def dim(self) -> int:
        return math.prod(self.latent_shape)

    def mode_sigma(self) -> Tensor:
        """[P, M] per-mode RMS std over dimensions, sqrt(tr Sigma / D): the mode's "sigma" in tables."""
        return self.stds.pow(2).mean(-1).sqrt()

    def _flat(self, x: Tensor, prompt_idx: Tensor) -> tuple[Tensor, Tensor]:
        """x as float64 [B, D] and prompt_idx as a long [B] on x's device, validated."""
        if x.dim() < 1 or x.numel() != x.shape[0] * self.dim:
            raise ValueError(f"x must have shape [B, {', '.join(map(str, self.latent_shape))}] or [B, {self.dim}]; "
                             f"got {list(x.shape)}")
        idx = torch.as_tensor(prompt_idx, device=x.device).long().reshape(-1)
        if idx.shape[0] != x.shape[0]:
            raise ValueError(f"prompt_idx has {idx.shape[0]} entries but x has batch size {x.shape[0]}")
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.num_prompts):
            raise ValueError(f"prompt_idx must lie in 0..{self.num_prompts - 1}; got values "
                             f"{int(idx.min())}..{int(idx.max())}")
        return x.detach().reshape(x.shape[0], -1).to(torch.float64), idx

    # --- sampling and density --------------------------------------------------------------------
    def sample(self, prompt_idx: Tensor, generator: torch.Generator | None = None,
               dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
        """Exact draws: (x [B, *latent_shape] in ``dtype``, mode [B]) for the prompts in ``prompt_idx``.

        Draws on prompt_idx's device; ``generator`` must live there too.
        """
        idx = torch.as_tensor(prompt_idx).long().reshape(-1)
        w = self.weights.to(idx.device)[idx]
        mode = torch.multinomial(w, 1, generator=generator).squeeze(1) if idx.numel() else idx.clone()
        return self.sample_given_mode(idx, mode, generator, dtype), mode

    def sample_given_mode(self, prompt_idx: Tensor, mode: Tensor, generator: torch.Generator | None = None,
                          dtype: torch.dtype = torch.float32) -> Tensor:
        """Exact draws from chosen modes (for tests and for deliberately mis-weighted sample sets)."""
        idx = torch.as_tensor(prompt_idx).long().reshape(-1)
        mode = torch.as_tensor(mode, device=idx.device).long().reshape(-1)
        if mode.shape != idx.shape:
            raise ValueError(f"mode has {mode.numel()} entries but prompt_idx has {idx.numel()}")
        eps = torch.randn(idx.shape[0], self.dim, generator=generator, dtype=torch.float64, device=idx.device)
        mu, sd = self.means.to(idx.device)[idx, mode], self.stds.to(idx.device)[idx, mode]
        return (mu + sd * eps).to(dtype).reshape(idx.shape[0], *self.latent_shape)

    def component_log_prob(self, x: Tensor, prompt_idx: Tensor) -> Tensor:
        """[B, M] log N(x; mu_m, diag std_m^2) for each mode of each sample's prompt (float64)."""
        xf, idx = self._flat(x, prompt_idx)
        mu, sd = self.means.to(xf.device)[idx], self.stds.to(xf.device)[idx]
        z = (xf[:, None, :] - mu) / sd
        return -0.5 * z.pow(2).sum(-1) - sd.log().sum(-1) - 0.5 * self.dim * _LOG_2PI

    def mahalanobis_sq(self, x: Tensor, prompt_idx: Tensor) -> Tensor:
        """[B, M] squared Mahalanobis distance of each sample to each mode of its prompt."""
        xf, idx = self._flat(x, prompt_idx)
        mu, sd = self.means.to(xf.device)[idx], self.stds.to(xf.device)[idx]
        return ((xf[:, None, :] - mu) / sd).pow(2).sum(-1)

    def _joint(self, x: Tensor, prompt_idx: Tensor) -> Tensor:
        """[B, M] log w_m + log N_m(x): the unnormalised log posterior."""
        comp = self.component_log_prob(x, prompt_idx)  # validates first
        return self.weights.to(comp.device)[torch.as_tensor(prompt_idx, device=comp.device).long().reshape(-1)].log() + comp

    def log_prob(self, x: Tensor, prompt_idx: Tensor) -> Tensor:
        """[B] exact log-density of the prompt's mixture at x (logsumexp over modes, float64)."""
        return torch.logsumexp(self._joint(x, prompt_idx), dim=-1)

    def posterior(self, x: Tensor, prompt_idx: Tensor) -> Tensor:
        """[B, M] exact responsibilities p(mode | x, prompt)."""
        return torch.softmax(self._joint(x, prompt_idx), dim=-1)

    def assign(self, x: Tensor, prompt_idx: Tensor) -> Tensor:
        """[B] the most probable mode of each sample (argmax of the posterior)."""
        return self.posterior(x, prompt_idx).argmax(-1)

    def at_time(self, t: float) -> MixtureTask:
        """The law of x_t = (1 - t) x0 + t eps: mode k becomes N((1 - t) mu_k, (1 - t)^2 std_k^2 + t^2), same
        weights. Its :meth:`posterior` says how far a sample's mode is decided at t (docs/benchmarks.md, issue 17)."""
        if not 0.0 <= t < 1.0:
            raise ValueError(f"t must lie in [0, 1); got {t}")
        return MixtureTask(self.latent_shape, self.weights, self.means * (1 - t), ((1 - t) ** 2 * self.stds**2 + t**2).sqrt())

    # --- the exact flow-matching velocity -------------------------------------------------------
    def velocity(self, x: Tensor, t: Tensor | float, prompt_idx: Tensor | None) -> Tensor:
        """E[eps - x0 | x_t = x] under x_t = (1 - t) x0 + t eps, exactly: what a perfect teacher predicts.

        Given mode k, x_t ~ N((1 - t) mu_k, V_k) with V_k = (1 - t)^2 std_k^2 + t^2 (diagonal), and
        (x0, eps) are jointly Gaussian with x_t, so E[x0 | x_t, k] = mu_k + (1 - t) std_k^2 / V_k (x_t - (1 - t) mu_k)
        and E[eps | x_t, k] = t / V_k (x_t - (1 - t) mu_k); the modes are weighted by their exact posterior
        at x_t. ``prompt_idx`` [B] picks each sample's mixture; None = the prompt-marginal mixture (every
        prompt's modes, weights divided by P): the unconditional branch of a CFG teacher. ``t`` is a
        number or [B]. Computed in float64 on x's device; returned in x's dtype and shape.
        """
        xf = x.detach().reshape(x.shape[0], -1).to(torch.float64)
        if xf.shape[1] != self.dim:
            raise ValueError(f"x must have {self.dim} elements per sample ({list(self.latent_shape)}); got {list(x.shape)}")
        tt = torch.as_tensor(t, dtype=torch.float64, device=xf.device).reshape(-1)
        tt = (tt.expand(xf.shape[0]) if tt.numel() == 1 else tt)[:, None, None]  # [B, 1, 1]
        if prompt_idx is None:  # every prompt's modes, each prompt equally likely
            logw = (self.weights.log() - math.log(self.num_prompts)).reshape(1, -1).to(xf.device)
            mu = self.means.reshape(1, -1, self.dim).to(xf.device)
            sd = self.stds.reshape(1, -1, self.dim).to(xf.device)
        else:
            idx = torch.as_tensor(prompt_idx, device=xf.device).long().reshape(-1)
            logw, mu, sd = (a.to(xf.device)[idx] for a in (self.weights.log(), self.means, self.stds))
        var = (1 - tt) ** 2 * sd**2 + tt**2  # [B, M, D]
        r = xf[:, None, :] - (1 - tt) * mu
        log_n = -0.5 * (r**2 / var + var.log()).sum(-1)  # log N(x_t; (1-t) mu_k, V_k) up to a constant
        post = torch.softmax(logw + log_n, dim=-1)  # [B, M]
        v_k = (tt - (1 - tt) * sd**2) / var * r - mu  # E[eps | k] - E[x0 | k]
        v = (post[:, :, None] * v_k).sum(1)
        return v.to(x.dtype).reshape(x.shape)

    # --- references for the metrics --------------------------------------------------------------
    def reference(self, prompt: int) -> dict[str, float]:
        """Fixed-seed, mode-stratified references for one prompt (cached): ``pairwise`` = E||x - y|| and
        ``entropy_per_dim`` = H(p) / D for x, y drawn independently from the prompt's mixture."""
        key = ("reference", int(prompt))
        if key in self._cache:
            return self._cache[key]
        p, M, n = int(prompt), self.num_modes, _REF_PAIRS
        gen = torch.Generator().manual_seed(1_000_003 * (int((self.recipe or {}).get("seed", 0)) + 1) + p)
        w, mu, sd = self.weights[p], self.means[p], self.stds[p]
        draws = mu[:, None] + sd[:, None] * torch.randn(M, 2 * n, self.dim, generator=gen, dtype=torch.float64)
        pair = torch.empty(M, M, dtype=torch.float64)
        for i in range(M):
            for j in range(M):
                pair[i, j] = (draws[i, :n] - draws[j, n:]).norm(dim=-1).mean()
        ent = torch.stack([-self.log_prob(draws[m, :n], torch.full((n,), p)).mean() for m in range(M)])
        ref = {"pairwise": float(w @ pair @ w), "entropy_per_dim": float(w @ ent) / self.dim}
        self._cache[key] = ref
        return ref

    # --- records ---------------------------------------------------------------------------------
    def to_dict(self, include_params: bool = True) -> dict[str, Any]:
        """A JSON-serialisable record. With ``include_params`` the drawn parameters are stored exactly
        (float64 reprs, ~20 bytes per number); without, only the recipe (needs a task from :meth:`make`)."""
        out: dict[str, Any] = {"format": FORMAT_VERSION, "latent_shape": list(self.latent_shape),
                               "recipe": self.recipe}
        if include_params or self.recipe is None:
            out.update(weights=self.weights.tolist(), means=self.means.tolist(), stds=self.stds.tolist())
        return out

    @classmethod
    def from_dict(cls, record: Mapping[str, Any]) -> MixtureTask:
        """Inverse of :meth:`to_dict` (stored parameters win; a recipe-only record is redrawn)."""
        if record.get("format") != FORMAT_VERSION:
            raise ValueError(f"unsupported mixture task format {record.get('format')!r}; expected {FORMAT_VERSION}")
        recipe = record.get("recipe")
        if "weights" in record:
            return cls(tuple(record["latent_shape"]), torch.tensor(record["weights"], dtype=torch.float64),
                       torch.tensor(record["means"], dtype=torch.float64),
                       torch.tensor(record["stds"], dtype=torch.float64), recipe)
        if recipe is None:
            raise ValueError("a mixture task record needs either the parameters or a recipe")
        opts = {k: tuple(v) if isinstance(v, list) else v for k, v in recipe.get("options", {}).items()}
        return cls.make(recipe["num_prompts"], recipe["num_modes"], recipe["latent_shape"], recipe["seed"], **opts)

    def describe(self) -> str:
        """A markdown paragraph and per-prompt table of the drawn parameters (for results.md)."""
        sig = self.mode_sigma()
        head = (f"Ground truth: {self.num_prompts} prompt(s), each a mixture of {self.num_modes} diagonal Gaussians "
                f"over latents of shape {list(self.latent_shape)} (D = {self.dim})")
        if self.recipe is not None:
            head += f", drawn from seed {self.recipe['seed']}"
        lines = [head + ". Min separation is the smallest distance between two means of the prompt; mode radius "
                 "is sqrt(tr Sigma), the typical distance of a mode's samples from its mean (two samples of one "
                 "mode lie sqrt(2) times that apart); sigma is a mode's RMS std per dimension. Separation >> "
                 "radius: the modes do not overlap.", "",
                 "| prompt | weights | sigma per mode | min separation | mode radius | RMS of latents |",
                 "|---|---|---|---|---|---|"]
        for p in range(self.num_prompts):
            mu, w = self.means[p], self.weights[p]
            d = torch.cdist(mu, mu) + torch.eye(self.num_modes, dtype=torch.float64) * 1e30
            radius = sig[p] * math.sqrt(self.dim)
            rms = math.sqrt(float(w @ (mu.pow(2) + self.stds[p].pow(2)).mean(-1)))
            lines.append(f"| {p} | {', '.join(f'{v:.3f}' for v in w.tolist())} "
                         f"| {', '.join(f'{v:.3f}' for v in sig[p].tolist())} | {float(d.min()):.2f} "
                         f"| {float(radius.min()):.2f}-{float(radius.max()):.2f} | {rms:.3f} |")
        return "\n".join(lines) + "\n"


def _smooth_pattern(shape: tuple[int, ...], gen: torch.Generator, num_cosines: int, max_frequency: int) -> Tensor:
    """[D] a sum of a few low-frequency cosines per channel over the spatial axes (shape[1:])."""
    channels, spatial = shape[0], shape[1:]
    grids = torch.meshgrid(*[torch.arange(s, dtype=torch.float64) / s for s in spatial], indexing="ij") \
        if spatial else ()
    out = torch.zeros(channels, *spatial, dtype=torch.float64)
    for c in range(channels):
        for _ in range(num_cosines):
            phase = 2 * math.pi * float(torch.rand((), generator=gen, dtype=torch.float64))
            amp = 0.5 + 0.5 * float(torch.rand((), generator=gen, dtype=torch.float64))
            arg = torch.full(tuple(spatial), phase, dtype=torch.float64)
            for axis, size in enumerate(spatial):
                kmax = min(max_frequency, size // 2)
                k = int(torch.randint(-kmax, kmax + 1, (), generator=gen)) if kmax else 0
                arg = arg + 2 * math.pi * k * grids[axis]
            out[c] += amp * torch.cos(arg)
    return out.reshape(-1)


def _rms_dist(mu: Tensor, others: Tensor) -> Tensor:
    """Per-dimension RMS distance from ``mu`` [D] to each row of ``others`` [K, D]."""
    return (others - mu).pow(2).mean(-1).sqrt()


# ---------------------------------------------------------------------------------------------------
# metrics
# ---------------------------------------------------------------------------------------------------
def evaluate(task: MixtureTask, x: Tensor, prompt_idx: Tensor) -> dict[str, Any]:
    """The issue-10 metrics of generated samples against the true mixtures, per prompt and averaged.

    Per prompt (samples grouped by ``prompt_idx``; ~64-512 per prompt is plenty):

    - ``coverage``: fraction of modes whose sampled share (from :meth:`MixtureTask.assign`) is at least
      a quarter of their true weight.
    - ``tv``: total variation 0.5 sum_m |q_m - w_m| between sampled shares q and true weights w.
    - ``spread_ratio``: per mode with >= 2 assigned samples, sqrt(mean_d s_d^2 / std_d^2) with s_d^2 the
      unbiased sample variance around the samples' own mean (so 1 for exact samples, 0 for collapse onto
      points); averaged over those modes weighted by true weight. NaN if no mode has 2 samples.
    - ``pairwise_ratio``: mean distance over all sample pairs / E||x - y|| of the true mixture
      (:meth:`MixtureTask.reference`). Below 1 = less diverse than the data. Costs O(n^2 D) per prompt.
    - ``precision``: fraction of samples within "3 sigma" of some mode: squared Mahalanobis distance to
      the nearest mode <= the chi-square(D) quantile at 0.9973 (the 1-D 3-sigma mass), so exact samples
      score ~0.997. In D = 256 this is strict: a mode's spread inflated by ~10% already fails most samples.
    - ``nll_per_dim``: -log p(x) / D under the true mixture; ``nll_per_dim_true`` is the mixture's own
      entropy per dimension (what exact samples score). Lower than it means samples sit too near the means.

    The top level holds the mean over prompts that have samples (NaN-aware) of each name in
    :data:`METRICS`, their spread (``<name>_std``, over prompts), ``per_prompt`` (values, ``counts``,
    ``sampled_weights``, ``true_weights``), ``num_samples`` and ``precision_threshold``.
    """
    xf, idx = task._flat(x, prompt_idx)
    xf, idx = xf.cpu(), idx.cpu()
    threshold = _precision_threshold(task)
    log_comp = task.component_log_prob(xf, idx)  # [N, M]
    logw = task.weights[idx].log()
    log_p = torch.logsumexp(logw + log_comp, -1)
    mode = (logw + log_comp).argmax(-1)
    maha = task.mahalanobis_sq(xf, idx).min(-1).values

    per_prompt: list[dict[str, Any]] = []
    for p in range(task.num_prompts):
        sel = idx == p
        n = int(sel.sum())
        if n == 0:
            continue
        xp, mp, w = xf[sel], mode[sel], task.weights[p]
        counts = torch.bincount(mp, minlength=task.num_modes).to(torch.float64)
        q = counts / n
        spreads, spread_w = [], []
        for m in range(task.num_modes):
            if counts[m] >= 2:
                var = xp[mp == m].var(0, unbiased=True)
                spreads.append(float((var / task.stds[p, m].pow(2)).mean().sqrt()))
                spread_w.append(float(w[m]))
        ref = task.reference(p)
        per_prompt.append({
            "prompt": p,
            "n": n,
            "coverage": float((q >= COVERAGE_SHARE * w).double().mean()),
            "tv": 0.5 * float((q - w).abs().sum()),
            "spread_ratio": (sum(a * b for a, b in zip(spreads, spread_w)) / sum(spread_w)) if spreads else math.nan,
            "pairwise_ratio": _mean_pairwise(xp) / ref["pairwise"] if n >= 2 else math.nan,
            "precision": float((maha[sel] <= threshold).double().mean()),
            "nll_per_dim": float(-log_p[sel].mean()) / task.dim,
            "nll_per_dim_true": ref["entropy_per_dim"],
            "counts": [int(c) for c in counts.tolist()],
            "sampled_weights": q.tolist(),
            "true_weights": w.tolist(),
        })
    out: dict[str, Any] = {}
    for name in (*METRICS, "nll_per_dim_true"):
        vals = torch.tensor([r[name] for r in per_prompt], dtype=torch.float64)
        ok = vals[~vals.isnan()]
        out[name] = float(ok.mean()) if ok.numel() else math.nan
        out[f"{name}_std"] = float(ok.std(unbiased=False)) if ok.numel() else math.nan
    out.update(num_samples=int(xf.shape[0]), num_prompts=len(per_prompt), precision_threshold=threshold,
               per_prompt=per_prompt)
    return out


def _precision_threshold(task: MixtureTask) -> float:
    key = ("threshold", task.dim)
    if key not in task._cache:
        task._cache[key] = chi2_quantile(THREE_SIGMA_MASS, task.dim)
    return task._cache[key]


def _mean_pairwise(x: Tensor) -> float:
    """Mean Euclidean distance over the n(n-1)/2 distinct pairs of rows of x."""
    n = x.shape[0]
    return float(torch.cdist(x, x).triu(1).sum()) / (n * (n - 1) / 2)  # float64: matmul form is ~1e-9 exact


def format_metrics(result: Mapping[str, Any]) -> str:
    """One line of the averaged metrics (for logs)."""
    return "  ".join(f"{name} {result[name]:.3f}" for name in METRICS)


# ---------------------------------------------------------------------------------------------------
# the picture
# ---------------------------------------------------------------------------------------------------
def projection_basis(task: MixtureTask, prompt: int) -> tuple[Tensor, Tensor]:
    """(centre [D], basis [D, 2]): the prompt's mean of means and the top-2 principal directions of its
    mode means (completed by a fixed orthogonal direction when the means span only one)."""
    mu = task.means[prompt]
    centre = mu.mean(0)
    _, s, vh = torch.linalg.svd(mu - centre, full_matrices=False)
    basis = vh[:2].T.clone()
    if basis.shape[1] < 2 or float(s[1]) < 1e-9 * max(float(s[0]), 1e-300):
        extra = torch.randn(task.dim, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        extra -= basis[:, 0] * (basis[:, 0] @ extra)
        basis = torch.stack([basis[:, 0], extra / extra.norm()], 1)
    return centre, basis


def save_task(task: MixtureTask, path: Path | str, include_params: bool = True) -> Path:
    """Write :meth:`MixtureTask.to_dict` as JSON (a run records the task it was measured against)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(task.to_dict(include_params)))
    return path


def load_task(path: Path | str) -> MixtureTask:
    """Inverse of :func:`save_task`."""
    return MixtureTask.from_dict(json.loads(Path(path).read_text()))
