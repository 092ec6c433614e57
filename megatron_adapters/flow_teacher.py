"""Train a small Wan2.2-style teacher by flow matching, with our Megatron Wan model, on a known data set.

What the demo (pdmd/bench/demo.py) distils: a two-expert teacher like Wan2.2-A14B. One network is first
trained on all of t, then copied into the high-noise expert (t >= boundary) and the low-noise expert,
and each copy is fine-tuned on its own range, as Wan2.2's experts specialise a shared initialisation.
The result is written back as a diffusers folder through the same conversion rules the exporter uses,
so the distillation reads it like any real teacher. Single process, TP=1, plain AdamW: a pretraining
loop at this size needs no more (the distillation itself runs through the full Megatron path).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from megatron_adapters.conversion import diffusers_from_shards
from megatron_adapters.families.wan.config import WanConfig, transformer_config
from megatron_adapters.families.wan.convert import load_from_diffusers, wan_rules
from megatron_adapters.families.wan.model import build_wan_model
from megatron_adapters.families.wan.specs import layer_spec
from megatron_adapters.runtime.parallel import ParallelLayout, initialize

# (batch size, generator) -> (clean latents [B, C, F, H, W], text embeddings [B, L, D], prompt index [B])
DataFn = Callable[[int, torch.Generator], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
# (x_t, t [B], prompt index [B]) -> the exact velocity E[eps - x0 | x_t], when the data's law is known
ExactVelocity = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class FlowTeacherConfig:
    shared_steps: int = 600  # one network on all of t
    expert_steps: int = 300  # then each expert on its own range
    batch_size: int = 128
    lr: float = 1e-3
    shift: float = 3.0  # half of the training times are drawn shifted towards noise, where sampling starts
    seed: int = 0


def draw_times(batch: int, shift: float, lo: float, hi: float, gen: torch.Generator) -> torch.Tensor:
    """t in [lo, hi): half uniform, half shifted towards 1 (u drawn first, then shifted), like the
    samplers' timesteps; inside an expert's range the draw is rescaled onto it."""
    u = torch.rand(batch, generator=gen)
    shifted = shift * u / (1 + (shift - 1) * u)
    t = torch.where(torch.arange(batch) % 2 == 0, u, shifted)
    return lo + (hi - lo) * t.clamp(1e-4, 1 - 1e-4)


def flow_matching_loss(model, x0: torch.Tensor, text: torch.Tensor, t: torch.Tensor, gen: torch.Generator,
                       exact: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """MSE between the velocity and eps - x0 at x_t = (1 - t) x0 + t eps (the Wan / rectified-flow target),
    or, given ``exact(x_t, t)``, the exact velocity there: the same minimiser without the target's noise
    (the flow-matching loss is this regression loss plus a constant), so a small network fits far faster."""
    eps = torch.randn(x0.shape, generator=gen)
    tt = t.view(-1, *([1] * (x0.dim() - 1)))
    x_t = (1 - tt) * x0 + tt * eps
    v = model(x_t, t * 1000.0, text)
    target = eps - x0 if exact is None else exact(x_t, t)
    return torch.nn.functional.mse_loss(v.float(), target.float())


def _fit(model, data: DataFn, steps: int, cfg: FlowTeacherConfig, lo: float, hi: float, gen: torch.Generator,
         report: Callable[[str, int, float], None], name: str, exact: ExactVelocity | None) -> list[float]:
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=max(steps, 1), pct_start=0.1)
    losses = []
    model.train()
    for step in range(steps):
        x0, text, prompt = data(cfg.batch_size, gen)
        target = None if exact is None else (lambda x_t, t, prompt=prompt: exact(x_t, t, prompt))
        loss = flow_matching_loss(model, x0, text, draw_times(cfg.batch_size, cfg.shift, lo, hi, gen), gen, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        report(name, step + 1, losses[-1])
    return losses


def _save(model, wan: WanConfig, folder: Path) -> None:
    """Back to diffusers through the exporter's conversion rules, checked by a strict load."""
    from diffusers import WanTransformer3DModel

    state = {k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor) and not k.endswith("_extra_state")}
    tensors = diffusers_from_shards({(0, 0): state}, wan_rules(wan), [(0, wan.num_layers)], 1)
    reference = WanTransformer3DModel.from_pretrained(folder)
    reference.load_state_dict(tensors, strict=True)
    reference.save_pretrained(folder)


def train_flow_teacher(folder: str | Path, data: DataFn, cfg: FlowTeacherConfig, *, boundary: float,
                       report: Callable[[str, int, float], None] = lambda *_: None,
                       exact: ExactVelocity | None = None) -> dict[str, list[float]]:
    """Train the two experts of the diffusers teacher folder in place (``transformer`` = high noise,
    ``transformer_2`` = low noise; weights there are the initialisation); returns the loss curves.
    ``exact``: regress on the known exact velocity instead of the noisy flow-matching target."""
    folder = Path(folder)
    wan = WanConfig.from_json(folder / "transformer")
    ctx = initialize(ParallelLayout(), seed=cfg.seed, num_heads=wan.num_attention_heads, num_layers=wan.num_layers)
    tconfig = transformer_config(wan, ctx.model_parallel_kwargs())
    gen = torch.Generator().manual_seed(cfg.seed)
    model = build_wan_model(tconfig, wan, layer_spec("local"))
    load_from_diffusers(model, folder / "transformer")
    curves = {"shared": _fit(model, data, cfg.shared_steps, cfg, 0.0, 1.0, gen, report, "shared", exact)}
    shared = {k: v.clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    for name, (lo, hi) in (("transformer", (boundary, 1.0)), ("transformer_2", (0.0, boundary))):
        model.load_state_dict(shared, strict=False)  # everything but Megatron's (empty) _extra_state entries
        curves[name] = _fit(model, data, cfg.expert_steps, cfg, lo, hi, gen, report, name, exact)
        _save(model, wan, folder / name)
    return curves
