"""What an export of a run looks like, decided without Megatron: which run is finished, which diffusers
scheduler reproduces the distilled timesteps, which ``boundary_ratio`` sends each step to its phase's
expert, and the folder layout (docs/export.md).

The scheduler. WanPipeline calls ``scheduler.set_timesteps(N)`` with no custom sigmas, so the schedule
must come out of the scheduler's config. ``FlowMatchEulerDiscreteScheduler`` steps exactly like our
sampler (x += (sigma_next - sigma) v, model fed 1000 sigma, last step to 0) but shifts twice: its
linspace ends at shift(1/1000) and the result is shifted again. Both shifts and its ``shift_terminal``
stretch are Moebius maps fixing 1, and so is our schedule shift_S(1 - i/N): choosing its shift x (a root
of a quadratic) and shift_terminal = our last timestep makes the composition equal shift_S exactly.
:func:`check_scheduler` proves it on the scheduler diffusers itself builds.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pdmd.core.content import teacher_content
from pdmd.core.errors import ExportError
from pdmd.core.schedule import NUM_TRAIN_TIMESTEPS, PhasePlan, few_step_timesteps
from pdmd.run.rundir import RunDir, tree_hash

EXPORT_INFO = "pdmd_export.json"
SCHEDULER_CLASS = "FlowMatchEulerDiscreteScheduler"
SCHEDULE_TOL = 1e-6  # float32 sigmas of the scheduler vs our float64 timesteps
# copied from the base pipeline when it has them (image_* only in Wan I2V pipelines)
COMPONENTS = ("text_encoder", "tokenizer", "vae", "image_encoder", "image_processor")
PIPELINE_CLASSES = ("WanPipeline", "WanImageToVideoPipeline")
CONDITIONING_KINDS = ("i2v", "ti2v")  # pdmd/core/conditioning.py's KINDS (kept import-free here)
LORA_FORMATS = ("diffusers", "comfyui")  # --lora-format: diffusers' names, ComfyUI's (the original checkpoint's)
MASK_CHANNELS = 4  # I2V's mask channels: the 4 pixel frames a latent frame stands for (every Wan VAE)


# --- the run -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ExportOptions:
    """What to export and how: tools/convert_to_diffusers.py's options (``from_args``), or set in code."""

    run: Path
    out: Path
    base_pipeline: Path | None = None  # where text_encoder/, tokenizer/, vae/ come from (default: the teacher's)
    lora_only: bool = False
    dtype: str | None = None  # fp32 / bf16; None: the run's model.dtype
    teacher: Path | None = None  # the run's teacher folder, if it moved since training
    tp: int = 1
    pp: int = 1
    verify: bool = False
    seed: int = 0  # --verify's noise and prompt-embedding seed
    hash_check: bool = True
    overwrite: bool = False  # replace an --out that is not an export of this run
    lora_formats: tuple[str, ...] = LORA_FORMATS  # --lora-only: the files written per phase

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ExportOptions:
        path = lambda v: None if v is None else Path(v)  # noqa: E731
        return cls(run=Path(args.run), out=Path(args.out), base_pipeline=path(args.base_pipeline),
                   lora_only=args.lora_only, dtype=args.dtype, teacher=path(args.teacher), tp=args.tp, pp=args.pp,
                   verify=args.verify, seed=args.seed, hash_check=not args.no_hash_check,
                   overwrite=args.overwrite, lora_formats=tuple(args.lora_format))


@dataclass(frozen=True)
class PhaseInfo:
    index: int
    student_expert: int  # the teacher expert (0 = subfolders[0], high noise) the student started from
    expert_dir: Path  # the final (LoRA-merged) student, a Megatron distributed checkpoint
    last_step_dir: Path | None  # the phase's newest step checkpoint (holds the LoRA adapters)
    steps: int
    # Where its student lives in that checkpoint: "" (sequential) or "region{k}." (interleaved: one
    # checkpoint holds every phase's roles, written at iteration steps * phases)
    checkpoint_prefix: str = ""
    checkpoint_step: int | None = None  # the step that checkpoint must be (None: ``steps``)


