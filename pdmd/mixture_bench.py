"""The diversity benchmark on exact ground truth: Phased DMD vs DMD2+SGTS on a known Gaussian mixture.

The product path end to end, on a task whose distribution is known exactly (pdmd/mixture.py): prompts
go through the real shard writer (tiny UMT5); a two-expert Wan2.2-style teacher is trained by flow
matching with our Megatron Wan model (megatron_adapters/flow_teacher.py); the real trainer distils it
with Phased DMD (K phases) and with DMD2+SGTS (one expert, same number of generator updates, same
seeds); the real exporter writes diffusers folders; samples of the teacher (many steps and few) and of
both exports are scored against the mixture. `pdmd demo` runs it with fixed settings and `pdmd bench toy`
with the task's parameters exposed. Everything is cached in the output folder (teacher, shards, runs).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pdmd.mixture import METRICS, MixtureTask, evaluate, plot_projection, save_task
from pdmd.schedule import PhasePlan, few_step_timesteps

DEMO_WAN = {"num_attention_heads": 4, "attention_head_dim": 16, "ffn_dim": 128, "num_layers": 2}
BOUNDARY = 0.875  # Wan2.2 T2V's expert boundary
MAX_LENGTH = 32


@dataclass
class BenchSettings:
    """Everything that defines a benchmark run; the same for every method compared."""

    prompts: int = 8
    modes: int = 4
    latent_shape: tuple[int, ...] = (4, 1, 4, 4)  # D = 64, 4 tokens: a teacher learns it in ~1-2 min
    task_seed: int = 0
    seeds: tuple[int, ...] = (0,)  # distillation seeds (each method runs once per seed)
    num_steps: int = 4
    phases: int = 2
    shift: float = 5.0
    distill_steps: int = 200  # generator updates per method (Phased DMD: split evenly over its phases)
    fake_ratio: int = 2
    batch: int = 8
    student_lr: float = 1e-4
    fake_lr: float = 1e-4
    teacher_shared_steps: int = 1000
    teacher_expert_steps: int = 300
    teacher_batch: int = 128
    teacher_steps: int = 40  # the reference sampler
    samples: int = 256  # per prompt and method
    wan: dict[str, int] = field(default_factory=lambda: dict(DEMO_WAN))

    @classmethod
    def fast(cls) -> BenchSettings:
        """CI smoke size (~40 s on 2 cores): every stage runs; the students' numbers are rough, the
        teacher still covers its modes."""
        return cls(prompts=2, teacher_shared_steps=250, teacher_expert_steps=80, teacher_batch=64, distill_steps=16,
                   fake_ratio=1, samples=64)

    def check(self) -> None:
        """Settings that cannot work fail here, before anything is built."""
        from data.prompts import demo_prompts_path, read_prompts

        available = len(read_prompts(demo_prompts_path()))
        if not 1 <= self.prompts <= available:
            raise ValueError(f"prompts={self.prompts}: choose 1..{available} (the shipped demo prompts)")
        if self.modes < 2:
            raise ValueError(f"modes={self.modes}: a mixture needs at least 2 modes")
        c, f, h, w = self.latent_shape
        if min(self.latent_shape) < 1 or h % 2 or w % 2:
            raise ValueError(f"latent_shape={list(self.latent_shape)}: positive, with even H and W (patch 1x2x2)")
        if not 1 <= self.phases <= self.num_steps:
            raise ValueError(f"phases={self.phases} must lie in 1..steps ({self.num_steps})")
        if self.distill_steps < self.phases or self.samples < 2 or self.teacher_steps < 1 or not self.seeds:
            raise ValueError("distill_steps >= phases, samples >= 2, teacher_steps >= 1 and at least one seed, please")
        for name, overrides in methods(self).items():
            plan = {"num_steps": self.num_steps, "shift": self.shift}
            for o in overrides:
                key, value = o.split("=", 1)
                if key.startswith("plan."):
                    plan[key[5:]] = json.loads(value)
            try:
                PhasePlan.from_config(plan)
            except ValueError as exc:
                raise ValueError(f"{name}: steps={self.num_steps}, phases={self.phases}: {exc}") from exc

    def teacher_key(self) -> str:
        """What the cached teacher depends on."""
        keys = ("prompts", "modes", "latent_shape", "task_seed", "teacher_shared_steps", "teacher_expert_steps",
                "teacher_batch", "wan")
        raw = json.dumps({k: getattr(self, k) for k in keys}, sort_keys=True, default=list)
        return hashlib.sha256(raw.encode()).hexdigest()[:16]


def methods(s: BenchSettings) -> dict[str, list[str]]:
    """Trainer overrides per method; both run ``s.distill_steps`` generator updates in all. Phase 1 of
    Phased DMD re-noises inside the high-noise expert's range when it ends below the boundary (as the
    paper's Wan2.2 recipe does)."""
    phased = [f"plan.num_phases={s.phases}", f"train.steps={max(1, s.distill_steps // s.phases)}"]
    plan = PhasePlan.from_config({"num_steps": s.num_steps, "shift": s.shift, "num_phases": s.phases})
    if s.phases > 1 and plan.phase_end(1) < BOUNDARY:
        phased.append("plan.renoise_clamp=[[" + f"{BOUNDARY},1.0]" + ",null" * (s.phases - 1) + "]")
    return {
        "phased_dmd": phased,
        "dmd2_sgts": ["plan.num_phases=1", f"train.steps={s.distill_steps}"],
    }


