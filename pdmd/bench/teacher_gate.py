"""Is a teacher worth distilling? The toy benchmark's gate, checked before any distillation runs.

A student can only be as sharp as the real score it is distilled from, and fakes and students start
from the teacher network: an underfit teacher makes every distilled row look worse for reasons that
have nothing to do with the method. On a task with a known law (pdmd/bench/mixture.py) the teacher's error is
measurable exactly:

- its excess velocity error per t-bin: E ||v_teacher(x_t, t) - v*(x_t, t)||^2 / D over x_t drawn from the
  true marginal, v* the closed-form velocity. (The flow-matching loss is this plus an irreducible
  constant, so it is the part training can still remove; reported, not thresholded: where it is large
  tells where the network is weak.)
- its converged samples: the teacher's ODE with many small steps (the reference row the students are
  judged against) must cover every mode (coverage 1.0), have the right within-mode spread (spread ratio
  1 +- 0.1) and land inside the modes (precision >= 0.9).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from pdmd.bench.mixture import MixtureTask

# (x_t, t [B], text embeddings [B, L, D]) -> velocity
Velocity = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
T_BINS = (0.0, 0.05, 0.1, 0.2, 0.35, 0.5, 0.7, 0.875, 1.0)


@dataclass(frozen=True)
class GateThresholds:
    coverage: float = 1.0
    spread_low: float = 0.9
    spread_high: float = 1.1
    precision: float = 0.9


def velocity_error_by_t(velocity: Velocity, task: MixtureTask, embeds: torch.Tensor, samples_per_bin: int = 512,
                        seed: int = 0, bins: tuple[float, ...] = T_BINS) -> list[dict[str, float]]:
    """Per t-bin: the mean excess error per dimension, and the mean squared exact velocity (its scale)."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for lo, hi in zip(bins[:-1], bins[1:]):
        idx = torch.randint(task.num_prompts, (samples_per_bin,), generator=gen)
        x0, _ = task.sample(idx, gen)
        t = lo + (hi - lo) * torch.rand(samples_per_bin, generator=gen)
        eps = torch.randn(x0.shape, generator=gen)
        tt = t.view(-1, *([1] * (x0.dim() - 1)))
        x_t = (1 - tt) * x0 + tt * eps
        exact = task.velocity(x_t, t, idx).float()
        got = velocity(x_t, t, embeds[idx]).float()
        rows.append({"t_lo": lo, "t_hi": hi, "excess": float((got - exact).pow(2).mean()),
                     "exact_sq": float(exact.pow(2).mean())})
    return rows


def judge(reference: Mapping[str, Any], errors: list[dict[str, float]],
          thresholds: GateThresholds = GateThresholds()) -> dict[str, Any]:
    """The gate's verdict from the reference row's metrics (mean over seeds) and the error table."""
    reasons = []
    if reference["coverage"] < thresholds.coverage:
        reasons.append(f"coverage {reference['coverage']:.3f} < {thresholds.coverage}")
    if not thresholds.spread_low <= reference["spread_ratio"] <= thresholds.spread_high:
        reasons.append(f"spread ratio {reference['spread_ratio']:.3f} outside "
                       f"[{thresholds.spread_low}, {thresholds.spread_high}]")
    if reference["precision"] < thresholds.precision:
        reasons.append(f"precision {reference['precision']:.3f} < {thresholds.precision}")
    return {"passed": not reasons, "reasons": reasons, "coverage": reference["coverage"],
            "spread_ratio": reference["spread_ratio"], "precision": reference["precision"], "tv": reference["tv"],
            "velocity_error_by_t": errors, "thresholds": vars(thresholds)}


def format_gate(gate: Mapping[str, Any]) -> str:
    """A few lines for the console and results.md."""
    verdict = "passed" if gate["passed"] else "FAILED: " + "; ".join(gate["reasons"])
    lines = [f"Teacher gate {verdict} (converged samples: coverage {gate['coverage']:.3f}, spread ratio "
             f"{gate['spread_ratio']:.3f}, precision {gate['precision']:.3f}; needs coverage >= "
             f"{gate['thresholds']['coverage']}, spread in [{gate['thresholds']['spread_low']}, "
             f"{gate['thresholds']['spread_high']}], precision >= {gate['thresholds']['precision']}).", "",
             "| t | excess velocity error / dim | exact velocity^2 / dim |", "|---|---|---|"]
    lines += [f"| [{r['t_lo']:.3g}, {r['t_hi']:.3g}) | {r['excess']:.4f} | {r['exact_sq']:.3f} |"
              for r in gate["velocity_error_by_t"]]
    return "\n".join(lines)