@dataclass(frozen=True)
class RunInfo:
    path: Path
    config: dict[str, Any]
    plan: PhasePlan
    phases: tuple[PhaseInfo, ...]
    teacher: Path
    subfolders: tuple[str, ...]

    @property
    def lora(self) -> dict[str, Any] | None:
        """The student's LoRA section (rank, alpha, targets) or None for a full-parameter student."""
        return self.config.get("student", {}).get("lora")

    @property
    def ema(self) -> float:
        """``student.ema``: > 0 when the phases' experts (and adapters) are the students' moving averages."""
        return float(self.config.get("student", {}).get("ema") or 0.0)

    @property
    def teacher_boundary(self) -> float | None:
        return self.config["model"]["teacher"].get("boundary")

    @property
    def conditioning(self) -> str | None:
        """``data.conditioning`` of the run: ``i2v`` / ``ti2v``, or None for a text-only run."""
        return conditioning_kind((self.config.get("data") or {}).get("conditioning"))

    def expert_folder(self, e: int) -> Path:
        """The teacher's diffusers transformer folder of expert ``e`` (its config.json is the architecture)."""
        return self.teacher / self.subfolders[e]


def read_run(run_dir: str | Path, teacher: str | Path | None = None, check_hashes: bool = True,
             kinds: tuple[str, ...] = ("wan",)) -> RunInfo:
    """A finished run directory, checked: every phase done, its expert present and unchanged; its
    ``model.kind`` one of ``kinds`` (the export takes Qwen-Image runs too: pdmd/export/qwen_image.py)."""
    run = RunDir(run_dir)
    if not run.path.is_dir():
        raise ExportError(f"--run {run.path}: no such directory")
    if not run.exists():
        raise ExportError(f"--run {run.path} has no manifest.json: not a run directory (pdmd train --run-dir makes one)")
    try:
        run.check_trusted()
    except ValueError as exc:
        raise ExportError(str(exc)) from None
    manifest = run.read()
    config = manifest["config"]
    kind = config.get("model", {}).get("kind", "wan")
    if kind not in kinds:
        raise ExportError(f"model.kind={kind!r}: this command takes {' / '.join(kinds)} runs (a Qwen-Image run exports "
                          "with tools/convert_to_diffusers.py to a QwenImagePipeline folder, docs/export.md)")
    plan = PhasePlan.from_config(manifest["plan"])
    phases = []
    for entry in manifest["phases"]:
        k = entry["index"]
        if entry["status"] != "done":
            steps = config.get("train", {}).get("steps", "?")
            raise ExportError(
                f"phase {k} of {run.path} is {entry['status']} (step {entry['step']} of {steps}): only finished runs "
                f"export; finish it by rerunning the same `pdmd train ... --run-dir {run.path}` command")
        expert = run.path / (entry.get("expert") or f"checkpoints/phase{k}/expert")
        if not (expert / "metadata.json").is_file():
            raise ExportError(f"phase {k} is done but its expert checkpoint {expert} is missing or incomplete "
                              "(no metadata.json): restore it, or rerun the phase")
        if check_hashes and entry.get("expert_hash") and tree_hash(expert, desc=f"checking phase {k}'s expert") != entry["expert_hash"]:
            raise ExportError(f"the expert checkpoint of phase {k} at {expert} changed since training wrote it "
                              "(hash mismatch with manifest.json): restore it or rerun that phase")
        ckpts = entry.get("checkpoints") or []
        interleaved = (config.get("method") or {}).get("schedule") == "interleaved"
        if interleaved:  # the owner (phase 1) holds the one checkpoint of every region
            ckpts = manifest["phases"][0].get("checkpoints") or []
        phases.append(PhaseInfo(k, int(entry["student_expert"]), expert, run.path / ckpts[0] if ckpts else None,
                                int(entry["step"]), checkpoint_prefix=f"region{k}." if interleaved else "",
                                checkpoint_step=int(entry["step"]) * len(manifest["phases"]) if interleaved else None))
    return RunInfo(run.path, config, plan, tuple(phases),
                   _teacher_path(config, run.path, teacher, (manifest.get("content") or {}).get("model.teacher.path")),
                   tuple(config["model"]["teacher"]["subfolders"]))


def conditioning_kind(value: str | None) -> str | None:
    """A recorded conditioning (``i2v`` / ``ti2v``; None, ``none`` or empty for text only), checked."""
    if value in (None, "", "none"):
        return None
    if value not in CONDITIONING_KINDS:
        raise ExportError(f"conditioning {value!r} is not one of {CONDITIONING_KINDS} (or none)")
    return value


