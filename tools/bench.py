#!/usr/bin/env python
"""The project's benchmarks: ``python tools/bench.py ENTRY [options]``.

Each entry prints a table and appends a section to docs/benchmarks.md naming the date, the machine,
the versions, the exact command and the figures (``--no-record`` skips that). Entries:

- ``block``: forward and forward+backward of our Wan DiT (Megatron-core, local spec) against diffusers'
  WanTransformer3DModel on the same weights and inputs, timed alternately in one run; ratio of medians
  and the relative error between the two models (a fast but wrong model must not look good).
- ``memory``: bytes of the resident roles per phase vs all roles resident (``tools/bench_memory.py``).
- ``data``: the prompt loader's throughput (``data/bench.py``).

On CPU benchmark with one thread: ``OMP_NUM_THREADS=1 python tools/bench.py block`` (``--threads 1`` is
the default). With CUDA the same entry runs in bf16 on the GPU.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere: import the project's packages
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from pdmd.core.distributed import free_port  # noqa: E402
from pdmd.core.tensors import DTYPES, rel_err  # noqa: E402

DOC = ROOT / "docs" / "benchmarks.md"


@dataclass
class Result:
    """What an entry measured: a title, a table, and lines of context (config, checks) for the record."""

    title: str
    headers: list[str]
    rows: list[list[str]]
    notes: list[str] = field(default_factory=list)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    ok: bool = True  # False: the figures are not to be trusted (e.g. the models disagree); not recorded


@dataclass(frozen=True)
class Entry:
    """One benchmark: its options and the function that runs it."""

    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], Result]
    libraries: tuple[str, ...] = ()  # versions to record besides torch, megatron-core and diffusers


# -- environment and record --------------------------------------------------------------------------
def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (or platform's guess elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(device: torch.device) -> str:
    """CPU model, cores, torch threads used (and the GPU when one ran the benchmark)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    threads = torch.get_num_threads()
    text = f"{cpu_model()}, {cores} cores, {threads} torch thread{'s' if threads != 1 else ''}"
    if device.type == "cuda":
        text = f"{torch.cuda.get_device_name(device)}; host {text}"
    return text


