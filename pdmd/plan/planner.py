"""`pdmd plan CONFIG --gpus N [--gpu h100|h200] [--tp ..] [--pp ..] [--cp ..] [--json FILE]`: memory per
GPU and step time of a Phased DMD recipe at every parallel layout, before any GPU hour is spent.

Per phase and per role (docs/architecture.md "Roles, not copies": teacher experts frozen, the student as LoRA
adapters on its teacher expert or a full copy, one fake score per teacher expert the phase re-noises
into, frozen experts of earlier phases) it counts the bytes one GPU holds for weights, gradients,
optimizer states and activations under TP/SP, PP, CP and Megatron's distributed optimizer, and the
step time from FLOP counts at a stated MFU. CONFIG is a recipe (configs/*.yaml) or a preset name
(``pdmd plan --help`` lists them). No model is built and megatron is not imported; the teacher's
config.json is read when the recipe's teacher path exists. Assumptions: docs/plan.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from pdmd.core.config import CP_COMMS, ConfigError, RunConfig, _build
from pdmd.core.errors import UserError
from pdmd.core.pipeline_split import pipeline_split
from pdmd.plan import comm
from pdmd.plan.capacity import (
    PRESETS,
    Arch,
    Sharding,
    arch_from_diffusers,
    ddp_buffer_numel,
    forward_flops,
    layer_activation_bytes,
    lora_flops,
    lora_tensors,
    model_extra_activation_bytes,
    param_count,
    param_tensors,
    rank_tensors,
    stage_activation_bytes,
)

GIB = 2**30
# Memory torch can use on the card, bf16 dense peak; NVIDIA's H100 SXM / H200 SXM data sheets (989.4
# TFLOP/s dense bf16 for both; 80 GB / 141 GB of HBM, of which about 78 / 139 GiB are usable).
GPUS: dict[str, dict[str, float]] = {
    "h100": {"memory_gib": 78.0, "bf16_flops": 989.4e12},
    "h200": {"memory_gib": 139.0, "bf16_flops": 989.4e12},
}
# Megatron-Bridge's published Wan2.1-14B pretraining on H100: 325.77 TFLOP/s per GPU = 33% of peak.
DEFAULT_MFU = 0.33
RESERVE_FRACTION, RESERVE_GIB = 0.08, 2.0  # fragmentation; CUDA context + NCCL buffers
# Transient memory beyond what autograd saves, in units of one block's full-training activations
# (measured on the tiny CPU model: a no-grad forward peaks at ~0.45, a training step ~0.07-0.15 above
# its saved tensors; tests/test_plan.py checks the resulting peaks).
NOGRAD_WORKING_SET, TRAIN_WORKING_SET = 0.5, 0.25

# Built-in recipes: the paper's settings (docs/method.md) per model, micro-batch 1, global batch 64.
_WAN_A14B = {
    "model": {"kind": "wan", "spec": "te", "dtype": "bf16",
              "teacher": {"path": "", "subfolders": ["transformer", "transformer_2"], "boundary": 0.875}},
    "plan": {"num_steps": 4, "shift": 5.0, "num_phases": 2, "renoise_clamp": [[0.875, 1.0], None]},
    "method": {"sgts": True, "cfg_scale": 4.0, "fake_ratio": 5},
    "student": {"lr": 5e-5, "lora": {"rank": 64, "alpha": 8.0}}, "fake": {"lr": 4e-7, "lora": None},
    "train": {"micro_batch_size": 1, "latent_shape": [16, 21, 60, 104]},
    "data": {"shards": "-", "max_length": 512},
}
RECIPES: dict[str, dict[str, Any]] = {
    # 81 frames; the paper's mix: 720p (either orientation) 20%, 480p 80% -> latents 21 x 90 x 160 / 21 x 60 x 104.
    "wan2.2-t2v-a14b": {"arch": "wan2.2-t2v-a14b", "recipe": _WAN_A14B,
                        "mix": [([16, 21, 90, 160], 0.2), ([16, 21, 60, 104], 0.8)], "global_batch": 64},
    # 121 frames at 704 x 1280 through the Wan2.2 VAE (4 x 16 x 16, 48 channels): latents 31 x 44 x 80.
    "wan2.2-ti2v-5b": {"arch": "wan2.2-ti2v-5b", "global_batch": 64, "recipe": {
        **_WAN_A14B,
        "model": {"kind": "wan", "spec": "te", "dtype": "bf16",
                  "teacher": {"path": "", "subfolders": ["transformer"], "boundary": None}},
        "plan": {"num_steps": 4, "shift": 5.0, "num_phases": 2},
        "train": {"micro_batch_size": 1, "latent_shape": [48, 31, 44, 80]},
        "data": {"shards": "-", "max_length": 512, "conditioning": "ti2v"}}},
    # 1328 x 1328 images: latents 16 x 166 x 166, 2 x 2 packed -> 6889 tokens; shift 3 (timesteps 1000, 900, 750, 500).
    "qwen-image": {"arch": "qwen-image", "global_batch": 64, "recipe": {
        **_WAN_A14B,
        "model": {"kind": "qwen-image", "spec": "te", "dtype": "bf16",
                  "teacher": {"path": "", "subfolders": ["transformer"], "boundary": None}},
        "plan": {"num_steps": 4, "shift": 3.0, "num_phases": 2},
        "train": {"micro_batch_size": 1, "latent_shape": [16, 1, 166, 166]}}},
}


class PlanError(UserError):
    """An input the planner cannot work with; the message says what to change."""


@dataclass
class Workload:
    """What the planner needs from a recipe."""

    label: str
    arch: Arch
    arch_source: str
    experts: int
    boundary: float | None
    plan: Any  # pdmd.core.schedule.PhasePlan
    mix: list[tuple[list[int], float]]  # (latent shape, weight)
    text_len: int
    micro_batch: int
    num_micro_batches: int
    dtype_bytes: int
    lora: tuple[int, tuple[str, ...]] | None  # (rank, targets) or None: full-parameter student
    cfg_scale: float
    fake_ratio: int
    sgts: bool
    fake_rollout_reuse: int = 1  # method.fake_rollout_reuse: fake updates per rollout
    global_batch: int | None = None
    sequence_parallel: bool = False
    schedule: str = "sequential"  # method.schedule: sequential (the paper) | interleaved (LightX2V)
    conditioning: str | None = None  # data.conditioning: None (text only) | i2v | ti2v (per-token timesteps)
    parallel: dict[str, int] = field(default_factory=dict)
    cp_comm: str = "all_gather"  # parallel.cp_comm: how context-parallel attention communicates
    network: comm.Network = field(default_factory=comm.Network)

    @property
    def max_tokens(self) -> int:
        return max(self.arch.tokens(shape) for shape, _ in self.mix)


@dataclass(frozen=True)
class Layout:
    tp: int
    pp: int
    cp: int
    dp: int
    sp: bool
    recompute: str  # "none" | "full"

    def describe(self) -> str:
        return f"tp={self.tp} pp={self.pp} cp={self.cp} dp={self.dp}{' sp' if self.sp else ''} recompute={self.recompute}"


# -- the recipe ----------------------------------------------------------------------------------------
def load_workload(spec: str, overrides: list[str] = (), *, arch_name: str | None = None,
                  mix: str | None = None, global_batch: int | None = None) -> Workload:
    """A recipe path or preset name (+ dotted overrides) -> Workload. Paths need not exist: planning
    comes before the download; without the teacher's config.json the architecture is a preset."""
    from omegaconf import OmegaConf


    preset = RECIPES.get(spec)
    if preset is not None:
        base = OmegaConf.create(copy.deepcopy(preset["recipe"]))
    elif Path(spec).is_file():
        base = OmegaConf.load(spec)
    else:
        raise PlanError(f"{spec!r} is neither a recipe file nor a preset ({', '.join(RECIPES)})")
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise PlanError(f"override {bad[0]!r} is not key=value (e.g. train.micro_batch_size=2)")
    raw = OmegaConf.to_container(OmegaConf.merge(base, OmegaConf.from_dotlist(list(overrides))), resolve=True)
    try:
        cfg = _build(RunConfig, raw, "")
        plan = cfg.phase_plan()
    except (ConfigError, ValueError) as exc:
        raise PlanError(f"{spec}: {exc}") from exc
    teacher = cfg.model.teacher
    subs = list(teacher.subfolders)
    cfg_json = Path(teacher.path) / subs[0] / "config.json" if teacher.path else None
    if arch_name is not None:
        if arch_name not in PRESETS:
            raise PlanError(f"--arch {arch_name!r}: choose one of {', '.join(PRESETS)}")
        arch, source = PRESETS[arch_name], f"preset {arch_name} (--arch)"
    elif cfg_json is not None and cfg_json.is_file():
        arch, source = arch_from_diffusers(cfg_json, name=f"{Path(teacher.path).name}/{subs[0]}"), f"read from {cfg_json}"
    else:
        name = preset["arch"] if preset else _guess_arch(cfg.model.kind, cfg.data.get("conditioning"))
        where = f"no teacher config.json at {cfg_json}" if cfg_json else "no teacher path"
        arch, source = PRESETS[name], f"preset {name} ({where}; --arch picks another)"
    shapes = _parse_mix(mix) if mix else (preset.get("mix") if preset and "train.latent_shape" not in
                                          " ".join(overrides) else None) or [(list(cfg.train.latent_shape), 1.0)]
    for shape, _ in shapes:
        if len(shape) != 4:
            raise PlanError(f"latent shape {shape} must be [channels, frames, height, width]")
        try:
            arch.tokens(shape)
        except ValueError as exc:
            raise PlanError(str(exc)) from exc
    lora = cfg.student.lora
    return Workload(
        label=spec, arch=arch, arch_source=source, experts=len(subs), boundary=teacher.boundary, plan=plan,
        mix=shapes, text_len=int(cfg.data.get("max_length", 512)), micro_batch=cfg.train.micro_batch_size,
        num_micro_batches=cfg.train.num_micro_batches, dtype_bytes=2 if cfg.model.dtype == "bf16" else 4,
        lora=None if lora is None else (lora.rank, tuple(lora.targets)), cfg_scale=cfg.method.cfg_scale,
        fake_ratio=cfg.method.fake_ratio, sgts=cfg.method.sgts, fake_rollout_reuse=cfg.method.fake_rollout_reuse,
        global_batch=global_batch if global_batch is not None else (preset or {}).get("global_batch"),
        sequence_parallel=cfg.parallel.sequence_parallel, schedule=getattr(cfg.method, "schedule", "sequential"),
        conditioning=cfg.data.get("conditioning"),
        parallel={"tp": cfg.parallel.tp, "pp": cfg.parallel.pp, "cp": cfg.parallel.cp}, cp_comm=cfg.parallel.cp_comm)