def check_conditioning(kind: str | None, config: dict[str, Any], what: str) -> None:
    """The transformer config must read what the conditioning feeds it: I2V cat([x, mask, image latents])
    (in = 2 out + 4), TI2V and text only x itself (in = out); no CLIP image embeddings (Wan2.1 I2V)."""
    c_in = int(config["in_channels"])
    c_out = int(config.get("out_channels") or c_in)
    if config.get("image_dim") is not None:
        raise ExportError(f"{what}: the transformer takes CLIP image embeddings (image_dim {config['image_dim']}, "
                          "Wan2.1 I2V): not supported; Wan2.2 I2V-A14B and TI2V-5B have none")
    want = 2 * c_out + MASK_CHANNELS if kind == "i2v" else c_out
    if c_in != want:
        has = "text only" if kind is None else kind
        raise ExportError(f"{what}: the transformer reads {c_in} channels and writes {c_out}, which does not fit "
                          f"{has} conditioning (that needs in_channels {want}); the run's data.conditioning "
                          "(i2v: Wan2.2 I2V-A14B, ti2v: TI2V-5B) must match its teacher")


def _teacher_path(config: dict[str, Any], run_path: Path, override: str | Path | None,
                  recorded_content: str | None = None) -> Path:
    """The teacher folder: --teacher (if it holds the same teacher the run recorded: configs and weight
    headers, pdmd/core/content.py), else the run's model.teacher.path."""
    recorded = config["model"]["teacher"]["path"]
    path = Path(override) if override is not None else Path(recorded)
    subs = config["model"]["teacher"]["subfolders"]
    missing = [s for s in subs if not (path / s / "config.json").is_file()]
    if missing:
        where = "--teacher" if override is not None else f"the run's model.teacher.path={recorded!r}"
        raise ExportError(
            f"{where}: no {missing[0]}/config.json under {path}. The teacher's transformer configs define the "
            f"experts' architecture: pass --teacher DIR, the diffusers folder {run_path} was distilled from")
    if override is not None and recorded_content and teacher_content(path, subs) != recorded_content:
        raise ExportError(f"--teacher {path} is not the teacher {run_path} was distilled from (its transformer "
                          f"configs or weights differ from what the run recorded at {recorded}): pass that "
                          "teacher's folder")
    return path


# --- the scheduler -------------------------------------------------------------------------------
def infer_shift(timesteps: Sequence[float]) -> float:
    """The shift S with timesteps == shift_S(1 - i/N); ExportError if they are not of that form."""
    n = len(timesteps)
    if n == 1:
        return 1.0
    u, t = 1 - 1 / n, timesteps[1]
    s = t * (1 - u) / (u * (1 - t))
    expected = few_step_timesteps(n, s)
    if max(abs(a - b) for a, b in zip(expected, timesteps)) > 1e-9:
        raise ExportError(
            f"the run's timesteps {list(timesteps)} are not a shifted uniform schedule (num_steps with shift): "
            "diffusers' schedulers cannot reproduce them from a config; use `pdmd sample` on this run")
    return s


def flow_match_scheduler_config(timesteps: Sequence[float]) -> dict[str, Any]:
    """A FlowMatchEulerDiscreteScheduler config whose ``set_timesteps(N)`` gives exactly ``timesteps``."""
    n, target = len(timesteps), infer_shift(timesteps)
    base = {"num_train_timesteps": NUM_TRAIN_TIMESTEPS, "use_dynamic_shifting": False, "invert_sigmas": False,
            "stochastic_sampling": False, "use_karras_sigmas": False, "use_exponential_sigmas": False,
            "use_beta_sigmas": False}
    if n == 1 or abs(target - 1.0) < 1e-12:
        return {**base, "shift": 1.0, "shift_terminal": None if n == 1 else float(timesteps[-1])}
    # c1 (linspace squeeze) and c2 (terminal stretch) must turn shift_x into shift_S:
    # (1 - e) S (x - 1) = (S - 1) k x (1 + (x - 1) e), e = 1/1000, k = 1 - 1/N.
    e, k = 1.0 / NUM_TRAIN_TIMESTEPS, 1.0 - 1.0 / n
    a = (target - 1) * k * e
    b = (target - 1) * k * (1 - e) - (1 - e) * target
    c = (1 - e) * target
    disc = b * b - 4 * a * c
    roots = [] if disc < 0 else sorted(((-b - math.sqrt(disc)) / (2 * a), (-b + math.sqrt(disc)) / (2 * a)))
    good = [x for x in roots if x > 0 and abs(x - 1) > 1e-9]
    if not good:
        raise ExportError(f"no FlowMatchEulerDiscreteScheduler shift reproduces shift {target:g} over {n} steps; "
                          "use `pdmd sample` on this run")
    return {**base, "shift": float(good[0]), "shift_terminal": float(timesteps[-1])}