def versions(extra: tuple[str, ...] = ()) -> str:
    """Python, torch, megatron-core, diffusers and ``extra`` distributions, with their versions."""
    parts = [f"Python {platform.python_version()}"]
    for dist in ("torch", "megatron-core", "diffusers", *extra):
        try:
            parts.append(f"{dist} {metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            parts.append(f"{dist} (not installed)")
    return ", ".join(parts)


def load_average() -> float | None:
    """The 1-minute load average (other jobs on a shared machine make timings noisy), if known."""
    try:
        return os.getloadavg()[0]
    except (OSError, AttributeError):
        return None


def git_commit() -> str:
    """Short commit of the working tree, marked ``+dirty`` when it has uncommitted changes."""
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return sha + ("+dirty" if dirty else "")


def command_line(argv: list[str]) -> str:
    """The command as it was run, with the thread environment variables that shaped it."""
    env = [f"{k}={os.environ[k]}" for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS") if k in os.environ]
    return " ".join([*env, "python", "tools/bench.py", *map(shlex.quote, argv)])


def table(headers: list[str], rows: list[list[str]]) -> str:
    """A markdown table (readable as plain text too)."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def section(name: str, result: Result, argv: list[str], device: torch.device, libraries: tuple[str, ...] = (),
            load_at_start: float | None = None) -> str:
    """The markdown section appended to docs/benchmarks.md."""
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    load = [f"{v:.1f} at {when}" for v, when in ((load_at_start, "start"), (load_average(), "end")) if v is not None]
    lines = [
        f"### `{name}`: {result.title} ({now[:10]})",
        "",
        f"- date: {now}, commit {git_commit()}",
        f"- machine: {machine(device)}" + (f"; load average (1 min) {', '.join(load)}" if load else ""),
        f"- versions: {versions(libraries)}",
        f"- command: `{command_line(argv)}`",
        *(f"- {n}" for n in result.notes),
        "",
        table(result.headers, result.rows),
        "",
    ]
    return "\n".join(lines)


def record(text: str, doc: Path = DOC) -> None:
    """Append ``text`` to the benchmarks document, separated by a blank line."""
    existing = doc.read_text() if doc.exists() else "# Benchmarks\n"
    sep = "" if existing.endswith("\n\n") else ("\n" if existing.endswith("\n") else "\n\n")
    doc.write_text(existing + sep + text)


# -- timing -----------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> dict[str, float]:
    """Seconds one call of ``fn`` takes: ``wall`` (device drained before and after) and, on CPU, ``cpu``
    (this process's CPU time: with one thread, the time other jobs held the core is left out)."""
    _sync(device)
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    _sync(device)
    out = {"wall": time.perf_counter() - wall}
    if device.type == "cpu":
        out["cpu"] = time.process_time() - cpu
    return out


def alternate(fns: dict[str, Callable[[], Any]], reps: int, device: torch.device,
              before: Callable[[], None] | None = None) -> dict[str, dict[str, list[float]]]:
    """Time each function ``reps`` times, interleaved (a, b, a, b, ...) so drift hits all of them alike;
    returns name -> clock -> seconds. ``before`` runs untimed before every call (e.g. dropping grads)."""
    times: dict[str, dict[str, list[float]]] = {k: {} for k in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            if before is not None:
                before()
            for clock, seconds in timed(fn, device).items():
                times[name].setdefault(clock, []).append(seconds)
    return times


# -- entry: block -----------------------------------------------------------------------------------
def _block_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--hidden", type=int, default=512, help="model width (heads x head dim)")
    p.add_argument("--heads", type=int, default=4, help="attention heads")
    p.add_argument("--layers", type=int, default=4, help="DiT blocks")
    p.add_argument("--ffn", type=int, default=1536, help="feed-forward width")
    p.add_argument("--frames", type=int, default=8, help="latent frames")
    p.add_argument("--height", type=int, default=32, help="latent height (patch 2)")
    p.add_argument("--width", type=int, default=32, help="latent width (patch 2)")
    p.add_argument("--channels", type=int, default=16, help="latent channels in and out")
    p.add_argument("--text-len", type=int, default=512, help="text tokens (Wan pads prompts to 512)")
    p.add_argument("--text-dim", type=int, default=4096, help="text embedding width (UMT5: 4096)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--reps", type=int, default=7, help="timed repetitions per model and pass")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed repetitions per model and pass first (default 1 on CPU, 3 on CUDA; at least 1: "
                   "the first gives the equality check)")
    p.add_argument("--dtype", choices=["auto", *DTYPES], default="auto", help="auto: fp32 on CPU, bf16 on CUDA")
    p.add_argument("--rtol", type=float, default=None,
                   help="largest rel err of outputs and gradients vs diffusers (default 1e-4 fp32, 5e-2 bf16)")
    p.add_argument("--seed", type=int, default=0)


def _single_process_megatron() -> Any:
    """Megatron's parallel state for one process (TP=PP=CP=1) on this machine."""
    from megatron_adapters.runtime.parallel import ParallelLayout, initialize

    if int(os.environ.get("WORLD_SIZE", "1")) != 1:
        raise SystemExit("bench: the block entry runs in one process; do not launch it with several ranks")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    return initialize(ParallelLayout())


def _block_models(args: argparse.Namespace, ctx: Any, dtype: torch.dtype) -> tuple[Any, torch.nn.Module, Any]:
    """diffusers' model and ours, holding the same weights, on ``ctx.device`` in ``dtype``."""
    from diffusers import WanTransformer3DModel

    from megatron_adapters.conversion import TensorReader
    from megatron_adapters.families.wan.config import WanConfig, transformer_config
    from megatron_adapters.families.wan.convert import load_from_diffusers
    from megatron_adapters.families.wan.model import build_wan_model
    from megatron_adapters.families.wan.specs import local_layer_spec

    if args.hidden % args.heads:
        raise SystemExit(f"bench: --hidden {args.hidden} is not a multiple of --heads {args.heads}")
    cfg_dict = dict(patch_size=(1, 2, 2), num_attention_heads=args.heads, attention_head_dim=args.hidden // args.heads,
                    in_channels=args.channels, out_channels=args.channels, text_dim=args.text_dim, freq_dim=256,
                    ffn_dim=args.ffn, num_layers=args.layers, cross_attn_norm=True,
                    qk_norm="rms_norm_across_heads", eps=1e-6)
    torch.manual_seed(args.seed)
    theirs = WanTransformer3DModel(**cfg_dict)
    with torch.no_grad():  # diffusers' init leaves some tensors trivial (norm weights at 1): perturb all
        for p in theirs.parameters():
            p.add_(0.02 * torch.randn_like(p))
    cfg = WanConfig.from_dict(cfg_dict)
    ours = build_wan_model(transformer_config(cfg, ctx.model_parallel_kwargs()), cfg, local_layer_spec())
    load_from_diffusers(ours, TensorReader(theirs.state_dict()))
    ours, theirs = ours.to(ctx.device).train(), theirs.to(ctx.device).train()
    if dtype != torch.float32:  # both cast whole (no fp32-kept modules on either side): the same treatment
        ours, theirs = ours.to(dtype), theirs.to(dtype)
    return ours, theirs, cfg


def _block_inputs(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(args.seed + 1)
    shape = (args.batch, args.channels, args.frames, args.height, args.width)
    inp = {
        "latents": torch.randn(*shape, generator=g),
        "timestep": torch.rand(args.batch, generator=g) * 1000,
        "text": torch.randn(args.batch, args.text_len, args.text_dim, generator=g),
        "w": torch.randn(*shape, generator=g),
    }
    return {k: v.to(device, dtype if k != "timestep" else torch.float32) for k, v in inp.items()}


def _grads_in_our_layout(ours: torch.nn.Module, grads: dict[str, torch.Tensor], cfg: Any) -> dict[str, torch.Tensor]:
    """diffusers' parameter gradients converted to our parameter names and (fused) layouts."""
    from megatron_adapters.conversion import TensorReader, megatron_shard
    from megatron_adapters.families.wan.convert import wan_rules

    return megatron_shard(TensorReader(grads), wan_rules(cfg), ours.conversion_layout(), dict(ours.named_parameters()))


def _block_flops(args: argparse.Namespace, tokens: int) -> dict[str, float]:
    """Model FLOPs of one forward and one forward+backward of the benchmarked DiT (the batch)."""
    from pdmd.plan.capacity import Arch, forward_flops

    arch = Arch("bench", "wan", layers=args.layers, heads=args.heads, head_dim=args.hidden // args.heads, ffn=args.ffn,
                in_channels=args.channels, out_channels=args.channels, patch=(1, 2, 2), text_dim=args.text_dim)
    fwd = forward_flops(arch, tokens, args.text_len).total * args.batch
    return {"fwd": fwd, "fwd+bwd": 3 * fwd}


# Dense bf16 peaks (NVIDIA data sheets, SXM parts) of the cards the cluster runs on, for MFU.
BF16_PEAK = {"H100": 989.4e12, "H200": 989.4e12, "B200": 2250e12}


def _bf16_peak(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in BF16_PEAK.items() if k in name), None)


def _stats(ts: list[float]) -> tuple[float, float]:
    return statistics.median(ts), min(ts)


def _ms(seconds: float) -> str:
    ms = seconds * 1e3
    return f"{ms:.0f}" if ms >= 100 else f"{ms:.1f}" if ms >= 10 else f"{ms:.2f}"


def run_block(args: argparse.Namespace) -> Result:
    """Time forward and forward+backward of both models; check they compute the same thing."""
    from megatron_adapters.runtime.parallel import shutdown

    ctx = _single_process_megatron()
    try:
        return _run_block(args, ctx)
    finally:
        shutdown()


def _run_block(args: argparse.Namespace, ctx: Any) -> Result:
    device = ctx.device
    dtype = DTYPES[args.dtype] if args.dtype != "auto" else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    warmup = max(1, args.warmup if args.warmup is not None else (3 if device.type == "cuda" else 1))
    rtol = args.rtol if args.rtol is not None else (1e-4 if dtype == torch.float32 else 5e-2)
    ours, theirs, cfg = _block_models(args, ctx, dtype)
    inp = _block_inputs(args, device, dtype)
    tokens = args.frames * (args.height // 2) * (args.width // 2)
    x = inp["latents"].clone().requires_grad_(True)
    models = {"ours": ours, "diffusers": theirs}

    def call(name: str, latents: torch.Tensor) -> torch.Tensor:
        if name == "ours":
            return ours(latents, inp["timestep"], inp["text"])
        return theirs(latents, inp["timestep"], inp["text"], return_dict=False)[0]

    def forward(name: str) -> Callable[[], torch.Tensor]:
        def fn() -> torch.Tensor:
            with torch.no_grad():
                return call(name, inp["latents"])
        return fn

    def train_step(name: str) -> Callable[[], None]:
        def fn() -> None:
            (call(name, x).float() * inp["w"].float()).sum().backward()
        return fn

    def drop_grads() -> None:
        x.grad = None
        for m in models.values():
            m.zero_grad(set_to_none=True)

    # Warm-up, and the equality check on its results (untimed).
    for _ in range(warmup):
        outs = {name: forward(name)() for name in models}
    checks = {"output": rel_err(outs["ours"], outs["diffusers"])}
    for _ in range(warmup):
        grads: dict[str, dict[str, torch.Tensor]] = {}
        for name, model in models.items():
            drop_grads()
            train_step(name)()
            grads[name] = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
            grads[name]["<input>"] = x.grad.clone()
    checks["input grad"] = rel_err(grads["ours"].pop("<input>"), grads["diffusers"].pop("<input>"))
    ref = _grads_in_our_layout(ours, grads["diffusers"], cfg)
    if set(ref) != set(grads["ours"]):
        raise RuntimeError(f"bench: parameters with gradients differ: {sorted(set(ref) ^ set(grads['ours']))[:5]}")
    checks["param grads (worst)"] = max(rel_err(grads["ours"][k], g) for k, g in ref.items())
    drop_grads()

    fns = {"fwd": {n: forward(n) for n in models}, "fwd+bwd": {n: train_step(n) for n in models}}
    errs = {"fwd": checks["output"], "fwd+bwd": max(checks["input grad"], checks["param grads (worst)"])}
    ok = all(v <= rtol for v in checks.values())  # NaN fails too
    flops = _block_flops(args, tokens)
    peak = _bf16_peak(device) if dtype == torch.bfloat16 else None
    rows, rates = [], []
    for phase, pair in fns.items():
        times = alternate(pair, args.reps, device, before=drop_grads if phase == "fwd+bwd" else None)
        for clock in times["ours"]:
            (om, omin), (dm, dmin) = _stats(times["ours"][clock]), _stats(times["diffusers"][clock])
            rows.append([phase, clock, f"{_ms(om)} ({_ms(omin)})", f"{_ms(dm)} ({_ms(dmin)})", f"{om / dm:.3f}x",
                         f"{errs[phase]:.1e}"])
        om, dm = (statistics.median(times[n]["wall"]) for n in ("ours", "diffusers"))
        rates.append(f"{phase} ours {flops[phase] / om / 1e12:.3g}, diffusers {flops[phase] / dm / 1e12:.3g}"
                     + (f" ({flops[phase] / om / peak:.0%} / {flops[phase] / dm / peak:.0%} of the dense bf16 peak)"
                        if peak else ""))
    params = sum(p.numel() for p in ours.parameters())
    notes = [
        f"config: hidden {args.hidden} ({args.heads} heads of {args.hidden // args.heads}), {args.layers} layers, "
        f"ffn {args.ffn}, latents {args.batch}x{args.channels}x{args.frames}x{args.height}x{args.width} "
        f"= {tokens} tokens, text {args.text_len}x{args.text_dim}, {str(dtype).removeprefix('torch.')} on "
        f"{device.type}, {params / 1e6:.1f}M parameters",
        f"timing: {warmup} warm-up + {args.reps} timed repetitions per model and pass, measured alternately "
        "(ours, diffusers, ours, ...); milliseconds, median (min); ratio = ours median / diffusers median; "
        "clock wall = elapsed, cpu = this process's CPU time (excludes time other jobs held the core, "
        "not their cache and memory contention)",
        "rel err ours vs diffusers (warm-up results): " + ", ".join(f"{k} {v:.1e}" for k, v in checks.items())
        + f" (rtol {rtol:g}: {'ok' if ok else 'MISMATCH, the timings compare different functions'})",
        "TFLOP/s (model FLOPs of pdmd.plan.capacity.forward_flops, forward+backward = 3x forward, over the median "
        f"wall time; {flops['fwd'] / 1e12:.3g} TFLOP per forward" + (f", peak {peak / 1e12:.0f} TFLOP/s" if peak else "")
        + "): " + "; ".join(rates),
    ]
    return Result(title="Wan DiT, ours (Megatron-core, local spec) vs diffusers WanTransformer3DModel",
                  headers=["pass", "clock", "ours ms median (min)", "diffusers ms median (min)", "ours / diffusers",
                           "rel err"],
                  rows=rows, notes=notes, device=device, ok=ok)


# -- entry: qwen-block ------------------------------------------------------------------------------
def _qwen_block_arguments(p: argparse.ArgumentParser) -> None:
    from megatron_adapters.families.qwen_image.bench import add_arguments

    add_arguments(p)


def run_qwen_block(args: argparse.Namespace) -> Result:
    """Our Qwen-Image DiT vs diffusers' (megatron_adapters/families/qwen_image/bench.py), same protocol as block."""
    from megatron_adapters.families.qwen_image.bench import bench_qwen_block
    from megatron_adapters.runtime.parallel import shutdown

    ctx = _single_process_megatron()
    try:
        out = bench_qwen_block(args, ctx.device)
    finally:
        shutdown()
    return Result(title=out["title"], headers=out["headers"], rows=out["rows"], notes=out["notes"],
                  device=out.get("device", ctx.device), ok=out["ok"])


# -- entries run by modules of tools/ in one Megatron process: step, memory ---------------------------
def _tools_module(name: str):
    sys.path.insert(0, str(ROOT / "tools"))
    return importlib.import_module(name)


def _in_single_process(module: str, function: str, args: argparse.Namespace) -> Result:
    """Run ``tools/<module>.<function>(args, ctx)`` under a one-process Megatron state, then tear it down."""
    from megatron_adapters.runtime.parallel import shutdown

    ctx = _single_process_megatron()
    try:
        out = getattr(_tools_module(module), function)(args, ctx)
    finally:
        shutdown()
    return Result(title=out["title"], headers=out["headers"], rows=out["rows"], notes=out["notes"],
                  device=out.get("device", ctx.device), ok=out.get("ok", True))


def _step_arguments(p: argparse.ArgumentParser) -> None:
    _tools_module("bench_step").add_arguments(p)


def run_step(args: argparse.Namespace) -> Result:
    """One generator step and one fake step of the tiny recipe, split by part (tools/bench_step.py)."""
    return _in_single_process("bench_step", "bench_step", args)


def _memory_arguments(p: argparse.ArgumentParser) -> None:
    _tools_module("bench_memory").add_arguments(p)


def run_memory(args: argparse.Namespace) -> Result:
    """Resident roles per phase vs all roles resident, LoRA and full students (tools/bench_memory.py)."""
    return _in_single_process("bench_memory", "bench_memory", args)


# -- entry: attention ---------------------------------------------------------------------------------
def _attention_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--heads", type=int, default=40, help="attention heads of the model (A14B: 40)")
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--tokens", type=int, default=32760, help="sequence length (A14B 81 frames 480p: 32760)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--tp", type=int, default=1, help="tensor parallelism: the heads a rank holds")
    p.add_argument("--cp", type=int, nargs="+", default=[1, 2, 4, 8], help="context-parallel sizes to time")
    p.add_argument("--reps", type=int, default=5)


def run_attention(args: argparse.Namespace) -> Result:
    """The attention core one CP rank runs, per CP kind, on this one device: ``all_gather`` attends with its
    s/cp queries over all s keys of its TP rank's heads; ``ulysses`` attends with all s tokens over
    1/cp of those heads (megatron_adapters/layers/attention.py); Transformer Engine's DotProductAttention on
    the Ulysses shapes where TE imports (its own CP modes need several GPUs). Same FLOPs; the kernels'
    efficiency and the K/V memory differ. Communication is pdmd plan's (docs/plan.md)."""
    import torch.nn.functional as F

    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    heads = args.heads // args.tp
    te_attention = None
    try:
        import transformer_engine.pytorch as te  # noqa: F401

        te_attention = te.DotProductAttention
    except Exception:  # noqa: BLE001 - TE missing or broken: its rows are left out, said in the notes
        pass
    rows, ok = [], True
    g = torch.Generator(device=device).manual_seed(0)
    for cp in args.cp:
        if heads % cp or args.tokens % cp:
            rows.append([str(cp), "-", "-", "-", f"{heads} heads / {args.tokens} tokens do not split over cp={cp}"])
            continue
        shapes = {"all_gather": (args.tokens // cp, heads, args.tokens), "ulysses": (args.tokens, heads // cp, args.tokens)}
        fns, tensors = {}, {}
        for kind, (s_q, h, s_k) in shapes.items():
            q = torch.randn(args.batch, h, s_q, args.head_dim, device=device, dtype=dtype, generator=g, requires_grad=True)
            k, v = (torch.randn(args.batch, h, s_k, args.head_dim, device=device, dtype=dtype, generator=g,
                                requires_grad=True) for _ in range(2))
            tensors[kind] = (q, k, v)
            fns[kind] = lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v).sum().backward()
        if te_attention is not None and device.type == "cuda":
            core = te_attention(heads // cp, args.head_dim, qkv_format="bshd", attn_mask_type="no_mask")
            q, k, v = (t.detach().transpose(1, 2).contiguous().requires_grad_(True) for t in tensors["ulysses"])
            fns["te (ulysses shapes)"] = lambda q=q, k=k, v=v, core=core: core(q, k, v).float().sum().backward()
        fns["all_gather"]()  # warm-up (kernel choice, allocator)
        times = alternate(fns, args.reps, device)
        flops = 3.5 * 4 * args.batch * heads * args.tokens * args.tokens * args.head_dim / cp  # the notes say why
        for kind, clocks in times.items():
            med = sorted(clocks["wall"])[len(clocks["wall"]) // 2]
            ok &= math.isfinite(med)
            q_shape = shapes.get(kind.split(" ")[0], shapes["ulysses"])
            rows.append([str(cp), kind, f"[{q_shape[1]} heads, {q_shape[0]} queries, {q_shape[2]} keys]",
                         _ms(med), f"{flops / med / 1e12:.3g}"])
    notes = [f"heads {args.heads} / tp {args.tp} = {heads} per TP rank, head_dim {args.head_dim}, {args.tokens} tokens, "
             f"batch {args.batch}, {dtype}, fwd+bwd, median of {args.reps}",
             "TFLOP/s counts 3.5 x the forward's 4 b h s^2 d / cp (backward 2.5 x forward, as flash attention's "
             "dq, dk, dv and recomputed scores): a yardstick to compare the rows, not the kernel's own count",
             "TE DotProductAttention: " + ("timed" if te_attention is not None and device.type == "cuda"
                                           else "not importable here or no CUDA: left out")]
    return Result(title="attention core per CP rank: all_gather vs ulysses shapes (vs TE where present)",
                  headers=["cp", "kind", "per-rank shape", "fwd+bwd", "TFLOP/s"], rows=rows, notes=notes,
                  device=device, ok=ok)


# -- entry: data ------------------------------------------------------------------------------------
def _data_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", choices=["wan", "qwen-image"], default="wan")
    p.add_argument("--samples", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--num-workers", type=int, default=1)


def run_data(args: argparse.Namespace) -> Result:
    """The prompt loader's throughput (data/bench.py's loader_throughput)."""
    from data.bench import loader_throughput

    r = loader_throughput(args.model, args.samples, args.batch_size, args.num_workers)
    torch.set_num_threads(args.threads)  # loader_throughput sets one thread; report what was asked
    return Result(
        title="prompt loader throughput (synthetic embeddings, one epoch)",
        headers=["model", "samples", "batch", "workers", "samples/s", "first batch s"],
        rows=[[r["model"], str(r["samples"]), f"{r['batch_shape']} {r['dtype']}", str(r["num_workers"]),
               f"{r['samples_per_s']:.0f}", f"{r['first_batch_s']:.2f}"]],
        notes=["read + sha256-check + decode + collate of 64-sample tar shards written just before (dp_size 1)"],
    )


ENTRIES: dict[str, Entry] = {
    "block": Entry("our Wan DiT vs diffusers: fwd and fwd+bwd time, ratio, rel err", _block_arguments, run_block),
    "qwen-block": Entry("our Qwen-Image DiT vs diffusers: fwd and fwd+bwd time, ratio, rel err",
                        _qwen_block_arguments, run_qwen_block),
    "step": Entry("one Phased DMD generator step and one fake step: time by part, overhead vs model passes",
                  _step_arguments, run_step),
    "memory": Entry("memory per phase: resident roles only vs all roles resident, LoRA vs full student",
                    _memory_arguments, run_memory),
    "attention": Entry("the attention core one CP rank runs, all_gather vs ulysses shapes (and TE): fwd+bwd time",
                       _attention_arguments, run_attention),
    "data": Entry("prompt loader throughput (data/bench.py)", _data_arguments, run_data,
                  libraries=("webdataset", "safetensors")),
}


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="python tools/bench.py ENTRY --help lists an entry's options")
    sub = p.add_subparsers(dest="entry", required=True, metavar="ENTRY")
    for name, entry in ENTRIES.items():
        sp = sub.add_parser(name, help=entry.help, description=entry.help)
        entry.add_arguments(sp)
        sp.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
        sp.add_argument("--no-record", action="store_true", help=f"do not append the result to {DOC.relative_to(ROOT)}")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    entry = ENTRIES[args.entry]
    load_at_start = load_average()
    result = entry.run(args)
    print(f"bench {args.entry}: {result.title}")
    for n in result.notes:
        print(f"  {n}")
    print(f"  machine: {machine(result.device)}; {versions(entry.libraries)}")
    print(table(result.headers, result.rows), flush=True)
    if not result.ok:
        print(f"bench {args.entry}: FAILED its correctness check; not recorded", file=sys.stderr)
        return 1
    if not args.no_record:
        record(section(args.entry, result, argv, result.device, entry.libraries, load_at_start))
        print(f"recorded in {DOC.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