def _guess_arch(kind: str, conditioning: str | None) -> str:
    if kind in ("qwen-image", "qwen_image"):
        return "qwen-image"
    return {"ti2v": "wan2.2-ti2v-5b", "i2v": "wan2.2-i2v-a14b"}.get(conditioning or "", "wan2.2-t2v-a14b")


def _parse_mix(text: str) -> list[tuple[list[int], float]]:
    """'16x21x90x160:0.2,16x21x60x104:0.8' -> [([16, 21, 90, 160], 0.2), ...] (weights normalised)."""
    out = []
    try:
        for part in text.split(","):
            shape, _, weight = part.partition(":")
            out.append(([int(v) for v in shape.lower().split("x")], float(weight or 1.0)))
    except ValueError as exc:
        raise PlanError(f"--mix {text!r}: write CxFxHxW:weight,... e.g. 16x21x90x160:0.2,16x21x60x104:0.8") from exc
    total = sum(w for _, w in out)
    if total <= 0:
        raise PlanError(f"--mix {text!r}: weights must be positive")
    return [(s, w / total) for s, w in out]


# -- roles of a phase (megatron_adapters/backend.py setup_phase, in numbers) ---------------------------
def phase_roles(w: Workload, k: int) -> dict[str, Any]:
    """Which experts phase k keeps resident: teachers, the student, fakes, earlier experts."""
    lo, hi = w.plan.renoise_interval(k)
    if w.experts == 1:
        scored, student = [0], 0
    else:
        scored = [e for e, hit in ((0, hi >= w.boundary), (1, lo < w.boundary)) if hit]
        student = 0 if w.plan.phase_start(k) >= w.boundary else 1
    teachers = sorted(set(scored) | ({student} if w.lora else set()))
    return {"phase": k, "student_expert": student, "teachers": teachers, "fakes": scored,
            "earlier": list(range(1, k))}


