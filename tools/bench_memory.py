"""The ``memory`` entry of tools/bench.py: memory of phase 1 and phase 2 of a tiny Wan2.2-MoE run with only
the roles docs/architecture.md makes resident (the sequential schedule) against every role resident at once (the
LightX2V arrangement, ``method.schedule=interleaved``), with a LoRA student and with a full one.

What is counted, per arrangement, after one fake step and one generator step (so that the optimizer
states exist): the bytes of every distinct tensor the resident roles hold -- weights (a LoRA student's
backbone is the teacher's: counted once), Megatron's DDP gradient buffers, the distributed optimizer's
fp32 main weights and Adam moments -- plus the largest sum of activations saved for a backward during
the steps (``torch.autograd.graph.saved_tensors_hooks``). On CUDA the allocator's peak is reported too.
These are the parts that scale to a 14B run; pdmd plan (docs/plan.md) models the same parts analytically.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override of configs/tiny_wan22.yaml, e.g. --set train.latent_shape=[4,4,16,16]")


class _SavedPeak:
    """Largest total of bytes saved for backward at any moment (tensors released when unpacked)."""

    def __init__(self) -> None:
        self.now = self.peak = 0

    def __enter__(self):
        def pack(t: torch.Tensor):
            self.now += t.numel() * t.element_size()
            self.peak = max(self.peak, self.now)
            return t

        def unpack(t: torch.Tensor):
            return t

        self._ctx = torch.autograd.graph.saved_tensors_hooks(pack, unpack)
        self._ctx.__enter__()
        return self

    def step_done(self) -> None:
        self.now = 0  # every graph of the step has been run backward (or dropped) by now

    def __exit__(self, *exc) -> None:
        self._ctx.__exit__(*exc)


def static_bytes(backend) -> dict[str, int]:
    """Weights, gradient buffers and optimizer states of every resident role, each storage once."""
    seen: set[int] = set()

    def add(t: torch.Tensor | None) -> int:
        if t is None or not isinstance(t, torch.Tensor) or t.numel() == 0:
            return 0
        key = t.untyped_storage().data_ptr()
        if key in seen:
            return 0
        seen.add(key)
        return t.untyped_storage().nbytes()

    trainables = [tr for r in backend.regions.values() for tr in r["trainables"].values()]
    modules = [*backend.teachers.values(), *backend.frozen.values(), *(tr.model for tr in trainables)]
    out = {"weights": sum(add(p) for m in modules for p in m.parameters())}
    out["grads"] = sum(add(getattr(buf, "grad_data", None)) for tr in trainables for buf in tr.ddp.buffers)
    opt = 0
    for tr in trainables:
        for o in getattr(tr.optimizer, "chained_optimizers", [tr.optimizer]):
            for group in o.optimizer.param_groups:
                opt += sum(add(p) for p in group["params"])  # fp32 main shards (bf16 models)
            opt += sum(add(v) for state in o.optimizer.state.values() for v in state.values())
    out["optimizer"] = opt
    return out


def measure(cfg, ctx, root: Path, schedule: str) -> list[dict[str, Any]]:
    """Per phase (sequential) or once for all phases (interleaved): static bytes and saved-activation peak."""
    from megatron_adapters.backend import MegatronBackend
    from pdmd.core.method import PhaseTrainer
    from pdmd.train import student_experts

    backend = MegatronBackend(cfg, ctx)
    plan = cfg.phase_plan()
    experts = student_experts(cfg, backend)
    g = torch.Generator().manual_seed(cfg.seed)
    b, width = cfg.train.micro_batch_size * cfg.train.num_micro_batches, backend.configs[0].text_dim
    text = torch.randn(b, cfg.data.get("max_length", 32), width, generator=g).to(backend.device)
    negative = torch.randn(1, cfg.data.get("max_length", 32), width, generator=g).to(backend.device).expand_as(text)

    def steps(phases: list[int]) -> int:
        peak = 0
        with _SavedPeak() as saved:
            for k in phases:
                backend.activate(k)
                trainer = PhaseTrainer(backend, plan, k, cfg.method, cfg.train.latent_shape, cfg.seed)
                trainer.fake_step(0, 0, text)
                saved.step_done()
                trainer.generator_step(0, text, negative)
                saved.step_done()
            peak = saved.peak
        return peak

    rows = []
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    if schedule == "interleaved":
        backend.setup_interleaved({k: (experts[k - 1], plan.renoise_interval(k)) for k in plan.phases})
        saved = steps(list(plan.phases))
        rows.append({"phase": "all", **static_bytes(backend), "saved": saved, **_cuda_peak()})
        return rows
    earlier: dict[int, tuple[int, str]] = {}
    for k in plan.phases:
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        backend.setup_phase(k, experts[k - 1], earlier, plan.renoise_interval(k))
        saved = steps([k])
        rows.append({"phase": str(k), **static_bytes(backend), "saved": saved, **_cuda_peak()})
        backend.save_expert(root / f"expert{k}")
        earlier[k] = (experts[k - 1], str(root / f"expert{k}"))
    return rows


def _cuda_peak() -> dict[str, float]:
    return {"cuda_peak": torch.cuda.max_memory_allocated()} if torch.cuda.is_available() else {}


def bench_memory(args: argparse.Namespace, ctx) -> dict[str, Any]:
    from pdmd.bench.tiny_models import write_tiny_wan22_teacher
    from pdmd.core.config import load_config

    tmp = tempfile.TemporaryDirectory(prefix="pdmd-bench-memory-")
    root = Path(tmp.name)
    teacher = write_tiny_wan22_teacher(root / "teacher")
    base = [f"model.teacher.path={teacher}", "data.shards=unused", "wandb.mode=disabled", *args.set]
    rows, totals = [], {}
    for student, extra in (("LoRA r4", []), ("full", ["student.lora=null"])):
        for schedule in ("sequential", "interleaved"):
            cfg = load_config(ROOT / "configs" / "tiny_wan22.yaml", [*base, *extra, f"method.schedule={schedule}"])
            for r in measure(cfg, ctx, root / f"{student}-{schedule}".replace(" ", ""), schedule):
                total = r["weights"] + r["grads"] + r["optimizer"] + r["saved"]
                totals[(student, schedule, r["phase"])] = total
                rows.append([student, "resident roles only" if schedule == "sequential" else "all roles (LightX2V)",
                             r["phase"], *(f"{r[key] / 2**20:.3f}" for key in ("weights", "grads", "optimizer", "saved")),
                             f"{total / 2**20:.3f}",
                             f"{r['cuda_peak'] / 2**20:.1f}" if "cuda_peak" in r else "-"])
    notes = []
    for student in ("LoRA r4", "full"):
        allr = totals[(student, "interleaved", "all")]
        for k in ("1", "2"):
            notes.append(f"{student}: phase {k} resident-only / all roles = {totals[(student, 'sequential', k)] / allr:.2f}")
    tmp.cleanup()
    return {"title": "memory: resident roles per phase vs all roles resident (tiny Wan2.2-MoE, fp32)",
            "headers": ["student", "arrangement", "phase", "weights MiB", "grads MiB", "optimizer MiB",
                        "saved activations MiB", "total MiB", "CUDA peak MiB"],
            "rows": rows, "notes": notes}
