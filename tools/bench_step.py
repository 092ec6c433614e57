"""The ``step`` entry of tools/bench.py: one Phased DMD generator step and one fake step through the real
trainer (``PhaseTrainer`` over ``MegatronBackend``) on the tiny recipe, the time split into rollout,
teacher, fake, student forward / backward / gradient finalisation / optimizer, and the overhead: step
time / time inside model passes (forwards of every role + backwards), target <= 1.10.

Why here and not in the trainer: the split needs hooks on every resident model and wrappers around the
backend's calls; the trainer itself only reports its own four laps (``time_*_s``), which this entry uses
as the rollout / teacher / fake / student-update totals it checks its split against.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--phase", type=int, choices=[1, 2], default=2,
                   help="phase to time (2: its rollout runs phase 1's expert first)")
    p.add_argument("--reps", type=int, default=5, help="timed generator + fake steps (after one warm-up)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override of configs/tiny_wan22.yaml, e.g. --set train.latent_shape=[4,4,16,16]")


class _Clock:
    """Seconds spent in model forwards, gradient finalisation, optimizer steps and each backend call,
    accumulated per label (the caller reads differences around a step)."""

    def __init__(self, backend, device: torch.device) -> None:
        self.device = device
        self.s: dict[str, float] = defaultdict(float)
        self.n: dict[str, int] = defaultdict(int)
        self._start: list[float] = []
        self._hooked: set[int] = set()
        self._wrap_backend(backend)

    def now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def hook(self, models) -> None:
        """Time every forward of these models (the outermost module only)."""
        for m in models:
            if id(m) in self._hooked:
                continue
            self._hooked.add(id(m))
            m.register_forward_pre_hook(lambda *_: self._start.append(self.now()))
            m.register_forward_hook(lambda *_: self._add("forward", self.now() - self._start.pop()))

    def _add(self, key: str, seconds: float) -> None:
        self.s[key] += seconds
        self.n[key] += 1

    def timed(self, key: str, fn: Callable) -> Callable:
        def wrapper(*args, **kwargs):
            start = self.now()
            try:
                return fn(*args, **kwargs)
            finally:
                self._add(key, self.now() - start)
        return wrapper

    def _wrap_backend(self, backend) -> None:
        import megatron_adapters.backend as mb

        mb.finalize_model_grads = self.timed("finalize", mb.finalize_model_grads)
        velocity, train_step = backend.velocity, backend.train_step

        def timed_velocity(role, *args, **kwargs):
            label = "rollout" if role == "student" or role.startswith("expert") else role
            return self.timed(f"velocity:{label}", velocity)(role, *args, **kwargs)

        def timed_train(role, *args, **kwargs):
            tr = backend.trainables[role]
            if not getattr(tr.optimizer, "_bench_timed", False):
                tr.optimizer.step = self.timed("optimizer", tr.optimizer.step)
                tr.optimizer._bench_timed = True
            return self.timed("train", train_step)(role, *args, **kwargs)

        backend.velocity, backend.train_step = timed_velocity, timed_train

    def snapshot(self) -> dict[str, float]:
        return dict(self.s), dict(self.n)


def _delta(before, after) -> tuple[dict[str, float], dict[str, int]]:
    (s0, n0), (s1, n1) = before, after
    return ({k: v - s0.get(k, 0.0) for k, v in s1.items()}, {k: v - n0.get(k, 0) for k, v in n1.items()})


def _split(kind: str, total: float, sec: dict[str, float], calls: dict[str, int], fwd: dict[str, float]) -> list:
    """(part, calls, seconds) of one step; fwd[label] is the forward time inside each velocity label."""
    rows = []
    if kind == "generator":
        for label, name in (("rollout", "rollout (no grad)"), ("teacher", "teacher (cond + uncond)"),
                            ("fake", "fake score (no grad)")):
            rows.append((name, calls.get(f"velocity:{label}", 0), sec.get(f"velocity:{label}", 0.0)))
        who = "student"
    else:
        rows.append(("rollout (no grad)", calls.get("velocity:rollout", 0), sec.get("velocity:rollout", 0.0)))
        who = "fake"
    train_fwd = fwd["train"]
    backward = sec.get("train", 0.0) - train_fwd - sec.get("finalize", 0.0) - sec.get("optimizer", 0.0)
    rows += [(f"{who} forward", calls.get("train", 0), train_fwd),
             (f"{who} backward (+ loss, schedule)", calls.get("train", 0), backward),
             ("finalize grads", calls.get("finalize", 0), sec.get("finalize", 0.0)),
             ("optimizer", calls.get("optimizer", 0), sec.get("optimizer", 0.0))]
    rows.append(("method (re-noise, DMD target, ...)", 0, total - sum(r[2] for r in rows)))
    return rows


def bench_step(args: argparse.Namespace, ctx) -> dict[str, Any]:
    """Build the tiny run, warm up, then time ``args.reps`` generator and fake steps of ``args.phase``."""
    from megatron_adapters.backend import MegatronBackend
    from pdmd.bench.tiny_models import write_tiny_wan22_teacher
    from pdmd.core.config import load_config
    from pdmd.core.method import PhaseTrainer
    from pdmd.train import student_experts

    tmp = tempfile.TemporaryDirectory(prefix="pdmd-bench-step-")
    root = Path(tmp.name)
    teacher = write_tiny_wan22_teacher(root / "teacher")
    cfg = load_config(ROOT / "configs" / "tiny_wan22.yaml",
                      [f"model.teacher.path={teacher}", "data.shards=unused", "wandb.mode=disabled", *args.set])
    backend = MegatronBackend(cfg, ctx)
    plan = cfg.phase_plan()
    experts = student_experts(cfg, backend)
    earlier = {}
    if args.phase == 2:
        backend.setup_phase(1, experts[0], {}, plan.renoise_interval(1))
        backend.save_expert(root / "expert1")
        earlier = {1: (experts[0], str(root / "expert1"))}
    backend.setup_phase(args.phase, experts[args.phase - 1], earlier, plan.renoise_interval(args.phase))
    trainer = PhaseTrainer(backend, plan, args.phase, cfg.method, cfg.train.latent_shape, cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed)
    b, width = cfg.train.micro_batch_size * cfg.train.num_micro_batches, backend.configs[0].text_dim
    text = torch.randn(b, cfg.data.get("max_length", 32), width, generator=g).to(backend.device)
    negative = torch.randn(1, cfg.data.get("max_length", 32), width, generator=g).to(backend.device).expand_as(text)

    clock = _Clock(backend, backend.device)
    models = [*backend.teachers.values(), *backend.experts.values(), *(tr.model for tr in backend.trainables.values())]
    clock.hook(models)
    per_kind: dict[str, list[tuple[float, list, float]]] = {"generator": [], "fake": []}
    laps: list[dict[str, float]] = []
    for rep in range(args.reps + 1):  # the first is the warm-up
        for kind in ("fake", "generator"):
            before, start = clock.snapshot(), clock.now()
            fwd: dict[str, float] = defaultdict(float)
            # forward time inside each call label: differences of the forward counter around every call
            inner = _forward_attribution(clock, fwd)
            out = (trainer.fake_step(rep, 0, text) if kind == "fake" else trainer.generator_step(rep, text, negative))
            inner()
            total = clock.now() - start
            sec, calls = _delta(before, clock.snapshot())
            if rep == 0:
                continue
            backward = sec.get("train", 0.0) - fwd["train"] - sec.get("finalize", 0.0) - sec.get("optimizer", 0.0)
            per_kind[kind].append((total, _split(kind, total, sec, calls, fwd), sum(fwd.values()) + backward))
            if kind == "generator":
                laps.append({k: v for k, v in out.items() if k.startswith("time_")})
    tmp.cleanup()

    rows, notes, overheads = [], [], {}
    for kind, runs in per_kind.items():
        totals = [t for t, _, _ in runs]
        step = statistics.median(totals)
        parts = list(zip(*[[r[2] for r in split] for _, split, _ in runs]))
        names = [(name, n) for name, n, _ in runs[0][1]]
        overhead = statistics.median([t / m for t, _, m in runs])
        overheads[kind] = overhead
        for (name, n), values in zip(names, parts):
            ms = statistics.median(values) * 1e3
            rows.append([f"{kind} step", name, str(n), f"{ms:.1f}", f"{ms / (step * 1e3):.0%}"])
        rows.append([f"{kind} step", "**total**", "", f"{step * 1e3:.1f}", "100%"])
        rows.append([f"{kind} step", "overhead = step / model passes (forwards + backwards)", "",
                     f"{overhead:.3f}x", ""])
    lap = {k: statistics.median(d[k] for d in laps) * 1e3 for k in laps[0]} if laps else {}
    tokens = backend.tokens
    notes.append(f"config: configs/tiny_wan22.yaml{' + ' + ' '.join(args.set) if args.set else ''}: 2 layers, "
                 f"hidden {backend.configs[0].hidden_size}, micro-batch {b}, {tokens} tokens + {text.shape[1]} text tokens, "
                 f"{cfg.model.dtype} on {backend.device.type}; phase {args.phase} (rollout steps "
                 f"{list(plan.steps_in_phase(args.phase))}, SGTS {cfg.method.sgts}, CFG {cfg.method.cfg_scale:g}, "
                 f"LoRA student {cfg.student.lora is not None})")
    notes.append(f"timing: 1 warm-up + {args.reps} timed fake and generator steps, alternating; medians in ms "
                 "(calls: the first timed repetition's; SGTS varies the rollout); "
                 "model passes = every role's forward (hooks on the resident models) + backwards (a training "
                 "call minus its forward, gradient finalisation and optimizer step)")
    if lap:
        notes.append("the trainer's own laps (ms, median): " + ", ".join(f"{k[5:-2]} {v:.1f}" for k, v in lap.items()))
    notes.append("overhead target <= 1.10: " + ", ".join(f"{k} {v:.3f}x" for k, v in overheads.items()))
    return {"title": "one Phased DMD generator step and one fake step (tiny recipe, real trainer and backend)",
            "headers": ["step", "part", "calls", "ms median", "share"], "rows": rows, "notes": notes,
            "device": backend.device, "ok": True, "overheads": overheads}


def _forward_attribution(clock: _Clock, fwd: dict[str, float]) -> Callable[[], None]:
    """While one step runs, add each forward's time to ``fwd`` under the backend call it happened in
    (``train``, ``velocity:rollout``, ...); the returned function undoes the wrapping."""
    current: list[str] = []
    original_add, original_timed = clock._add, clock.timed

    def add(key: str, seconds: float) -> None:
        if key == "forward":
            fwd[current[-1] if current else "other"] += seconds
        original_add(key, seconds)

    def timed(key: str, fn: Callable) -> Callable:
        def labelled(*args, **kwargs):
            current.append(key)
            try:
                return fn(*args, **kwargs)
            finally:
                current.pop()
        return original_timed(key, labelled)

    clock._add, clock.timed = add, timed  # type: ignore[method-assign]

    def restore() -> None:
        clock._add, clock.timed = original_add, original_timed  # type: ignore[method-assign]

    return restore