# -- memory -------------------------------------------------------------------------------------------
def _role_bytes(w: Workload, lay: Layout, stage: int, kind: str) -> dict[str, float]:
    """Weights/grads/optimizer bytes of one role on one rank: ``frozen`` (weights only), ``full``
    (DDP-bucketed weights and grads + distributed-optimizer states over dp x cp), ``lora`` (the adapters
    only; the backbone is the teacher's). Norm weights stay fp32 in a bf16 model: Megatron's DDP keeps
    them in a buffer of their own, with fp32 gradients and no master copy."""
    b = w.dtype_bytes
    tensors = lora_tensors(w.arch, *w.lora) if kind == "lora" else param_tensors(w.arch)
    out = {"weights": 0.0, "grads": 0.0, "optimizer": 0.0}
    shards = lay.dp * lay.cp
    for fp32 in (False, True):
        numels = rank_tensors(tensors, w.arch, lay.tp, lay.pp, stage, fp32=fp32)
        if not numels:
            continue
        size = 4 if fp32 else b
        if kind == "frozen":
            out["weights"] += sum(numels) * size
            continue
        buffer = ddp_buffer_numel(numels, shards)
        out["weights"] += buffer * size
        out["grads"] += buffer * size
        # Adam's two moments in fp32, plus an fp32 master copy of 16-bit weights (sharded over dp x cp).
        out["optimizer"] += sum(numels) / shards * (8 + (4 if size == 2 else 0))
    return out


def _activation(w: Workload, lay: Layout, stage: int, full: bool, tokens: int) -> dict[str, float]:
    """Saved activations of one training pass (student or fake) on the worst rank of ``stage``, and the
    transient working sets (training and no-grad passes)."""
    arch, per_stage = w.arch, pipeline_split(w.arch.layers, lay.pp)[stage]
    mb = micro_batch(w, lay)
    shard = Sharding(lay.tp, lay.sp, lay.cp)
    lora_rank = None if full else w.lora[0]
    one_layer = layer_activation_bytes(arch, tokens=tokens, text=w.text_len, batch=mb, act_bytes=w.dtype_bytes,
                                       lora_rank=None, shard=shard)
    first, last = stage == 0, stage == lay.pp - 1
    kw = dict(tokens=tokens, text=w.text_len, batch=mb, act_bytes=w.dtype_bytes, lora_rank=lora_rank, shard=shard,
              per_token_t=w.conditioning == "ti2v")
    rebuilt = 0.0
    if lay.recompute == "full":
        # model.recompute=full (Megatron's checkpoint, one block each): a block keeps only its input
        # (Qwen-Image: both streams); the backward rebuilds one block's activations at a time.
        s_loc = tokens / lay.cp
        inputs = (s_loc / shard.sp_div + (w.text_len if arch.kind == "qwen-image" else 0)) * w.dtype_bytes * arch.hidden
        stage_bytes = per_stage * mb * inputs + model_extra_activation_bytes(arch, first=first, last=last, **kw)
        rebuilt = layer_activation_bytes(arch, **kw)
    else:
        stage_bytes = stage_activation_bytes(arch, layers=per_stage, first=first, last=last, **kw)
    in_flight = min(lay.pp - stage, _micro_batches(w, lay))  # 1F1B: stage s holds up to pp - s micro-batches
    return {"saved": stage_bytes * in_flight, "train_transient": rebuilt + TRAIN_WORKING_SET * one_layer,
            "nograd_transient": NOGRAD_WORKING_SET * one_layer}


