"""One phase of Phased DMD over a model backend: rollout, generator update, fake update.

The networks come through the backend protocol (pdmd/core/backend.py), implemented by
megatron_adapters.backend.MegatronBackend.

The student is trained by regression (docs/architecture.md): all no-grad passes first give the DMD target
sg(x_gen - grad); then one ``train_step`` fits x_gen(v) = x_in + (s - t_in) v to it, which has exactly
the DMD surrogate's gradient and works unchanged under pipeline parallelism.
Randomness comes from (seed, phase, step, purpose, dp rank) only: identical on TP/PP/CP peers,
different across data-parallel replicas, and the same after a restart.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pdmd.core import objectives as obj
from pdmd.core.backend import Backend
from pdmd.core.conditioning import Conditioning, masked_mean
from pdmd.core.schedule import PhasePlan, renoise, x0_from_velocity


def make_generator(seed: int, phase: int, step: int, purpose: str, dp_rank: int) -> torch.Generator:
    """A CPU generator whose state depends only on its arguments."""
    digest = hashlib.sha256(f"{seed}/{phase}/{step}/{purpose}/{dp_rank}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


@dataclass
class Rollout:
    x_in: torch.Tensor  # input of the step that carries the gradient
    t_in: float  # its time
    x_gen: torch.Tensor  # the phase's output at s = t_k
    step: int  # which step carried the gradient


class PhaseTrainer:
    """Phase k's updates. ``method`` is the config section (sgts, dmd_form, cfg_scale, fake_loss, ...)."""

    def __init__(self, backend: Backend, plan: PhasePlan, k: int, method, latent_shape, seed: int) -> None:
        self.backend, self.plan, self.k, self.method = backend, plan, k, method
        self.latent_shape, self.seed = tuple(latent_shape), seed
        self.s = plan.phase_end(k)
        self.last_t = torch.empty(0)  # re-noise times of the latest generator step

    def _gen(self, step: int, purpose: str) -> torch.Generator:
        return make_generator(self.seed, self.k, step, purpose, self.backend.dp_rank)

    def _randn(self, batch: int, gen: torch.Generator, cond: Conditioning | None) -> torch.Tensor:
        """Noise of the batch's latent shape (an image-conditioned batch brings its bucket's size);
        with TI2V conditioning its first frame is the image latent."""
        shape = cond.latent_shape(self.latent_shape[0]) if cond is not None else self.latent_shape
        x = torch.randn(batch, *shape, generator=gen).to(self.backend.device)
        return _clamp(x, cond)

    def _walk(self, x: torch.Tensor, text: torch.Tensor, last: int,
              cond: Conditioning | None) -> tuple[torch.Tensor, float, torch.Tensor]:
        """Euler steps 0..last-1 from x (earlier phases' frozen experts, then the student), and the
        velocity at step ``last``: returns (its input, its time, the velocity)."""
        times = list(self.plan.timesteps) + [0.0]
        for i in range(last + 1):
            phase = self.plan.phase_of_step(i)
            role = "student" if phase == self.k else f"expert:{phase}"
            v = self.backend.velocity(role, x, torch.full((x.shape[0],), times[i], device=x.device), text, cond)
            if i == last:
                return x, times[i], v
            x = _clamp(x + (times[i + 1] - times[i]) * v, cond)
        raise AssertionError("unreachable: the walk always reaches step `last`")

    @torch.no_grad()
    def rollout(self, text: torch.Tensor, gen: torch.Generator, cond: Conditioning | None = None) -> Rollout:
        """Backward simulation from pure noise: earlier experts, then the student up to the step that
        carries the gradient (SGTS: uniform over the phase's steps; else its last), then its jump to s."""
        x = self._randn(text.shape[0], gen, cond)
        steps = list(self.plan.steps_in_phase(self.k))
        steps = [i for i in steps if i + 1 >= self.method.sgts_min_step] or steps[-1:]
        j = steps[int(torch.randint(len(steps), (1,), generator=gen))] if self.method.sgts else steps[-1]
        x_in, t_in, v = self._walk(x, text, j, cond)
        return Rollout(x_in=x_in, t_in=t_in, x_gen=_clamp(x_in + (self.s - t_in) * v, cond), step=j)

    @torch.no_grad()
    def preview(self, text: torch.Tensor, seed: int, cond: Conditioning | None = None) -> torch.Tensor:
        """The generator's clean estimate by the end of phase k from fixed noise: x - t v at the phase's
        last step (for the last phase, exactly the few-step sample). What the logged previews show."""
        x = self._randn(text.shape[0], torch.Generator().manual_seed(seed), cond)
        x_in, t_in, v = self._walk(x, text, list(self.plan.steps_in_phase(self.k))[-1], cond)
        return _clamp(x_in - t_in * v, cond)

    def _renoise(self, x_s: torch.Tensor, gen: torch.Generator, cond: Conditioning | None):
        """x_t from x_s with the conditional kernel; a TI2V first frame stays the clean image latent."""
        b = x_s.shape[0]
        eps = torch.randn(x_s.shape, generator=gen).to(x_s.device)
        t = self.plan.draw_renoise_t(self.k, b, generator=gen).to(x_s.device)
        return eps, t, _clamp(renoise(x_s, eps, self.s, t), cond)

    def generator_step(self, step: int, text: torch.Tensor, negative: torch.Tensor,
                       cond: Conditioning | None = None) -> dict[str, float]:
        clock = [time.perf_counter()]

        def lap() -> float:
            clock.append(time.perf_counter())
            return clock[-1] - clock[-2]

        gen = self._gen(step, "generator")
        r = self.rollout(text, gen, cond)
        eps, t, x_t = self._renoise(r.x_gen, gen, cond)
        timing = {"time_rollout_s": lap()}
        v_real = self.backend.velocity("teacher", x_t, t, text, cond)
        if self.method.cfg_scale != 1.0:  # the image stays in the unconditional pass, as the pipelines do
            v_uncond = self.backend.velocity("teacher", x_t, t, negative, cond)
            v_real = obj.cfg_velocity(v_real, v_uncond, self.method.cfg_scale)
        timing["time_teacher_s"] = lap()
        v_fake = self.backend.velocity("fake", x_t, t, text, cond)
        timing["time_fake_s"] = lap()
        if self.method.dmd_form == "velocity":
            dmd = obj.dmd_velocity_loss(r.x_gen, v_real, v_fake, self.s, t)
            # The time weight w_{t|s} plays the normaliser's part in the velocity form.
            normaliser = obj.dmd_weight(self.s, t).float()
        else:
            x0_real = x0_from_velocity(x_t, v_real, t)
            dmd = obj.dmd_x0_loss(r.x_gen, x0_real, x0_from_velocity(x_t, v_fake, t))
            normaliser = (r.x_gen - x0_real).abs().flatten(1).mean(1).float()  # before its clamp at norm_min
        self.last_t = t.detach().cpu()  # for the t histogram
        metrics = {"dmd_grad_norm": dmd.grad.float().norm().item(), "dmd_normaliser": normaliser.mean().item(),
                   "t_mean": t.mean().item(), "t_min": t.min().item(), "t_max": t.max().item(),
                   "sgts_step": float(r.step), **timing}
        # A non-finite target is not skipped here: one data-parallel rank may see it while the others do not,
        # and the update is collective; its loss is non-finite, so the backend skips it on every rank.
        metrics["target_finite"] = float(torch.isfinite(dmd.target).all())
        x_in, jump = r.x_in, self.s - r.t_in
        weight = cond.loss_weight(x_in) if cond is not None else None
        # Only the generated part moves: a TI2V first frame is given, so its target is itself.
        target = dmd.target if weight is None else r.x_gen - dmd.grad * weight

        def loss_fn(v: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
            w = None if weight is None else weight[idx]
            return 0.5 * masked_mean((x_in[idx] + jump * v - target[idx]) ** 2, w)

        t_in = torch.full((x_in.shape[0],), r.t_in, device=x_in.device)
        out = self.backend.train_step("student", x_in, t_in, text, loss_fn, cond)
        return {**metrics, "generator_loss": out["loss"], "student_grad_norm": out["grad_norm"],
                "skipped": out.get("skipped", 0.0), "time_student_update_s": lap()}

    def fake_step(self, step: int, index: int, text: torch.Tensor, cond: Conditioning | None = None) -> dict[str, float]:
        """Fake update ``index`` of generator step ``step``: a rollout (shared by ``method.fake_rollout_reuse``
        consecutive updates of the step, each re-noising it afresh), re-noised into the phase's interval."""
        reuse = getattr(self.method, "fake_rollout_reuse", 1)
        first = index - index % reuse
        gen = self._gen(step, f"fake{index}")
        if index == first:  # reuse 1: every update draws its own rollout, then re-noises from the same stream
            x_s = self.rollout(text, gen, cond).x_gen
            self._shared_rollout = (step, first, x_s)
        else:
            cached_step, cached_first, x_s = self._shared_rollout
            if (cached_step, cached_first) != (step, first):
                raise RuntimeError(f"fake update {index} of step {step} has no rollout of update {first} to reuse")
        eps, t, x_t = self._renoise(x_s, gen, cond)
        experts = self.backend.expert_of(t)
        losses, norms, skipped = [], [], 0.0
        for e in experts.unique().tolist():
            idx = (experts == e).nonzero().flatten()
            xs_e, eps_e, t_e = x_s[idx], eps[idx], t[idx]
            cond_e = None if cond is None else cond.index(idx)
            out = self.backend.train_step(f"fake{e}", x_t[idx], t_e, text[idx],
                                          self._fake_loss(xs_e, eps_e, t_e, cond_e), cond_e)
            losses.append(out["loss"] * len(idx))
            norms.append(out["grad_norm"])
            skipped = max(skipped, out.get("skipped", 0.0))
        return {"fake_loss": sum(losses) / x_s.shape[0], "fake_grad_norm": max(norms), "skipped": skipped}

    def _fake_loss(self, x_s, eps, t, cond: Conditioning | None):
        kind, s, max_weight = self.method.fake_loss, self.s, self.method.fake_max_weight
        weight = None if cond is None else cond.loss_weight(x_s)

        def loss_fn(v: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
            xs, e, tt = x_s[idx], eps[idx], t[idx]
            if weight is not None:  # TI2V: the given first frame is not scored
                target = (obj.naive_velocity_target(xs, e, s, tt) if kind == "naive"
                          else obj.subinterval_velocity_target(xs, e, s, tt))
                w_t = obj.subinterval_loss_weight(s, tt, max_weight) if kind == "subinterval" else torch.ones_like(tt)
                err = (v.float() - target.float()) ** 2 * weight[idx]
                per_sample = err.flatten(1).sum(1) / weight[idx].flatten(1).sum(1).clamp(min=1)
                return (w_t.to(per_sample.dtype) * per_sample).mean()
            if kind == "naive":
                return F.mse_loss(v, obj.naive_velocity_target(xs, e, s, tt).to(v.dtype))
            return obj.subinterval_fake_loss(v, xs, e, s, tt, max_weight=max_weight if kind == "subinterval" else None)

        return loss_fn


def _clamp(x: torch.Tensor, cond: Conditioning | None) -> torch.Tensor:
    return x if cond is None else cond.clamp(x)