def scheduler_schedule(config: dict[str, Any], num_steps: int) -> tuple[list[float], list[float]]:
    """(sigmas without the final 0, timesteps) that diffusers' scheduler builds from ``config``."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler.from_config(config)
    sched.set_timesteps(num_steps)
    return [float(s) for s in sched.sigmas[:-1]], [float(t) for t in sched.timesteps]


def check_scheduler(config: dict[str, Any], timesteps: Sequence[float]) -> list[float]:
    """Build the scheduler as the pipeline will and compare its schedule with ours; returns its timesteps."""
    sigmas, steps = scheduler_schedule(config, len(timesteps))
    worst = max(abs(a - b) for a, b in zip(sigmas, timesteps))
    worst_t = max(abs(a - 1000 * b) for a, b in zip(steps, timesteps))
    if len(sigmas) != len(timesteps) or worst > SCHEDULE_TOL or worst_t > 1000 * SCHEDULE_TOL:
        raise ExportError(f"the exported scheduler gives sigmas {sigmas}, not the distilled timesteps "
                          f"{list(timesteps)} (max error {worst:.3g}); please report this")
    return steps


# --- routing between the two transformers --------------------------------------------------------
def route(scheduler_timesteps: Sequence[float], boundary_ratio: float | None) -> list[int]:
    """Which slot (1 = transformer, 2 = transformer_2) WanPipeline uses per step, compared as it does
    (a float32 timestep tensor >= boundary_ratio * 1000)."""
    import torch

    if boundary_ratio is None:
        return [1] * len(scheduler_timesteps)
    ts = torch.tensor(list(scheduler_timesteps), dtype=torch.float32)
    return [1 if bool(t >= boundary_ratio * NUM_TRAIN_TIMESTEPS) else 2 for t in ts]


def choose_boundary_ratio(plan: PhasePlan, scheduler_timesteps: Sequence[float],
                          preferred: float | None = None) -> float:
    """boundary_ratio for a two-phase plan: strictly above phase 2's first step and at or below phase 1's
    last one (docs/architecture.md). The teacher's own boundary (0.875 for Wan2.2 T2V) when it qualifies, else the
    midpoint. Checked against the routing the pipeline will actually do."""
    if plan.num_phases != 2:
        raise ExportError(f"boundary_ratio routes two experts; this plan has {plan.num_phases} phases")
    first2 = plan.steps_in_phase(2)[0]
    hi, lo = scheduler_timesteps[first2 - 1] / 1000, scheduler_timesteps[first2] / 1000
    candidates = ([preferred] if preferred is not None else []) + [round((hi + lo) / 2, 6), (hi + lo) / 2]
    want = [plan.phase_of_step(i) for i in range(plan.num_steps)]
    for ratio in candidates:
        if lo < ratio <= hi and route(scheduler_timesteps, ratio) == want:
            return float(ratio)
    raise ExportError(f"no boundary_ratio separates the steps at {hi * 1000:g} and {lo * 1000:g}; please report this")


# --- the folder layout ---------------------------------------------------------------------------
def phase_folders(num_phases: int) -> dict[int, str]:
    """Where phase k's transformer goes: WanPipeline's slots for 1 or 2 phases, experts/phaseK otherwise."""
    if num_phases == 1:
        return {1: "transformer"}
    if num_phases == 2:
        return {1: "transformer", 2: "transformer_2"}
    return {k: f"experts/phase{k}" for k in range(1, num_phases + 1)}


def is_wan_pipeline(num_phases: int) -> bool:
    """Whether the export is a loadable WanPipeline (else the documented layout plus `pdmd sample --export`)."""
    return num_phases in (1, 2)


def lora_file(k: int, fmt: str = "diffusers") -> str:
    return f"phase{k}_lora.safetensors" if fmt == "diffusers" else f"phase{k}_lora_{fmt}.safetensors"


def lora_entries(k: int, formats: Sequence[str] | None) -> dict[str, str | None]:
    """``pdmd_export.json``'s names of phase k's LoRA files (None for a format not written; ``formats`` None:
    not a --lora-only export)."""
    formats = formats or ()
    return {"lora": lora_file(k) if "diffusers" in formats else None,
            "lora_comfyui": lora_file(k, "comfyui") if "comfyui" in formats else None}


def export_info(run: RunInfo, scheduler: dict[str, Any], boundary_ratio: float | None, *, lora_only: bool,
                dtype: str, lora_formats: Sequence[str] = LORA_FORMATS) -> dict[str, Any]:
    """What ``pdmd_export.json`` records: enough to sample the export with our sampler, and its origin."""
    folders = phase_folders(run.plan.num_phases)
    return {
        "format": 1,
        "model": "wan",
        "kind": "lora" if lora_only else ("wan_pipeline" if is_wan_pipeline(run.plan.num_phases) else "experts"),
        "run": str(run.path.resolve()),
        "timesteps": list(run.plan.timesteps),
        "boundaries": list(run.plan.boundaries),
        "num_inference_steps": run.plan.num_steps,
        "guidance_scale": 1.0,
        "boundary_ratio": boundary_ratio,
        "scheduler": {"_class_name": SCHEDULER_CLASS, **scheduler},
        "dtype": dtype,
        "conditioning": run.conditioning,
        "pipeline_class": pipeline_class(run.conditioning) if is_wan_pipeline(run.plan.num_phases) else None,
        "phases": [{
            "index": p.index,
            "steps": list(run.plan.steps_in_phase(p.index)),
            "folder": None if lora_only else folders[p.index],
            **lora_entries(p.index, lora_formats if lora_only else None),
            "base": run.subfolders[p.student_expert],
            "pipeline_slot": folders[p.index] if is_wan_pipeline(run.plan.num_phases) else None,
        } for p in run.phases],
    }


def pipeline_class(conditioning: str | None, base_class: str | None = None) -> str:
    """The diffusers pipeline an export loads in: WanImageToVideoPipeline for image-conditioned runs (its
    ``expand_timesteps`` says i2v or ti2v), else the base's Wan class, else WanPipeline."""
    if conditioning is not None:
        return "WanImageToVideoPipeline"
    return base_class if base_class in PIPELINE_CLASSES else "WanPipeline"