def micro_batch(w: Workload, lay: Layout) -> int:
    """Samples per micro-batch at this layout: the recipe's, or (at a fixed global batch) the largest size up
    to it that divides a replica's share of the global batch."""
    if w.global_batch is None:
        return w.micro_batch
    share = w.global_batch // lay.dp
    return max(b for b in range(1, min(w.micro_batch, share) + 1) if share % b == 0)


def _micro_batches(w: Workload, lay: Layout) -> int:
    if w.global_batch is None:
        return w.num_micro_batches
    return max(1, w.global_batch // (lay.dp * micro_batch(w, lay)))


def recipe_global_batch(w: Workload, gpus: int) -> int | None:
    """The global batch the recipe trains with on ``gpus`` GPUs at its own layout (data-parallel size x
    micro-batch x micro-batches), so that every layout is compared at that batch; None if its layout does
    not divide the GPUs."""
    model_parallel = w.parallel.get("tp", 1) * w.parallel.get("pp", 1) * w.parallel.get("cp", 1)
    if not w.parallel or gpus % model_parallel:
        return None
    return gpus // model_parallel * w.micro_batch * w.num_micro_batches


def resident_roles(w: Workload, k: int | str) -> list[tuple[str, str]]:
    """(name, kind) of every model resident in phase k, kind frozen / lora / full. The sequential
    schedule (the paper's) holds one phase's roles; ``method.schedule=interleaved`` (LightX2V's) holds
    every phase's student and fakes at once over the union of the teachers, and no finished experts
    (``setup_interleaved``), whatever k."""
    student = "lora" if w.lora else "full"
    if w.schedule == "interleaved":
        regions = [phase_roles(w, j) for j in w.plan.phases]
        rows = [(f"teacher{e}", "frozen") for e in sorted(set().union(*(r["teachers"] for r in regions)))]
        for r in regions:
            rows.append((f"region{r['phase']}.student ({student}, expert {r['student_expert']})", student))
            rows += [(f"region{r['phase']}.fake{e}", "full") for e in r["fakes"]]
        return rows
    r = phase_roles(w, k)
    return ([(f"teacher{e}", "frozen") for e in r["teachers"]]
            + [(f"student ({student}, expert {r['student_expert']})", student)]
            + [(f"fake{e}", "full") for e in r["fakes"]]
            + [(f"expert:{j} (frozen)", "frozen") for j in r["earlier"]])


def phase_memory(w: Workload, lay: Layout, k: int | str) -> dict[str, Any]:
    """Bytes per GPU of phase k (``"all"`` when the phases train interleaved) at ``lay``: per role, and
    the peak (worst pipeline stage)."""
    tokens = w.max_tokens
    worst: dict[str, Any] | None = None
    for stage in sorted({0, lay.pp - 1}):
        acts = {"lora": _activation(w, lay, stage, False, tokens) if w.lora else None,
                "full": _activation(w, lay, stage, True, tokens)}
        rows = [{"role": name, **_role_bytes(w, lay, stage, kind),
                 "activations": 0.0 if kind == "frozen" else acts[kind]["saved"]}
                for name, kind in resident_roles(w, k)]
        static = sum(r["weights"] + r["grads"] + r["optimizer"] for r in rows)
        # One training pass runs at a time: the peak is the larger pass plus its working set; no-grad passes
        # and the optimizer step peak apart. The step of a bf16 role copies its gradient shard to fp32
        # (4 bytes per parameter of the shard); fused Adam (TE/Apex, as on NVIDIA's containers) adds nothing.
        train_peak = max(a["saved"] + a["train_transient"] for a in acts.values() if a is not None)
        opt_peak = max(r["optimizer"] for r in rows) / 12 * 4 if w.dtype_bytes == 2 else 0.0
        transient = max(train_peak, acts["full"]["nograd_transient"], opt_peak)
        total = static + transient
        if worst is None or total > worst["total"]:
            worst = {"phase": k, "stage": stage, "roles": rows, "static": static, "transient": transient,
                     "total": total, "train_peak": train_peak}
    return worst


def budget_bytes(gpu: str) -> float:
    return (GPUS[gpu]["memory_gib"] * (1 - RESERVE_FRACTION) - RESERVE_GIB) * GIB


# -- time ---------------------------------------------------------------------------------------------
def step_flops(w: Workload, k: int, tokens: int, recompute: str = "none") -> dict[str, float]:
    """Model FLOPs of one generator update of phase k per sample: the generator step (rollout, teacher x2
    with CFG, fake, student forward+backward) and ``fake_ratio`` fake steps (rollout, fake forward +
    backward). Backward = 2x forward for attention and trained weights' matmuls (dgrad + wgrad), 1x for
    frozen weights' matmuls (dgrad only; a LoRA student's backbone); full recompute adds one forward per
    training pass. (Flash attention's backward also recomputes the scores: hardware FLOPs, not counted,
    as in the MFU figures the default comes from.)"""
    f = forward_flops(w.arch, tokens, w.text_len)
    fwd = f.total
    rollout, rollouts = _rollout_passes(w, k), _fake_rollouts(w)
    extra = 1.0 if recompute == "full" else 0.0
    full_train = fwd * (1 + extra) + 2 * f.linear + 2 * f.attention
    if w.lora:
        lf = lora_flops(w.arch, tokens, w.text_len, *w.lora)
        student = (fwd + lf) * (1 + extra) + f.linear + 2 * f.attention + 2 * lf
    else:
        student = full_train
    teacher = (2 if w.cfg_scale != 1.0 else 1) * fwd
    gen = {"rollout": rollout * fwd, "teacher": teacher, "fake": fwd, "student": student}
    fake = {"fake_rollout": rollouts * rollout * fwd, "fake_fake_train": w.fake_ratio * full_train}
    total = sum(gen.values()) + sum(fake.values())
    return {**{f"generator_{n}": v for n, v in gen.items()}, **fake, "total": total, "forward": fwd}


def passes(w: Workload, k: int, recompute: str = "none") -> dict[str, float]:
    """Whole-model passes per sample of one generator update of phase k: forwards (rollouts, teacher
    cond/uncond, fakes, the trained passes' forwards and their recomputation) and backwards."""
    rollout = _rollout_passes(w, k)
    teacher = 2 if w.cfg_scale != 1.0 else 1
    trained = 1 + w.fake_ratio  # the student's pass and each fake update's
    forward = rollout + teacher + 1 + _fake_rollouts(w) * rollout + trained * (2 if recompute == "full" else 1)
    return {"forward": forward, "backward": trained}


def _rollout_passes(w: Workload, k: int) -> float:
    """Model passes of one rollout in phase k: the earlier phases' steps, then (SGTS) on average (n + 1) / 2
    of this phase's n steps, or all n."""
    steps = w.plan.steps_per_phase
    return sum(steps[: k - 1]) + ((steps[k - 1] + 1) / 2 if w.sgts else steps[k - 1])


def _fake_rollouts(w: Workload) -> int:
    """Rollouts of a generator update's fake steps: ``method.fake_rollout_reuse`` updates share one."""
    return -(-w.fake_ratio // w.fake_rollout_reuse)


def trainable_params(w: Workload, full: bool) -> float:
    """Parameters one optimizer step of a role reduces: a whole expert, or the LoRA adapters."""
    if full or not w.lora:
        return float(param_count(w.arch))
    return float(sum(t.numel for t in lora_tensors(w.arch, *w.lora)) * w.arch.layers)


def comm_time(w: Workload, lay: Layout, k: int) -> dict[str, float]:
    """Seconds of communication per generator update of phase k on a replica (pdmd/plan/comm.py): TP (and
    SP), CP, pipeline sends, and the gradient reduction of the student's and the fakes' optimizer steps."""
    net, mb, m = w.network, micro_batch(w, lay), _micro_batches(w, lay)
    count = passes(w, k, lay.recompute)
    layers = max(pipeline_split(w.arch.layers, lay.pp))  # the slowest stage
    bubble = (m + lay.pp - 1) / m
    out = {"tp": 0.0, "cp": 0.0, "pp": 0.0}
    for shape, weight in w.mix:
        tokens = w.arch.tokens(shape)
        fwd = comm.layer_forward_comm(w.arch, tp=lay.tp, cp=lay.cp, cp_comm=w.cp_comm, tokens=tokens, text=w.text_len,
                                      batch=mb, act_bytes=w.dtype_bytes, net=net)
        bwd = comm.layer_backward_comm(fwd, lay.cp, w.cp_comm)
        for kind in ("tp", "cp"):
            out[kind] += weight * m * bubble * layers * (count["forward"] * fwd[kind] + count["backward"] * bwd[kind])
        if lay.pp > 1:
            send = comm.pipeline_p2p_s(tokens=tokens, cp=lay.cp, tp=lay.tp, sp=lay.sp, batch=mb, hidden=w.arch.hidden,
                                       act_bytes=w.dtype_bytes, dp=lay.dp, net=net)
            out["pp"] += weight * (count["forward"] + count["backward"]) * (m + lay.pp - 1) * send
    shard = lay.tp * lay.pp
    fakes = len(phase_roles(w, k)["fakes"])
    sync = lambda params: comm.grad_sync_s(params / shard, tp=lay.tp, cp=lay.cp, dp=lay.dp,  # noqa: E731
                                           param_bytes=w.dtype_bytes, net=net)
    out["dp"] = sync(trainable_params(w, full=False)) + w.fake_ratio * fakes * sync(trainable_params(w, full=True))
    out["total"] = sum(out.values())
    return out


def step_time(w: Workload, lay: Layout, k: int, gpu: str, mfu: float) -> dict[str, float]:
    """Seconds per generator update of phase k (mix-weighted): compute at the stated MFU with the pipeline
    bubble of 1F1B, plus communication (not overlapped), with each pass's share of the compute."""
    flops = {shape_i: step_flops(w, k, w.arch.tokens(shape), lay.recompute) for shape_i, (shape, _) in enumerate(w.mix)}
    per_sample = sum(weight * flops[i]["total"] for i, (_, weight) in enumerate(w.mix))
    m = _micro_batches(w, lay)
    samples = micro_batch(w, lay) * m  # per data-parallel replica per update
    bubble = (m + lay.pp - 1) / m
    replica_gpus = lay.tp * lay.pp * lay.cp
    rate = replica_gpus * GPUS[gpu]["bf16_flops"] * mfu / (samples * bubble)  # FLOP/s per sample of the replica
    compute = per_sample / rate
    breakdown = {name: sum(weight * flops[i][name] for i, (_, weight) in enumerate(w.mix)) / rate
                 for name in flops[0] if name.startswith(("generator_", "fake_"))}
    communication = comm_time(w, lay, k)
    seconds = compute + communication["total"]
    return {"seconds": seconds, "compute_seconds": compute, "comm_seconds": communication["total"],
            "comm": communication, "passes": breakdown, "samples": samples * lay.dp,
            "samples_per_s": samples * lay.dp / seconds, "flops_per_sample": per_sample,
            "micro_batch": micro_batch(w, lay), "micro_batches": m}


# -- layouts ------------------------------------------------------------------------------------------
def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def layout_problem(w: Workload, lay: Layout, gpus: int) -> str | None:
    """Why a layout cannot run this model (None: it can)."""
    a = w.arch
    if lay.tp * lay.pp * lay.cp * lay.dp != gpus:
        return f"tp x pp x cp x dp = {lay.tp * lay.pp * lay.cp * lay.dp} is not {gpus} GPUs"
    if a.heads % lay.tp or a.ffn % lay.tp:
        return f"tp={lay.tp} does not divide {a.heads} heads / ffn {a.ffn}"
    if a.layers < lay.pp:
        return f"pp={lay.pp} is more stages than the {a.layers} layers"
    shards = lay.cp * (lay.tp if lay.sp else 1)
    for shape, _ in w.mix:
        if a.tokens(shape) % shards:
            return f"{a.tokens(shape)} tokens of {shape} do not split over cp x (tp under SP) = {shards}"
    if w.global_batch is not None and w.global_batch % lay.dp:
        return f"global batch {w.global_batch} does not split over dp={lay.dp} replicas"
    return None


def candidate_layouts(w: Workload, gpus: int, tp: int | None, pp: int | None, cp: int | None,
                      recompute: str | None, max_tp: int = 8) -> list[Layout]:
    """Every layout of ``gpus`` GPUs that the model allows (fixed values where given): TP within a node
    (<= 8), with and without sequence parallelism, with and without full recomputation."""
    out = []
    for t in [tp] if tp else [d for d in _divisors(gpus) if d <= max_tp]:
        for p in [pp] if pp else _divisors(gpus // t if gpus % t == 0 else 1):
            for c in [cp] if cp else _divisors(gpus // (t * p) if gpus % (t * p) == 0 else 1):
                if gpus % (t * p * c):
                    continue
                for sp in ([True, False] if t > 1 else [False]):
                    for rc in [recompute] if recompute else ["none", "full"]:
                        lay = Layout(t, p, c, gpus // (t * p * c), sp, rc)
                        if layout_problem(w, lay, gpus) is None:
                            out.append(lay)
    return out


def evaluate(w: Workload, lay: Layout, gpu: str, mfu: float) -> dict[str, Any]:
    """Memory and time of a layout; at a fixed global batch, with the largest micro-batch (up to the
    recipe's) that fits, more micro-batches making up the batch."""
    if w.global_batch is None:
        return _evaluate(w, lay, gpu, mfu)
    share = w.global_batch // lay.dp
    for mb in sorted((b for b in range(1, min(w.micro_batch, share) + 1) if share % b == 0), reverse=True):
        ev = _evaluate(replace(w, micro_batch=mb), lay, gpu, mfu)
        if ev["fits"]:
            return ev
    return ev


def _evaluate(w: Workload, lay: Layout, gpu: str, mfu: float) -> dict[str, Any]:
    phases = ([phase_memory(w, lay, "all")] if w.schedule == "interleaved"
              else [phase_memory(w, lay, k) for k in w.plan.phases])
    times = [step_time(w, lay, k, gpu, mfu) for k in w.plan.phases]
    budget = budget_bytes(gpu)
    return {"layout": asdict(lay), "phases": phases, "times": times, "fits": all(p["total"] <= budget for p in phases),
            "peak_bytes": max(p["total"] for p in phases), "budget_bytes": budget,
            "seconds_per_update": sum(t["seconds"] for t in times) / len(times),
            "compute_seconds": sum(t["compute_seconds"] for t in times) / len(times),
            "comm_seconds": sum(t["comm_seconds"] for t in times) / len(times)}


def rank_key(ev: dict[str, Any]) -> tuple:
    """Best first: fits, shortest step (compute, recomputation's extra forwards included, + communication),
    then fewer model-parallel ranks, no recompute, and CP before TP."""
    lay = ev["layout"]
    return (not ev["fits"], round(ev["seconds_per_update"], 3), lay["tp"] * lay["pp"] * lay["cp"],
            lay["recompute"] != "none", lay["pp"], lay["tp"], not lay["sp"])


def plan(w: Workload, gpus: int, gpu: str = "h100", *, tp: int | None = None, pp: int | None = None,
         cp: int | None = None, recompute: str | None = None, mfu: float = DEFAULT_MFU) -> dict[str, Any]:
    """Evaluate every candidate layout; the result is what ``--json`` writes."""
    if gpu not in GPUS:
        raise PlanError(f"--gpu {gpu!r}: choose one of {', '.join(GPUS)}")
    if not 0 < mfu <= 1:
        raise PlanError(f"--mfu {mfu}: a fraction in (0, 1]")
    if w.global_batch is None:  # every layout at the recipe's own global batch
        w = replace(w, global_batch=recipe_global_batch(w, gpus))
    layouts = candidate_layouts(w, gpus, tp, pp, cp, recompute)
    if not layouts:
        fixed = Layout(tp or 1, pp or 1, cp or 1, max(1, gpus // ((tp or 1) * (pp or 1) * (cp or 1))),
                       bool(tp and tp > 1), recompute or "none")
        why = layout_problem(w, fixed, gpus) or "no layout"
        raise PlanError(f"no layout of {gpus} GPUs runs this model with tp={tp} pp={pp} cp={cp}: {why}")
    evals = sorted((evaluate(w, lay, gpu, mfu) for lay in layouts), key=rank_key)
    return {
        "recipe": w.label, "gpus": gpus, "gpu": gpu,
        "model": {"name": w.arch.name, "source": w.arch_source, "params": param_count(w.arch), "experts": w.experts,
                  **asdict(w.arch)},
        "workload": {"mix": w.mix, "tokens": [w.arch.tokens(s) for s, _ in w.mix], "text_len": w.text_len,
                     "micro_batch": w.micro_batch, "global_batch": w.global_batch,
                     "num_micro_batches": w.num_micro_batches, "dtype_bytes": w.dtype_bytes,
                     "student": f"LoRA r{w.lora[0]}" if w.lora else "full", "cfg_scale": w.cfg_scale,
                     "fake_ratio": w.fake_ratio, "sgts": w.sgts, "steps_per_phase": list(w.plan.steps_per_phase),
                     "schedule": w.schedule},
        "assumptions": {"memory_gib": GPUS[gpu]["memory_gib"], "budget_gib": budget_bytes(gpu) / GIB,
                        "bf16_flops": GPUS[gpu]["bf16_flops"], "mfu": mfu, "network": asdict(w.network),
                        "cp_comm": w.cp_comm, "overlap": "none (communication adds to compute)"},
        "layouts": evals,
        "recommended": next((e for e in evals if e["fits"]), None),
    }


# -- report -------------------------------------------------------------------------------------------
def _gib(x: float) -> str:
    return f"{x / GIB:.1f}"


def report(result: dict[str, Any], limit: int = 12) -> str:
    m, wl, asm = result["model"], result["workload"], result["assumptions"]
    lines = [
        f"pdmd plan {result['recipe']}: {result['gpus']} x {result['gpu'].upper()} ({asm['memory_gib']:.0f} GiB, "
        f"budget {asm['budget_gib']:.1f} GiB after reserve), bf16 peak {asm['bf16_flops'] / 1e12:.0f} TFLOP/s, "
        f"MFU {asm['mfu']:.2f}; NVLink {asm['network']['nvlink_gbps']:g} GB/s, InfiniBand {asm['network']['ib_gbps']:g} "
        f"GB/s per GPU x {asm['network']['efficiency']:g}, {asm['network']['gpus_per_node']} GPUs a node, CP by "
        f"{asm['cp_comm']}, no overlap",
        f"model: {m['name']} x {m['experts']} expert(s), {m['params'] / 1e9:.2f}B params each ({m['layers']} layers, "
        f"hidden {m['heads'] * m['head_dim']}, {m['heads']} heads, ffn {m['ffn']}); {m['source']}",
        "workload: " + ", ".join(f"{'x'.join(map(str, s))} ({t} tokens, {wt:.0%})"
                                 for (s, wt), t in zip(wl["mix"], wl["tokens"]))
        + f"; text {wl['text_len']}; micro-batch {wl['micro_batch']}"
        + (f", global batch {wl['global_batch']}" if wl["global_batch"] else f" x {wl['num_micro_batches']} per replica")
        + f"; {wl['student']} student; CFG {wl['cfg_scale']:g}; {wl['fake_ratio']} fake steps per update",
        "",
    ]
    fitting = [e for e in result["layouts"] if e["fits"]]
    shown = result["layouts"][:limit]
    head = ["tp", "pp", "cp", "dp", "sp", "recompute"] + [f"phase {p['phase']} GiB" for p in shown[0]["phases"]]
    if wl.get("schedule") == "interleaved":
        head[6] = "all phases (interleaved) GiB"
    head += ["micro-batch", "compute s", "comm s (tp/cp/pp/dp)", "s / update", "samples / s", "fits"]
    lines.append(f"layouts: {len(fitting)} of {len(result['layouts'])} fit; best first (first {len(shown)}):")
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "---|" * len(head))
    for e in shown:
        lay = e["layout"]
        row = [str(lay[k]) for k in ("tp", "pp", "cp", "dp")] + ["y" if lay["sp"] else "n", lay["recompute"]]
        row += [_gib(p["total"]) for p in e["phases"]]
        sps = sum(t["samples_per_s"] for t in e["times"]) / len(e["times"])
        t0 = e["times"][0]
        parts = "/".join(f"{sum(t['comm'][c] for t in e['times']) / len(e['times']):.1f}" for c in ("tp", "cp", "pp", "dp"))
        row += [f"{t0['micro_batch']} x {t0['micro_batches']}", f"{e['compute_seconds']:.1f}",
                f"{e['comm_seconds']:.1f} ({parts})", f"{e['seconds_per_update']:.1f}", f"{sps:.2f}",
                "yes" if e["fits"] else "no"]
        lines.append("| " + " | ".join(row) + " |")
    best = result["recommended"] or min(result["layouts"], key=lambda e: e["peak_bytes"])
    lay = Layout(**best["layout"])
    lines += ["", ("recommended: " if result["recommended"] else "nothing fits; closest: ") + lay.describe(), ""]
    lines.append("| phase | " + " | ".join(PASS_NAMES.values()) + " | communication | s / update |")
    lines.append("|---|" + "---|" * (len(PASS_NAMES) + 2))
    for k, t in zip((p["phase"] for p in best["phases"]) if len(best["phases"]) == len(best["times"])
                    else range(1, len(best["times"]) + 1), best["times"]):
        lines.append(f"| {k} | " + " | ".join(f"{t['passes'][n]:.1f}" for n in PASS_NAMES)
                     + f" | {t['comm_seconds']:.1f} | {t['seconds']:.1f} |")
    lines += ["", "| phase | role | weights GiB | grads GiB | optimizer GiB | activations GiB |"]
    lines.append("|---|---|---|---|---|---|")
    for p in best["phases"]:
        for r in p["roles"]:
            lines.append(f"| {p['phase']} | {r['role']} | {_gib(r['weights'])} | {_gib(r['grads'])} | "
                         f"{_gib(r['optimizer'])} | {_gib(r['activations'])} |")
        lines.append(f"| {p['phase']} | peak (stage {p['stage']}): static {_gib(p['static'])} + largest pass "
                     f"{_gib(p['transient'])} | | | | **{_gib(p['total'])}** |")
    return "\n".join(lines)


# step_flops' passes, in the order the breakdown table shows them (seconds of compute per update)
PASS_NAMES = {"generator_rollout": "rollout", "generator_teacher": "teacher (cond + uncond)",
              "generator_fake": "fake (no grad)", "generator_student": "student fwd + bwd",
              "fake_rollout": "fake steps' rollouts", "fake_fake_train": "fake fwd + bwd"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help=f"recipe YAML (configs/*.yaml) or a preset: {', '.join(RECIPES)}")
    p.add_argument("--gpus", type=int, required=True, help="GPUs of the whole job")
    p.add_argument("--gpu", default="h100", choices=sorted(GPUS), help="card (memory, bf16 peak)")
    p.add_argument("--tp", type=int, help="fix tensor parallelism (default: enumerate 1..8)")
    p.add_argument("--pp", type=int, help="fix pipeline parallelism (default: enumerate)")
    p.add_argument("--cp", type=int, help="fix context parallelism (default: enumerate)")
    p.add_argument("--recompute", choices=["none", "full"], help="fix activation recomputation (default: both)")
    p.add_argument("--mfu", type=float, default=DEFAULT_MFU, help=f"model FLOP utilisation (default {DEFAULT_MFU})")
    p.add_argument("--mix", help="resolution mix CxFxHxW:weight,... (default: train.latent_shape; presets: theirs)")
    p.add_argument("--global-batch", type=int, help="samples per update, the same for every layout (default: the "
                   "recipe's at its own layout, dp x micro-batch x micro-batches; presets: 64)")
    p.add_argument("--cp-comm", choices=list(CP_COMMS), help="context-parallel attention (default: the recipe's)")
    p.add_argument("--nvlink-gbps", type=float, default=comm.Network.nvlink_gbps, help="GB/s per GPU each way in a node")
    p.add_argument("--ib-gbps", type=float, default=comm.Network.ib_gbps, help="GB/s per GPU across nodes")
    p.add_argument("--gpus-per-node", type=int, default=comm.Network.gpus_per_node)
    p.add_argument("--arch", choices=sorted(PRESETS), help="architecture preset when the teacher is not on disk")
    p.add_argument("--limit", type=int, default=12, help="layouts to list (default 12)")
    p.add_argument("--json", help="write the whole evaluation to this file")
    p.add_argument("overrides", nargs="*", help="dotted recipe overrides, e.g. train.micro_batch_size=2")


def run(args: argparse.Namespace) -> int:
    if args.gpus < 1:
        print("pdmd plan: --gpus must be >= 1", file=sys.stderr)
        return 2
    try:
        w = load_workload(args.config, args.overrides, arch_name=args.arch, mix=args.mix,
                          global_batch=args.global_batch)
        w = replace(w, network=comm.Network(nvlink_gbps=args.nvlink_gbps, ib_gbps=args.ib_gbps,
                                            gpus_per_node=args.gpus_per_node),
                    cp_comm=args.cp_comm or w.cp_comm)
        result = plan(w, args.gpus, args.gpu, tp=args.tp, pp=args.pp, cp=args.cp, recompute=args.recompute,
                      mfu=args.mfu)
    except PlanError as exc:
        print(f"pdmd plan: {exc}", file=sys.stderr)
        return 2
    print(report(result, args.limit))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1, default=str))
        print(f"\nwrote {args.json}")
    return 0 if result["recommended"] else 1