def recipe(s: BenchSettings, teacher: Path, shards: Path, seed: int, progress: bool = False) -> dict[str, Any]:
    return {
        "seed": seed,
        "model": {"kind": "wan", "spec": "local", "dtype": "fp32",
                  "teacher": {"path": str(teacher), "subfolders": ["transformer", "transformer_2"], "boundary": BOUNDARY}},
        "plan": {"num_steps": s.num_steps, "shift": s.shift, "num_phases": s.phases},
        # CFG 1: the ground truth is the conditional distribution itself.
        "method": {"sgts": True, "dmd_form": "velocity", "cfg_scale": 1.0, "fake_loss": "subinterval",
                   "fake_ratio": s.fake_ratio},
        "student": {"lr": s.student_lr, "lora": None},
        "fake": {"lr": s.fake_lr, "lora": None},
        "train": {"steps": 1, "micro_batch_size": s.batch, "latent_shape": list(s.latent_shape),
                  "checkpoint_every": 10_000, "keep_last": 1, "log_every": 1},
        "data": {"shards": str(shards), "model": "wan", "max_length": MAX_LENGTH},
        "wandb": {"mode": "disabled"},
        "logging": {"progress": progress},
    }


# --- stages ------------------------------------------------------------------------------------------
def prepare_prompts(out: Path, s: BenchSettings) -> tuple[list[str], torch.Tensor, Path]:
    """The first ``s.prompts`` shipped demo prompts, as shards (the real writer) and as the padded
    embeddings the trainer's loader yields."""
    from data.encoders import load_prompt_encoder
    from data.prompts import PromptList, demo_prompts_path, read_prompts
    from data.tiny_encoders import save_tiny_encoder
    from data.writer import write_prompt_shards
    from pdmd.sample import pad_embeds

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
    return texts, embeds, shards