def model_index(base_index: dict[str, Any] | None, num_phases: int, boundary_ratio: float | None,
                present: Sequence[str], conditioning: str | None = None) -> dict[str, Any]:
    """A WanPipeline / WanImageToVideoPipeline model_index.json: the base pipeline's entries for the copied
    parts, ours for the rest. Image-conditioned: WanImageToVideoPipeline, ``expand_timesteps`` true for ti2v
    only, and no CLIP image encoder/processor (null entries, as Wan2.2 I2V-A14B's own model_index)."""
    import diffusers

    base = base_index or {}
    expand = conditioning == "ti2v" if conditioning is not None else bool(base.get("expand_timesteps", False))
    index: dict[str, Any] = {"_class_name": pipeline_class(conditioning, base.get("_class_name")),
                             "_diffusers_version": diffusers.__version__,
                             "boundary_ratio": boundary_ratio, "expand_timesteps": expand,
                             "scheduler": ["diffusers", SCHEDULER_CLASS],
                             "transformer": ["diffusers", "WanTransformer3DModel"],
                             "transformer_2": ["diffusers", "WanTransformer3DModel"] if num_phases == 2 else [None, None]}
    defaults = {"text_encoder": ["transformers", "UMT5EncoderModel"], "tokenizer": ["transformers", "AutoTokenizer"],
                "vae": ["diffusers", "AutoencoderKLWan"]}
    for name in COMPONENTS:
        if name in present:
            index[name] = base.get(name) or defaults[name]
        elif name in defaults or name in base or conditioning is not None:
            index[name] = [None, None]
    return index


def read_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None
