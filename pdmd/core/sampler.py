"""The few-step sampler: the trainer's rollout (pdmd/core/method.py) run to t = 0, one phase expert per
subinterval, CFG as WanPipeline does it. Every other sampler in the project (``pdmd sample``, the export's
verification, the benchmarks) is this one."""

from __future__ import annotations

from collections.abc import Callable

import torch

from pdmd.core.conditioning import Conditioning
from pdmd.core.schedule import PhasePlan

# (phase, x, t [B], text[, cond]) -> v. The callable applies ``cond`` itself (model input, per-token
# timesteps: it knows its patch size); euler_sample passes it only when there is one.
Velocity = Callable[..., torch.Tensor]


@torch.no_grad()
def euler_sample(velocity: Velocity, plan: PhasePlan, x: torch.Tensor, text: torch.Tensor,
                 negative: torch.Tensor | None = None, guidance: float = 1.0,
                 cond: Conditioning | None = None) -> torch.Tensor:
    """Our sampler: the trainer's rollout (pdmd/core/method.py) run to t = 0, CFG as WanPipeline does it (g > 1).

    With ``cond`` (image conditioning) every velocity call gets it (the negative pass too: the pipelines
    keep the image in the unconditional pass) and ``cond.clamp`` restores the given part after every step,
    so a TI2V first frame is exactly the image latent throughout and at the end."""
    if guidance > 1.0 and negative is None:
        raise ValueError("guidance > 1 needs negative prompt embeddings")
    times = [*plan.timesteps, 0.0]
    x = x.float()
    extra: tuple[Conditioning, ...] = ()
    if cond is not None:
        cond = to_device(cond.expand(x.shape[0]), x.device)
        x, extra = cond.clamp(x), (cond,)
    for i in range(plan.num_steps):
        k = plan.phase_of_step(i)
        t = torch.full((x.shape[0],), times[i], device=x.device)
        v = velocity(k, x, t, text, *extra)
        if guidance > 1.0:
            v_neg = velocity(k, x, t, negative, *extra)
            v = v_neg + guidance * (v - v_neg)
        x = x + (times[i + 1] - times[i]) * v.float()
        if cond is not None:
            x = cond.clamp(x)
    return x


def to_device(cond: Conditioning, device: torch.device | str) -> Conditioning:
    return Conditioning(cond.kind, cond.latents.to(device),
                        None if cond.mask is None else cond.mask.to(device))