def prepare_teacher(out: Path, task: MixtureTask, embeds: torch.Tensor, s: BenchSettings,
                    report: Callable[[str, int, float], None]) -> tuple[Path, dict[str, list[float]]]:
    """Train (or reuse) the two-expert teacher on the mixture; returns its folder and loss curves."""
    import shutil

    from data.tiny_encoders import UMT5_DIM
    from megatron_adapters.flow_teacher import FlowTeacherConfig, train_flow_teacher
    from pdmd.tiny_models import write_tiny_wan22_teacher

    folder = out / "teacher"
    done = folder / "flow_matching.json"
    if done.is_file():
        cached = json.loads(done.read_text())
        if cached.get("key") == s.teacher_key():
            return folder, cached["curves"]
    if folder.exists():  # trained for other settings (or interrupted): train afresh
        shutil.rmtree(folder)
    write_tiny_wan22_teacher(folder, seed=s.task_seed, boundary=BOUNDARY, text_dim=UMT5_DIM, **s.wan)

    def data(batch: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.randint(task.num_prompts, (batch,), generator=gen)
        return task.sample(idx, gen)[0], embeds[idx], idx

    cfg = FlowTeacherConfig(shared_steps=s.teacher_shared_steps, expert_steps=s.teacher_expert_steps,
                            batch_size=s.teacher_batch, seed=s.task_seed)
    curves = train_flow_teacher(folder, data, cfg, boundary=BOUNDARY, report=report)
    done.write_text(json.dumps({"key": s.teacher_key(), "curves": curves, "settings": dataclasses.asdict(s)},
                               default=list))
    return folder, curves


def distill(out: Path, name: str, overrides: list[str], s: BenchSettings, teacher: Path, shards: Path,
            seed: int, progress: bool = False) -> Path:
    """One method through `pdmd train` (resumes or skips a finished run) and the real exporter."""
    import argparse

    from pdmd.config import load_config
    from pdmd.export import export
    from pdmd.export_layout import EXPORT_INFO
    from pdmd.train import train

    run_dir = out / "runs" / f"{name}_seed{seed}"
    cfg = load_config(recipe(s, teacher, shards, seed, progress), overrides)
    code = train(cfg, str(run_dir))
    if code:
        raise RuntimeError(f"{name} (seed {seed}): pdmd train exited {code}; see {run_dir}")
    exported = out / "exports" / f"{name}_seed{seed}"
    if not (exported / EXPORT_INFO).is_file():
        export(argparse.Namespace(run=str(run_dir), out=str(exported), base_pipeline=None, lora_only=False,
                                  dtype=None, teacher=None, tp=1, pp=1, verify=False, seed=0, no_hash_check=False))
    return run_dir


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


def draw(velocity, plan: PhasePlan, embeds: torch.Tensor, s: BenchSettings, seed: int,
         chunk: int = 256) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``s.samples`` samples per prompt with the Euler sampler the trainer and `pdmd sample` use;
    returns (samples, prompt index, seconds per sample)."""
    from pdmd.sample import euler_sample

    idx = torch.arange(embeds.shape[0]).repeat_interleave(s.samples)
    noise = torch.randn(len(idx), *s.latent_shape, generator=torch.Generator().manual_seed(10_000 + seed))
    tic = time.perf_counter()
    xs = [euler_sample(velocity, plan, noise[i:i + chunk], embeds[idx[i:i + chunk]]) for i in range(0, len(idx), chunk)]
    return torch.cat(xs), idx, (time.perf_counter() - tic) / len(idx)


# --- the benchmark -----------------------------------------------------------------------------------
def run_benchmark(out: str | Path, s: BenchSettings, progress: bool = True) -> dict[str, Any]:
    """Run every stage (cached), score every method, write results.json/results.md and the plots."""
    from tqdm import tqdm

    from pdmd.sample import ExportedExperts

    torch.set_num_threads(1)
    s.check()
    _quiet()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    bar = tqdm(total=4 + 2 * len(s.seeds), desc="pdmd demo", unit="stage", disable=not progress)

    def stage(text: str) -> None:
        bar.set_postfix_str(text)
        bar.update(1)

    task = MixtureTask.make(s.prompts, s.modes, s.latent_shape, s.task_seed)
    save_task(task, out / "task.json")
    texts, embeds, shards = prepare_prompts(out, s)
    stage("prompts written")
    teacher_bar = tqdm(total=s.teacher_shared_steps + 2 * s.teacher_expert_steps, desc="teacher (flow matching)",
                       unit="step", leave=False, disable=not progress)
    teacher, curves = prepare_teacher(out, task, embeds, s, lambda name, i, loss: teacher_bar.update(1))
    teacher_bar.close()
    stage("teacher trained")

    rows: dict[str, list[dict[str, Any]]] = {}
    samples: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    teacher_v = teacher_velocity(teacher)
    for label, n in ((f"teacher {s.teacher_steps} steps", s.teacher_steps), (f"teacher {s.num_steps} steps", s.num_steps)):
        plan = PhasePlan(few_step_timesteps(n, s.shift), (1.0, 0.0))
        rows[label], samples[label] = [], None
        for seed in s.seeds:
            x, idx, per = draw(teacher_v, plan, embeds, s, seed)
            rows[label].append({"seed": seed, "nfe": n, "seconds_per_sample": per, **evaluate(task, x, idx)})
            samples[label] = samples[label] or (x, idx)
    stage("teacher sampled")

    run_dirs: dict[str, list[Path]] = {}
    for seed in s.seeds:
        for name, overrides in methods(s).items():
            run_dirs.setdefault(name, []).append(distill(out, name, overrides, s, teacher, shards, seed, progress))
            stage(f"{name} seed {seed}")
    labels = {"dmd2_sgts": f"DMD2+SGTS ({s.num_steps} steps, 1 expert)",
              "phased_dmd": f"Phased DMD ({s.num_steps} steps, {s.phases} phases)"}
    for name, dirs in run_dirs.items():
        rows[labels[name]] = []
        for seed in s.seeds[: len(dirs)]:
            experts = ExportedExperts(out / "exports" / f"{name}_seed{seed}")
            x, idx, per = draw(experts.velocity, experts.plan, embeds, s, seed)
            rows[labels[name]].append({"seed": seed, "nfe": s.num_steps, "seconds_per_sample": per,
                                       **evaluate(task, x, idx)})
            samples.setdefault(labels[name], (x, idx))
    stage("students sampled")
    bar.close()

    result = {"settings": dataclasses.asdict(s), "prompts": texts, "task": task.to_dict(include_params=False),
              "methods": {label: summarise(r) for label, r in rows.items()},
              "per_seed": rows, "teacher_curves": curves, "wall_seconds": time.perf_counter() - started}
    write_outputs(out, task, result, samples, run_dirs)
    return result


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


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean over seeds of each metric, its spread over seeds, and the mean spread over prompts."""
    out: dict[str, Any] = {"seeds": len(rows), "nfe": rows[0]["nfe"],
                           "seconds_per_sample": sum(r["seconds_per_sample"] for r in rows) / len(rows)}
    for m in METRICS:
        vals = torch.tensor([r[m] for r in rows], dtype=torch.float64)
        out[m] = float(vals.mean())
        out[f"{m}_seed_std"] = float(vals.std(unbiased=False)) if len(rows) > 1 else math.nan
        out[f"{m}_prompt_std"] = sum(r[f"{m}_std"] for r in rows) / len(rows)
    out["nll_per_dim_true"] = rows[0]["nll_per_dim_true"]
    return out


def results_table(result: dict[str, Any]) -> str:
    """The markdown table: mean over seeds (± spread over prompts; over seeds when there are several)."""
    head = ("| method | NFE | mode coverage | TV to true weights | spread ratio | pairwise-distance ratio | "
            "precision | NLL/dim | ms/sample |")
    lines = [head, "|" + "---|" * 9]
    def cell(m: dict[str, Any], name: str) -> str:
        spread = m[f"{name}_seed_std"] if m["seeds"] > 1 else m[f"{name}_prompt_std"]
        return f"{m[name]:.3f} ± {spread:.3f}"

    for label, m in result["methods"].items():
        lines.append(f"| {label} | {m['nfe']} | " + " | ".join(cell(m, n) for n in METRICS) +
                     f" | {1000 * m['seconds_per_sample']:.2f} |")
    s = result["settings"]
    spread = "seeds" if len(s["seeds"]) > 1 else "prompts"
    lines.append("")
    lines.append(f"{len(s['seeds'])} distillation seed(s) {list(s['seeds'])}; ± = standard deviation over {spread}; "
                 f"{s['prompts']} prompts x {s['modes']} modes, latents {list(s['latent_shape'])}, {s['samples']} "
                 f"samples per prompt and method; true NLL/dim {next(iter(result['methods'].values()))['nll_per_dim_true']:.3f}.")
    return "\n".join(lines)


def write_outputs(out: Path, task: MixtureTask, result: dict[str, Any],
                  samples: dict[str, tuple[torch.Tensor, torch.Tensor]], run_dirs: dict[str, list[Path]]) -> None:
    from pdmd.plots import save_loss_curves

    (out / "results.json").write_text(json.dumps(result, indent=1, default=float))
    curves = {}
    for name, dirs in run_dirs.items():
        rows = [json.loads(line) for line in (dirs[0] / "metrics.jsonl").read_text().splitlines()]
        for key in sorted({k for r in rows for k in r if k.endswith(("/generator_loss", "/fake_loss"))}):
            curves[f"{name} {key}"] = [r[key] for r in rows if r.get(key) is not None]
    plots = [save_loss_curves(curves, out / "loss_curves.png")]
    for p in range(min(2, task.num_prompts)):
        plots.append(plot_projection(task, samples, p, out / f"samples_prompt{p}.png"))
    md = ["# pdmd demo: Phased DMD vs DMD2+SGTS on an exact Gaussian mixture", "",
          results_table(result), "", task.describe(), "",
          f"Wall time: {result['wall_seconds']:.0f} s. Plots: " + ", ".join(p.name for p in plots) + "."]
    (out / "results.md").write_text("\n".join(md) + "\n")


def report(result: dict[str, Any], out: Path) -> None:
    """What the console shows at the end."""
    print("\n" + results_table(result))
    print(f"\n{out / 'results.md'}, {out / 'results.json'}, plots {out / 'loss_curves.png'} and "
          f"{out / 'samples_prompt0.png'}; exported pipelines under {out / 'exports'} "
          f"({result['wall_seconds']:.0f} s)")
