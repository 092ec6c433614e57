"""The diversity benchmark on exact ground truth: Phased DMD vs DMD2+SGTS on a known Gaussian mixture.

The product path end to end, on a task whose distribution is known exactly (pdmd/bench/mixture.py): prompts
go through the real shard writer (tiny UMT5); a two-expert Wan2.2-style teacher network is trained on it
with our Megatron Wan model (megatron_adapters/flow_teacher.py) and must pass a gate (pdmd/bench/teacher_gate.py)
before anything is distilled from it; the real trainer distils with Phased DMD (K phases) and with
DMD2+SGTS (one expert, same number of generator updates, same seeds), the real score being either that
network (``teacher="trained"``) or the closed-form mixture velocity (``teacher="exact"``,
pdmd/bench/exact_teacher.py: a perfect teacher, so what the student gets wrong is the distillation's doing);
the real exporter writes diffusers folders; the students are scored against the mixture beside three
reference rows: exact samples, the teacher's converged ODE (the reference the students are judged
against) and the teacher at the students' step count. `pdmd demo` runs it with fixed settings and
`pdmd bench toy` with the task's parameters exposed. Everything is cached in the output folder.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import multiprocessing
import os
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from data.encoders import load_prompt_encoder
from data.prompts import PromptList, demo_prompts_path, read_prompts
from data.tiny_encoders import UMT5_DIM, save_tiny_encoder
from data.writer import write_prompt_shards
from pdmd.bench.exact_teacher import ExactTeacher
from pdmd.bench.mixture import METRICS, MixtureTask, evaluate, save_task
from pdmd.bench.plots import plot_metric_bars, plot_projection, save_loss_curves
from pdmd.bench.teacher_gate import format_gate, judge, velocity_error_by_t
from pdmd.bench.tiny_models import write_tiny_wan22_teacher
from pdmd.core.config import load_config
from pdmd.core.distributed import free_port
from pdmd.core.sampler import euler_sample
from pdmd.core.schedule import PhasePlan, few_step_timesteps
from pdmd.export.convert import export
from pdmd.export.layout import EXPORT_INFO, ExportOptions
from pdmd.export.pipelines import ExportedExperts, pad_embeds
from pdmd.train import train

# The teacher network (and so every student and fake) of `pdmd bench toy`: m512 (16 heads x 32, ffn 2048, 2
# layers). Regression on the exact velocity passes the gate on both measured task seeds (m256 failed task seed
# 1's), and a 2-step student is sharper than at m256 (docs/benchmarks.md, issue 17); ~21 min of fitting on one core.
BENCH_WAN = {"num_attention_heads": 16, "attention_head_dim": 32, "ffn_dim": 2048, "num_layers": 2}
BOUNDARY = 0.875  # Wan2.2 T2V's expert boundary
MAX_LENGTH = 32
REFERENCE_SHIFT = 1.0  # the converged reference: many uniform steps (shift 5 leaves a big last step)
# `pdmd demo`'s students: the bench's schedule and re-noise draw, with half its updates at twice the lr (the same
# lr x updates, so they move as far): the bench's 600 do not fit the demo's 5 minutes. On the demo's task 300 x 6e-5
# gives TV 0.058 / spread 0.95 / precision 0.90 against 600 x 3e-5's 0.050 / 0.93 / 0.92; 200 x 9e-5 drifts to
# TV 0.095 (docs/benchmarks.md, issue 17, "The demo on the new student settings").
DEMO_STUDENTS = {"distill_steps": 300, "student_lr": 6e-5}
MAX_THREADS = 4  # the bench's matrices are small: more threads mostly add synchronisation (2 measured)
TEACHERS = ("trained", "exact")
TEACHER_FITS = ("exact", "flow")


class TeacherGateFailed(RuntimeError):
    """The teacher network is not worth distilling (pdmd/bench/teacher_gate.py)."""


@dataclass
class BenchSettings:
    """Everything that defines a benchmark run; the same for every method compared."""

    prompts: int = 8
    modes: int = 4
    groups: int = 1  # > 1: far-apart mode groups, decided at high noise (the task where phase 1 matters)
    latent_shape: tuple[int, ...] = (4, 1, 4, 4)  # D = 64, 4 tokens
    task_seed: int = 0
    seeds: tuple[int, ...] = (0,)  # distillation seeds (each method runs once per seed)
    num_steps: int = 4
    phases: int = 2
    # The students' schedule, re-noise draw and budget (docs/benchmarks.md, issue 17, "Sharp and wide enough"):
    # at shift 1 a 4-step student puts ~90% of its samples inside a mode (shift 5: ~80%) but starts too narrow;
    # it widens to the truth's width with re-noise times drawn towards small t (renoise_shift 0.5: there the
    # within-mode width shows) and enough updates: lr x updates bounds how far it moves, while the lr alone sets
    # how far mode shares drift (TV), so many slow steps (600 x 3e-5; 400 x 5e-5 drifts more, 200 x 1e-4 more
    # still and ends narrower).
    shift: float = 1.0
    renoise_shift: float = 0.5
    distill_steps: int = 600  # generator updates per method (Phased DMD: split evenly over its phases)
    fake_ratio: int = 5  # the paper's; 2 leaves the fake behind (docs/benchmarks.md, issue 17)
    batch: int = 8
    student_lr: float = 3e-5
    student_lr_decay: str = "linear"  # the recipes' choice: the student ends where its updates average out
    fake_lr: float = 1e-4
    teacher: str = "trained"  # the real score: the teacher network (trained) or the closed form (exact)
    teacher_fit: str = "exact"  # how the network learns: regression on the exact velocity, or flow matching
    teacher_shared_steps: int = 1000
    teacher_expert_steps: int = 300
    teacher_batch: int = 128
    reference_steps: int = 200  # the converged reference sampler (uniform steps)
    samples: int = 256  # per prompt and method
    ablations: bool = False  # also the ablation rows (SGTS from step 2, last step only, naive fake, ...)
    enforce_gate: bool = True  # stop before distilling from a trained teacher that fails the gate
    overrides: tuple[str, ...] = ()  # extra trainer overrides for every distillation (experiments)
    workers: int = 2  # distillations run at once, each in its own process on one core (1: one after the other)
    wan: dict[str, int] = field(default_factory=lambda: dict(BENCH_WAN))

    @classmethod
    def demo(cls) -> BenchSettings:
        """`pdmd demo`: 4 prompts, so that the smaller m128 network (8x16x512) passes the teacher gate within
        the demo's budget (on 8 prompts it needs m256 and ~7 min of teacher fitting on 2 cores; the bench's m512 ~21).
        Its students take half the bench's updates at twice the lr (DEMO_STUDENTS): the bench's 600 do not fit
        in the demo's 5 minutes."""
        return cls(prompts=4, wan={**BENCH_WAN, "num_attention_heads": 8, "attention_head_dim": 16, "ffn_dim": 512},
                   **DEMO_STUDENTS)

    @classmethod
    def fast(cls) -> BenchSettings:
        """CI smoke size (~1 min on 2 cores): every stage runs with the old small network (4x16x128); the
        numbers are rough and the teacher gate is reported but not enforced."""
        return cls(prompts=2, teacher_shared_steps=250, teacher_expert_steps=80, teacher_batch=64, distill_steps=16,
                   fake_ratio=1, samples=64, reference_steps=50, enforce_gate=False,
                   wan={**BENCH_WAN, "num_attention_heads": 4, "attention_head_dim": 16, "ffn_dim": 128})

    def check(self) -> None:
        """Settings that cannot work fail here, before anything is built."""

        available = len(read_prompts(demo_prompts_path()))
        if not 1 <= self.prompts <= available:
            raise ValueError(f"prompts={self.prompts}: choose 1..{available} (the shipped demo prompts)")
        if self.modes < 2:
            raise ValueError(f"modes={self.modes}: a mixture needs at least 2 modes")
        if not 1 <= self.groups <= self.modes:
            raise ValueError(f"groups={self.groups}: choose 1..modes ({self.modes})")
        c, f, h, w = self.latent_shape
        if min(self.latent_shape) < 1 or h % 2 or w % 2:
            raise ValueError(f"latent_shape={list(self.latent_shape)}: positive, with even H and W (patch 1x2x2)")
        if not 1 <= self.phases <= self.num_steps:
            raise ValueError(f"phases={self.phases} must lie in 1..steps ({self.num_steps})")
        if self.distill_steps < self.phases or self.samples < 2 or self.reference_steps < 1 or not self.seeds:
            raise ValueError("distill_steps >= phases, samples >= 2, reference_steps >= 1 and at least one seed, please")
        if self.workers < 1:
            raise ValueError(f"workers={self.workers}: at least 1 (distillations run at once)")
        if self.teacher not in TEACHERS:
            raise ValueError(f"teacher={self.teacher!r}: choose {' or '.join(TEACHERS)}")
        if self.teacher_fit not in TEACHER_FITS:
            raise ValueError(f"teacher_fit={self.teacher_fit!r}: choose {' or '.join(TEACHER_FITS)}")
        for m in methods(self):
            plan = {"num_steps": self.num_steps, "shift": self.shift, "renoise_shift": self.renoise_shift}
            for o in m.overrides:
                key, value = o.split("=", 1)
                if key.startswith("plan."):
                    plan[key[5:]] = json.loads(value)
            try:
                PhasePlan.from_config(plan)
            except ValueError as exc:
                raise ValueError(f"{m.name}: steps={self.num_steps}, phases={self.phases}: {exc}") from exc

    def task(self) -> MixtureTask:
        return MixtureTask.make(self.prompts, self.modes, self.latent_shape, self.task_seed, groups=self.groups)

    def teacher_key(self) -> str:
        """What the cached teacher network depends on."""
        keys = ("prompts", "modes", "groups", "latent_shape", "task_seed", "teacher_fit", "teacher_shared_steps",
                "teacher_expert_steps", "teacher_batch", "wan")
        raw = json.dumps({k: getattr(self, k) for k in keys}, sort_keys=True, default=list)
        return hashlib.sha256(raw.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Method:
    """One distilled row: ``key`` is its name in the JSON contract, ``name`` its run folder."""

    key: str
    name: str
    label: str
    overrides: tuple[str, ...]
    teacher: str  # the real score it is distilled from: trained | exact


def methods(s: BenchSettings) -> list[Method]:
    """The distilled rows; each runs ``s.distill_steps`` generator updates in all. Phase 1 of Phased DMD
    re-noises inside the high-noise expert's range when it ends below the boundary (the paper's Wan2.2
    recipe). Ablations (same budget): DMD2+SGTS never stopping at step 1 (pure noise to x0 in one jump),
    DMD through the last step only, the naive fake target, and Phased DMD from the trained teacher when
    the exact one is the headline."""
    n, k = s.num_steps, s.phases
    phased = (f"plan.num_phases={k}", f"train.steps={max(1, s.distill_steps // k)}")
    plan = PhasePlan.from_config({"num_steps": n, "shift": s.shift, "num_phases": k})
    if k > 1 and plan.phase_end(1) < BOUNDARY:
        phased += ("plan.renoise_clamp=[[" + f"{BOUNDARY},1.0]" + ",null" * (k - 1) + "]",)
    one = ("plan.num_phases=1", f"train.steps={s.distill_steps}")
    t = s.teacher

    def row(key: str, label: str, overrides: tuple[str, ...], teacher: str = t) -> Method:
        return Method(key, key + ("_exact" if teacher == "exact" else ""), label, overrides, teacher)

    rows = [row("phased_dmd", f"Phased DMD ({n} steps, {k} phases)", phased),
            row("dmd2_sgts", f"DMD2+SGTS ({n} steps, 1 expert)", one)]
    if s.ablations:
        rows += [row("dmd2_sgts_j2plus", f"DMD2+SGTS, stop step 2..{n}", one + ("method.sgts_min_step=2",)),
                 row("dmd_last_step", "DMD, last step only", one + ("method.sgts=false",)),
                 row("phased_dmd_naive", "Phased DMD, naive fake target", phased + ("method.fake_loss=naive",))]
        if t == "exact":
            rows.append(row("phased_dmd", "Phased DMD, trained teacher", phased, "trained"))
    return rows


def recipe(s: BenchSettings, teacher: Path, shards: Path, seed: int, exact: Path | None = None,
           progress: bool = False) -> dict[str, Any]:
    return {
        "seed": seed,
        "model": {"kind": "wan", "spec": "local", "dtype": "fp32",
                  "teacher": {"path": str(teacher), "subfolders": ["transformer", "transformer_2"], "boundary": BOUNDARY,
                              "exact": None if exact is None else str(exact)}},
        "plan": {"num_steps": s.num_steps, "shift": s.shift, "renoise_shift": s.renoise_shift, "num_phases": s.phases},
        # CFG 1: the ground truth is the conditional distribution itself.
        "method": {"sgts": True, "dmd_form": "velocity", "cfg_scale": 1.0, "fake_loss": "subinterval",
                   "fake_ratio": s.fake_ratio},
        "student": {"lr": s.student_lr, "lr_decay": s.student_lr_decay, "lora": None},
        "fake": {"lr": s.fake_lr, "lora": None},
        "train": {"steps": 1, "micro_batch_size": s.batch, "latent_shape": list(s.latent_shape),
                  "checkpoint_every": 10_000, "keep_last": 1, "log_every": 1},
        "data": {"shards": str(shards), "model": "wan", "max_length": MAX_LENGTH},
        "wandb": {"mode": "disabled"},
        "logging": {"progress": progress},
    }


# --- stages ------------------------------------------------------------------------------------------
def prepare_prompts(out: Path, s: BenchSettings) -> tuple[list[str], torch.Tensor, torch.Tensor, Path]:
    """The first ``s.prompts`` shipped demo prompts, as shards (the real writer) and as the padded
    embeddings the trainer's loader yields; also the negative (empty) prompt's."""

    encoder_dir = out / "encoder"
    if not (encoder_dir / "model_index.json").is_file():
        save_tiny_encoder("umt5", encoder_dir)
    encoder = load_prompt_encoder("umt5", encoder_dir, dtype="fp32", max_length=MAX_LENGTH)
    prompts = read_prompts(demo_prompts_path())
    if len(prompts) < s.prompts:
        raise ValueError(f"--prompts {s.prompts}: the shipped list has {len(prompts)} prompts")
    chosen = PromptList(prompts=prompts.prompts[: s.prompts], lines=prompts.lines[: s.prompts])
    texts = chosen.prompts
    shards = out / f"shards_p{s.prompts}"
    if not (shards / "index.json").is_file():
        write_prompt_shards(chosen, shards, encoder, samples_per_shard=8, progress=False)
    embeds = pad_embeds(encoder.encode(texts), MAX_LENGTH)
    negative = pad_embeds(encoder.encode([""]), MAX_LENGTH)[0]
    return texts, embeds, negative, shards


def prepare_teacher(out: Path, task: MixtureTask, embeds: torch.Tensor, s: BenchSettings,
                    report: Callable[[str, int, float], None]) -> tuple[Path, dict[str, list[float]]]:
    """Train (or reuse) the two-expert teacher network on the mixture; returns its folder and loss curves.
    ``teacher_fit="exact"`` regresses on the closed-form velocity (the flow-matching loss minus its
    irreducible noise: same minimiser, far less variance), ``"flow"`` is plain flow matching."""
    import shutil

    from megatron_adapters.flow_teacher import (  # lazy: Megatron loads in seconds; --help stays fast
        FlowTeacherConfig,
        train_flow_teacher,
    )

    folder = out / f"teacher_g{s.groups}_s{s.task_seed}"
    done = folder / "flow_matching.json"
    if done.is_file():
        cached = json.loads(done.read_text())
        if cached.get("key") == s.teacher_key():
            return folder, cached["curves"]
    if folder.exists():  # trained for other settings (or interrupted): train afresh
        shutil.rmtree(folder)
    write_tiny_wan22_teacher(folder, seed=s.task_seed, boundary=BOUNDARY, text_dim=UMT5_DIM, **s.wan)

    def data(batch: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        idx = torch.randint(task.num_prompts, (batch,), generator=gen)
        return task.sample(idx, gen)[0], embeds[idx], idx

    def exact(x_t: torch.Tensor, t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return task.velocity(x_t, t, idx).float()

    cfg = FlowTeacherConfig(shared_steps=s.teacher_shared_steps, expert_steps=s.teacher_expert_steps,
                            batch_size=s.teacher_batch, seed=s.task_seed)
    curves = train_flow_teacher(folder, data, cfg, boundary=BOUNDARY, report=report,
                                exact=exact if s.teacher_fit == "exact" else None)
    done.write_text(json.dumps({"key": s.teacher_key(), "curves": curves, "settings": dataclasses.asdict(s)},
                               default=list))
    return folder, curves


def distill(out: Path, m: Method, s: BenchSettings, teacher: Path, shards: Path, seed: int, exact: Path,
            progress: bool = False) -> Path:
    """One method through `pdmd train` (resumes or skips a finished run) and the real exporter."""


    cfg = load_config(recipe(s, teacher, shards, seed, exact if m.teacher == "exact" else None, progress),
                      [*m.overrides, *s.overrides])
    name = run_name(m, seed, cfg.hash())  # other settings never meet this run's cache
    run_dir = out / "runs" / name
    code = train(cfg, str(run_dir))
    if code:
        raise RuntimeError(f"{m.name} (seed {seed}): pdmd train exited {code}; see {run_dir}")
    exported = out / "exports" / name
    if not (exported / EXPORT_INFO).is_file():
        export(ExportOptions(run=run_dir, out=exported))
    return run_dir


def distill_all(out: Path, jobs: list[tuple[Method, int]], s: BenchSettings, teacher: Path, shards: Path, exact: Path,
                progress: bool = False, done: Callable[[Method, int], None] = lambda m, seed: None) -> list[Path]:
    """Every (method, seed) of ``jobs`` through :func:`distill`, run dirs in the order given. With
    ``s.workers`` > 1 the runs go ``s.workers`` at a time, each in its own process (one torch thread, its own
    rendezvous port): runs are independent and deterministic, so the results are those of one after the
    other; the trainer's own progress bars are off then (they would interleave)."""
    def finished(run_dirs) -> list[Path]:  # in the order given, each reported as it is collected
        dirs = []
        for (m, seed), run_dir in zip(jobs, run_dirs):
            dirs.append(run_dir)
            done(m, seed)
        return dirs

    if s.workers == 1 or len(jobs) == 1:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # as in a worker: the same numbers whatever --workers says
        try:
            return finished(distill(out, m, s, teacher, shards, seed, exact, progress) for m, seed in jobs)
        finally:
            torch.set_num_threads(threads)
    context = multiprocessing.get_context("spawn")  # no fork of a process that may hold threads
    with ProcessPoolExecutor(max_workers=min(s.workers, len(jobs)), mp_context=context,
                             initializer=_worker_start) as pool:
        futures = [pool.submit(distill, out, m, s, teacher, shards, seed, exact) for m, seed in jobs]
        return finished(future.result() for future in futures)


def _worker_start() -> None:
    """A distillation worker: one thread, the libraries quiet, a rendezvous port of its own."""
    torch.set_num_threads(1)
    _quiet()
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(free_port())


def run_name(m: Method, seed: int, config_hash: str) -> str:
    return f"{m.name}_seed{seed}_{config_hash[:8]}"


# --- samplers ----------------------------------------------------------------------------------------
def teacher_velocity(teacher: Path):
    """Velocity of the diffusers teacher, routed per sample to the expert owning t (as WanPipeline does)."""
    from diffusers import WanTransformer3DModel

    experts = [WanTransformer3DModel.from_pretrained(teacher / sub).eval() for sub in ("transformer", "transformer_2")]

    @torch.no_grad()
    def velocity(_k: int, x: torch.Tensor, t: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(x)
        low = t < BOUNDARY
        for e, sel in ((0, ~low), (1, low)):
            if sel.any():
                out[sel] = experts[e](x[sel], t[sel] * 1000.0, text[sel], return_dict=False)[0].float()
        return out

    return velocity


def exact_velocity(path: Path):
    """The closed-form teacher behind the same call (the negative prompt's rows get the marginal)."""

    teacher = ExactTeacher.load(path)
    return lambda _k, x, t, text: teacher.velocity(x, t, text)


def draw(velocity, plan: PhasePlan, embeds: torch.Tensor, s: BenchSettings, seed: int,
         chunk: int = 256) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``s.samples`` samples per prompt with the Euler sampler the trainer and `pdmd sample` use;
    returns (samples, prompt index, seconds per sample)."""

    idx = torch.arange(embeds.shape[0]).repeat_interleave(s.samples)
    noise = torch.randn(len(idx), *s.latent_shape, generator=torch.Generator().manual_seed(10_000 + seed))
    tic = time.perf_counter()
    xs = [euler_sample(velocity, plan, noise[i:i + chunk], embeds[idx[i:i + chunk]]) for i in range(0, len(idx), chunk)]
    return torch.cat(xs), idx, (time.perf_counter() - tic) / len(idx)


def reference_plan(s: BenchSettings) -> PhasePlan:
    return PhasePlan(few_step_timesteps(s.reference_steps, REFERENCE_SHIFT), (1.0, 0.0))


def few_step_plan(s: BenchSettings) -> PhasePlan:
    return PhasePlan(few_step_timesteps(s.num_steps, s.shift), (1.0, 0.0))


# --- the benchmark -----------------------------------------------------------------------------------
def run_benchmark(out: str | Path, s: BenchSettings, progress: bool = True) -> dict[str, Any]:
    """Run every stage (cached), score every method, write results.json/results.md and the plots."""
    from tqdm import tqdm


    # The serial stages (teacher fit, sampling) take the cores the distillations share later: with 2 threads the
    # demo's teacher fit runs 1.13x and its gate 1.45x faster than with one (docs/benchmarks.md); OMP_NUM_THREADS=1
    # keeps one.
    torch.set_num_threads(min(torch.get_num_threads(), MAX_THREADS))
    s.check()
    _quiet()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    rows_to_run = methods(s)
    bar = tqdm(total=5 + len(rows_to_run) * len(s.seeds), desc="pdmd demo", unit="stage", disable=not progress)

    stage_seconds: dict[str, float] = {}
    last = [started]

    def stage(text: str) -> None:
        now = time.perf_counter()
        stage_seconds[text], last[0] = round(now - last[0], 1), now  # where the wall time goes
        bar.set_postfix_str(text)
        bar.update(1)

    task = s.task()
    save_task(task, out / "task.json")
    texts, embeds, negative, shards = prepare_prompts(out, s)
    exact_file = ExactTeacher(task, embeds, negative).save(out / f"exact_teacher_g{s.groups}_s{s.task_seed}.safetensors")
    stage("prompts written")
    teacher_bar = tqdm(total=s.teacher_shared_steps + 2 * s.teacher_expert_steps, desc="teacher network",
                       unit="step", leave=False, disable=not progress)
    teacher, curves = prepare_teacher(out, task, embeds, s, lambda name, i, loss: teacher_bar.update(1))
    teacher_bar.close()
    stage("teacher trained")

    # The gate: the network (the real score with teacher=trained; every student's and fake's start).
    network_v = teacher_velocity(teacher)
    # The teacher rows are sampled once (the first seed's noise): they do not depend on the distillation
    # seed, and 200 steps of the network over every sample is the benchmark's most expensive sampling.
    seed0 = s.seeds[0]
    gate_draw = draw(network_v, reference_plan(s), embeds, s, seed0)
    gate_rows = [_scored(gate_draw, task, seed0, s.reference_steps)]
    errors = velocity_error_by_t(lambda x, t, text: network_v(0, x, t, text), task, embeds)
    gate = judge(_mean_metrics(gate_rows), errors)
    stage("teacher gate")
    # Enforced where the network is the real score; with the exact teacher it only initialises students and
    # fakes, and the gate is reported.
    if not gate["passed"] and s.enforce_gate and s.teacher == "trained":
        bar.close()
        raise TeacherGateFailed(format_gate(gate) + "\n\nTrain the teacher longer or bigger (BenchSettings."
                                "teacher_shared_steps / teacher_expert_steps / wan), or run with the gate reported only.")

    rows: dict[str, dict[str, Any]] = {}
    samples: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    real_v = network_v if s.teacher == "trained" else exact_velocity(exact_file)
    who = "teacher network" if s.teacher == "trained" else "exact teacher"
    reference = f"{who}, {s.reference_steps} steps"
    for key, label, nfe, plan in (("exact", "exact samples", 0, None),
                                  ("teacher_ref", reference, s.reference_steps, reference_plan(s)),
                                  ("teacher_4", f"{who}, {s.num_steps} steps", s.num_steps, few_step_plan(s))):
        if plan is None:
            idx = torch.arange(task.num_prompts).repeat_interleave(s.samples)
            drawn = (task.sample(idx, torch.Generator().manual_seed(20_000 + seed0))[0], idx, 0.0)
        elif key == "teacher_ref" and s.teacher == "trained":
            drawn = gate_draw  # the very draws the gate scored
        else:
            drawn = draw(real_v, plan, embeds, s, seed0)
        per_seed = [_scored(drawn, task, seed0, nfe)]
        samples.setdefault(label, drawn[:2])
        rows[label] = {"method": key, "per_seed": per_seed}
    stage("references sampled")

    run_dirs: dict[str, list[Path]] = {}
    jobs = [(m, seed) for seed in s.seeds for m in rows_to_run]
    for (m, _), run_dir in zip(jobs, distill_all(out, jobs, s, teacher, shards, exact_file, progress,
                                                 done=lambda m, seed: stage(f"{m.name} seed {seed}"))):
        run_dirs.setdefault(m.name, []).append(run_dir)
    phase1 = None
    for m in rows_to_run:
        per_seed = []
        for seed, run_dir in zip(s.seeds, run_dirs[m.name]):
            experts = ExportedExperts(out / "exports" / run_dir.name)
            drawn = draw(experts.velocity, experts.plan, embeds, s, seed)
            per_seed.append(_scored(drawn, task, seed, s.num_steps))
            samples.setdefault(m.label, drawn[:2])
            if m.key == "phased_dmd" and m.teacher == s.teacher and seed == s.seeds[0] and s.phases > 1:
                phase1 = phase1_check(experts, real_v, embeds, task, s, seed)
        rows[m.label] = {"method": m.key, "teacher": m.teacher, "per_seed": per_seed}
    stage("students sampled")
    bar.close()

    ref_spread = _mean_metrics(rows[reference]["per_seed"])["spread_ratio"]
    result = {"settings": {**dataclasses.asdict(s), "teacher": s.teacher}, "prompts": texts,
              "task": task.to_dict(include_params=False), "reference": reference,
              "methods": {label: summarise(r["method"], r["per_seed"], ref_spread) for label, r in rows.items()},
              "per_seed": {label: r["per_seed"] for label, r in rows.items()},
              "teacher_gate": gate, "phase1_check": phase1, "teacher_curves": curves,
              "wall_seconds": time.perf_counter() - started, "stage_seconds": stage_seconds}
    write_outputs(out, task, result, samples, run_dirs)
    return result


def _scored(drawn: tuple[torch.Tensor, torch.Tensor, float], task: MixtureTask, seed: int, nfe: int) -> dict[str, Any]:
    x, idx, per = drawn
    return {"seed": seed, "nfe": nfe, "seconds_per_sample": per, **evaluate(task, x, idx)}


def _mean_metrics(per_seed: list[dict[str, Any]]) -> dict[str, float]:
    return {m: sum(r[m] for r in per_seed) / len(per_seed) for m in METRICS}


def phase1_check(experts, teacher_v, embeds: torch.Tensor, task: MixtureTask, s: BenchSettings,
                 seed: int) -> dict[str, Any]:
    """Does phase 1's expert matter? The same phase-2 expert after phase 1's expert (the student) and
    after the teacher's own Euler steps over phase 1's timesteps."""
    def swapped(k: int, x, t, text):
        return teacher_v(k, x, t, text) if k == 1 else experts.velocity(k, x, t, text)

    with_student = _scored(draw(experts.velocity, experts.plan, embeds, s, seed), task, seed, s.num_steps)
    with_teacher = _scored(draw(swapped, experts.plan, embeds, s, seed), task, seed, s.num_steps)
    keep = ("coverage", "tv", "spread_ratio", "precision")
    return {"phase1_expert": {k: with_student[k] for k in keep}, "teacher_steps": {k: with_teacher[k] for k in keep}}


def _quiet() -> None:
    """The libraries' own noise (Megatron's no-TE/Apex warnings, weight-loading bars) would bury the demo's output."""
    import warnings

    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    warnings.filterwarnings("ignore", category=UserWarning, module=r"megatron\..*")
    warnings.filterwarnings("ignore", category=FutureWarning)
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    diffusers_logging.set_verbosity_error()


def summarise(method: str, rows: list[dict[str, Any]], ref_spread: float) -> dict[str, Any]:
    """The JSON contract's entry of a row: mean over seeds of each metric, its spread over seeds
    (``_seed_std``), the mean spread over prompts (``_prompt_std``), and the spread ratio to the
    reference row (the teacher's converged samples) beside the one to the truth."""
    out: dict[str, Any] = {"method": method, "seeds": len(rows), "nfe": rows[0]["nfe"],
                           "seconds_per_sample": sum(r["seconds_per_sample"] for r in rows) / len(rows)}
    for m in METRICS:
        vals = torch.tensor([r[m] for r in rows], dtype=torch.float64)
        out[m] = float(vals.mean())
        out[f"{m}_seed_std"] = float(vals.std(unbiased=False)) if len(rows) > 1 else math.nan
        out[f"{m}_prompt_std"] = sum(r[f"{m}_std"] for r in rows) / len(rows)
    to_ref = torch.tensor([r["spread_ratio"] / ref_spread for r in rows], dtype=torch.float64)
    out["spread_ratio_to_ref"] = float(to_ref.mean())
    out["spread_ratio_to_ref_seed_std"] = float(to_ref.std(unbiased=False)) if len(rows) > 1 else math.nan
    out["nll_per_dim_true"] = rows[0]["nll_per_dim_true"]
    return out


COLUMNS = (("coverage", "mode coverage"), ("tv", "TV to true weights"), ("spread_ratio", "spread ratio"),
           ("spread_ratio_to_ref", "spread / reference"), ("pairwise_ratio", "pairwise-distance ratio"),
           ("precision", "precision"), ("nll_per_dim", "NLL/dim"))


def results_table(result: dict[str, Any]) -> str:
    """The markdown table: mean over seeds (± spread over seeds when there are several, else over prompts)."""
    head = "| method | NFE | " + " | ".join(title for _, title in COLUMNS) + " |"
    lines = [head, "|" + "---|" * (len(COLUMNS) + 2)]

    def cell(m: dict[str, Any], name: str) -> str:
        spread = m[f"{name}_seed_std"] if m["seeds"] > 1 else m.get(f"{name}_prompt_std", math.nan)
        return f"{m[name]:.3f}" + ("" if not math.isfinite(spread) else f" ± {spread:.3f}")

    for label, m in result["methods"].items():
        lines.append(f"| {label} | {m['nfe']} | " + " | ".join(cell(m, n) for n, _ in COLUMNS) + " |")
    s = result["settings"]
    spread = "seeds" if len(s["seeds"]) > 1 else "prompts"
    lines.append("")
    groups = "" if s["groups"] == 1 else f" in {s['groups']} groups"
    true_nll = next(iter(result["methods"].values()))["nll_per_dim_true"]
    lines.append(f"Real score: {s['teacher']} teacher. {len(s['seeds'])} distillation seed(s) {list(s['seeds'])}; ± = "
                 f"standard deviation over {spread}; {s['prompts']} prompts x {s['modes']} modes{groups}, latents "
                 f"{list(s['latent_shape'])}, {s['samples']} samples per prompt and method; reference row: "
                 f"{result['reference']}; true NLL/dim {true_nll:.3f}.")
    return "\n".join(lines)


def write_outputs(out: Path, task: MixtureTask, result: dict[str, Any],
                  samples: dict[str, tuple[torch.Tensor, torch.Tensor]], run_dirs: dict[str, list[Path]]) -> None:

    (out / "results.json").write_text(json.dumps(result, indent=1, default=float))
    curves = {}
    for name, dirs in run_dirs.items():
        rows = [json.loads(line) for line in (dirs[0] / "metrics.jsonl").read_text().splitlines()]
        for key in sorted({k for r in rows for k in r if k.endswith(("/generator_loss", "/fake_loss"))}):
            curves[f"{name} {key}"] = [r[key] for r in rows if r.get(key) is not None]
    plots = [save_loss_curves(curves, out / "loss_curves.png"), plot_metric_bars(result["methods"], out / "metrics.png")]
    for p in range(min(2, task.num_prompts)):
        plots.append(plot_projection(task, samples, p, out / f"samples_prompt{p}.png"))
    md = ["# pdmd demo: Phased DMD vs DMD2+SGTS on an exact Gaussian mixture", "",
          results_table(result), "", format_gate(result["teacher_gate"]), ""]
    if result["phase1_check"]:
        a, b = result["phase1_check"]["phase1_expert"], result["phase1_check"]["teacher_steps"]
        md += ["Phase 1's expert vs the teacher's own steps before the same phase-2 expert (seed "
               f"{result['settings']['seeds'][0]}): TV {a['tv']:.3f} vs {b['tv']:.3f}, coverage {a['coverage']:.3f} vs "
               f"{b['coverage']:.3f}, spread ratio {a['spread_ratio']:.3f} vs {b['spread_ratio']:.3f}.", ""]
    stages = ", ".join(f"{k} {v:.0f} s" for k, v in result.get("stage_seconds", {}).items())
    md += [task.describe(), "", f"Wall time: {result['wall_seconds']:.0f} s ({stages}). Plots: "
           + ", ".join(p.name for p in plots) + "."]
    (out / "results.md").write_text("\n".join(md) + "\n")


def run_and_report(out: Path, settings: BenchSettings, command: str, wandb_mode: str = "disabled"
                   ) -> dict[str, Any] | None:
    """Run the benchmark and print its report (and, with ``wandb_mode`` offline/online, log its table and
    figures to a W&B run); None (after saying why) when the teacher fails its gate."""
    try:
        result = run_benchmark(out, settings, progress=sys.stderr.isatty())
    except TeacherGateFailed as exc:
        print(f"{command}: the teacher is not worth distilling.\n{exc}", file=sys.stderr)
        return None
    report(result, out)
    if wandb_mode != "disabled":
        log_to_wandb(result, out, wandb_mode, command)
    return result


def log_to_wandb(result: dict[str, Any], out: Path, mode: str, command: str) -> None:
    """The results table (one row per method) and every figure of ``out`` as images, in one W&B run of the
    project ``phased-dmd-bench`` (files under out/wandb; ``wandb sync`` an offline one later)."""
    import os

    import wandb

    os.environ.setdefault("WANDB_SILENT", "true")
    run = wandb.init(mode=mode, project="phased-dmd-bench", name=command.replace("pdmd ", ""), dir=str(out),
                     config=result["settings"])
    columns = ["method", "nfe", "coverage", "tv", "spread_ratio", "spread_ratio_to_ref", "precision", "nll_per_dim"]
    table = wandb.Table(columns=["label", *columns])
    for label, m in result["methods"].items():
        table.add_data(label, *(m.get(c) for c in columns))
    figures = {f"figures/{p.stem}": wandb.Image(str(p), caption=p.stem) for p in sorted(out.glob("*.png"))}
    run.log({"results": table, **figures})
    run.summary.update({f"{label}/{c}": m.get(c) for label, m in result["methods"].items() for c in columns[2:]})
    run.finish()
    print(f"W&B ({mode}): results table and {len(figures)} figures logged under {out / 'wandb'}")


def report(result: dict[str, Any], out: Path) -> None:
    """What the console shows at the end."""

    print("\n" + results_table(result))
    print("\n" + format_gate(result["teacher_gate"]).split("\n")[0])
    print(f"\n{out / 'results.md'}, {out / 'results.json'}, plots {out / 'metrics.png'}, {out / 'loss_curves.png'} "
          f"and {out / 'samples_prompt0.png'}; exported pipelines under {out / 'exports'} "
          f"({result['wall_seconds']:.0f} s)")
