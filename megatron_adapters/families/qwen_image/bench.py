"""Benchmark: our Qwen-Image DiT (Megatron-core, local spec) against diffusers' QwenImageTransformer2DModel.

Forward and forward+backward on the same weights and inputs, timed alternately in one process
(TP=PP=CP=1), with the relative error between the two models (a fast but wrong model must not look
good). Shaped like ``tools/bench.py``'s ``block`` entry so it hooks in as an entry:
``add_arguments`` fills the entry's parser; ``bench_qwen_block(args, device)`` returns the timings and
checks plus ``title``/``headers``/``rows``/``notes`` for its ``Result``. Megatron's parallel state
must be initialised first (one process).

Default shape: 1024 image + 256 text tokens (a 512 px image, a long prompt), comparable to the Wan
entry's 2048 tokens. At much smaller shapes Megatron's parallel linears show their fixed per-call
cost (custom autograd Function + TP region functions, ~0.2 ms on CPU, 10 calls per block); and with
few blocks the skipped text tail of the last block (see layer.py) weighs more than in the 60-block model.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from megatron_adapters.conversion import TensorReader, megatron_shard
from megatron_adapters.families.qwen_image.config import QwenImageConfig, transformer_config
from megatron_adapters.families.qwen_image.convert import load_from_diffusers, qwen_image_rules
from megatron_adapters.families.qwen_image.model import build_qwen_image_model
from megatron_adapters.families.qwen_image.specs import local_layer_spec
from pdmd.core.tensors import DTYPES, rel_err


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--hidden", type=int, default=512, help="model width (heads x head dim)")
    p.add_argument("--heads", type=int, default=4, help="attention heads (head dim = hidden / heads)")
    p.add_argument("--layers", type=int, default=4, help="dual-stream blocks")
    p.add_argument("--height", type=int, default=64, help="latent height (2x2 patches; 64 -> 1024 image tokens)")
    p.add_argument("--width", type=int, default=64, help="latent width (2x2 patches)")
    p.add_argument("--text-len", type=int, default=256, help="text tokens")
    p.add_argument("--text-pad", type=int, default=64, help="masked (padding) text tokens at the end")
    p.add_argument("--text-dim", type=int, default=3584, help="text embedding width (Qwen2.5-VL 7B: 3584)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--reps", type=int, default=5, help="timed repetitions per model and pass")
    p.add_argument("--warmup", type=int, default=None, help="untimed repetitions per model and pass first (1 CPU, 3 CUDA)")
    p.add_argument("--dtype", choices=["auto", *DTYPES], default="auto", help="auto: fp32 on CPU, bf16 on CUDA")
    p.add_argument("--rtol", type=float, default=None, help="largest rel err ours vs diffusers (1e-4 fp32, 5e-2 bf16)")
    p.add_argument("--seed", type=int, default=0)


def _axes(head_dim: int) -> tuple[int, int, int]:
    """RoPE axes in Qwen-Image's proportions (16, 56, 56 of 128), even, summing to head_dim."""
    f = 2 * max(1, round(head_dim * 16 / 128 / 2))
    hw = (head_dim - f) // 2
    if (head_dim - f) % 2 or hw % 2:
        raise SystemExit(f"bench: head dim {head_dim} does not split into even RoPE axes; pick another --hidden/--heads")
    return f, hw, hw


def _models(args: argparse.Namespace, device: torch.device, dtype: torch.dtype):
    from diffusers import QwenImageTransformer2DModel
    from megatron.core import parallel_state


    if args.hidden % args.heads:
        raise SystemExit(f"bench: --hidden {args.hidden} is not a multiple of --heads {args.heads}")
    head_dim = args.hidden // args.heads
    cfg_dict = dict(patch_size=2, in_channels=64, out_channels=16, num_layers=args.layers, attention_head_dim=head_dim,
                    num_attention_heads=args.heads, joint_attention_dim=args.text_dim, axes_dims_rope=_axes(head_dim))
    torch.manual_seed(args.seed)
    theirs = QwenImageTransformer2DModel(**cfg_dict)
    with torch.no_grad():  # diffusers' init leaves norm weights at 1: perturb all
        for p in theirs.parameters():
            p.add_(0.02 * torch.randn_like(p))
    cfg = QwenImageConfig.from_dict(cfg_dict)
    parallel = dict(tensor_model_parallel_size=1, pipeline_model_parallel_size=1, context_parallel_size=1,
                    sequence_parallel=False, use_cpu_initialization=device.type == "cpu")
    if parallel_state.get_tensor_model_parallel_world_size() != 1:
        raise SystemExit("bench: run in one process (TP=PP=CP=1)")
    ours = build_qwen_image_model(transformer_config(cfg, parallel), cfg, local_layer_spec())
    load_from_diffusers(ours, TensorReader(theirs.state_dict()))
    ours, theirs = ours.to(device).train(), theirs.to(device).train()
    if dtype != torch.float32:  # both cast whole: the same treatment
        ours, theirs = ours.to(dtype), theirs.to(dtype)
    return ours, theirs, cfg


def _inputs(args: argparse.Namespace, cfg, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    g = torch.Generator().manual_seed(args.seed + 1)
    grid = (1, args.height // 2, args.width // 2)
    tokens = grid[1] * grid[2]
    mask = torch.ones(args.batch, args.text_len, dtype=torch.long)
    mask[:, args.text_len - args.text_pad:] = 0
    inp = {
        "latents": torch.randn(args.batch, tokens, cfg.in_channels, generator=g).to(device, dtype),
        "timestep": torch.rand(args.batch, generator=g).to(device),  # sigma in [0, 1]
        "text": (torch.randn(args.batch, args.text_len, cfg.joint_attention_dim, generator=g) * mask[..., None])
        .to(device, dtype),
        "text_mask": mask.to(device),
        "w": torch.randn(args.batch, tokens, cfg.out_features, generator=g).to(device, dtype),
    }
    inp["img_shapes"] = [grid]
    return inp


def _timed(fn: Callable[[], Any], device: torch.device) -> dict[str, float]:
    """``wall`` seconds (device drained) and, on CPU, ``cpu``: this process's CPU time (with one thread,
    robust to other jobs sharing the cores)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    out = {"wall": time.perf_counter() - wall}
    if device.type == "cpu":
        out["cpu"] = time.process_time() - cpu
    return out


def _ms(seconds: float) -> str:
    ms = seconds * 1e3
    return f"{ms:.0f}" if ms >= 100 else f"{ms:.1f}" if ms >= 10 else f"{ms:.2f}"


def bench_qwen_block(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Time fwd and fwd+bwd of both models alternately; check they compute the same thing.

    Returns ``times`` ({pass: {model: {clock: [seconds]}}}), ``ratio`` ({(pass, clock): ours median /
    diffusers median}), ``checks`` (rel errs) and ``title``, ``headers``, ``rows``, ``notes``, ``device``,
    ``ok`` (the models agree within rtol) for a tools/bench.py Result.
    """

    dtype = DTYPES[args.dtype] if args.dtype != "auto" else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    warmup = max(1, args.warmup if args.warmup is not None else (3 if device.type == "cuda" else 1))
    rtol = args.rtol if args.rtol is not None else (1e-4 if dtype == torch.float32 else 5e-2)
    ours, theirs, cfg = _models(args, device, dtype)
    inp = _inputs(args, cfg, device, dtype)
    x = inp["latents"].clone().requires_grad_(True)
    models = {"ours": ours, "diffusers": theirs}

    def call(name: str, latents: torch.Tensor) -> torch.Tensor:
        if name == "ours":
            return ours(latents, inp["timestep"], inp["text"], inp["text_mask"], inp["img_shapes"])
        return theirs(hidden_states=latents, encoder_hidden_states=inp["text"], encoder_hidden_states_mask=inp["text_mask"],
                      timestep=inp["timestep"], img_shapes=[inp["img_shapes"]] * latents.shape[0], return_dict=False)[0]

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

    for _ in range(warmup):  # warm-up, and the equality check on its results (untimed)
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
    ref = megatron_shard(TensorReader(grads["diffusers"]), qwen_image_rules(cfg), ours.conversion_layout(),
                         [k for k in grads["ours"] if k in dict(ours.named_parameters())])
    checks["param grads (worst)"] = max(rel_err(grads["ours"][k], g) for k, g in ref.items() if g.any())
    drop_grads()

    passes = {"fwd": {n: forward(n) for n in models}, "fwd+bwd": {n: train_step(n) for n in models}}
    errs = {"fwd": checks["output"], "fwd+bwd": max(checks["input grad"], checks["param grads (worst)"])}
    ok = all(v <= rtol for v in checks.values())  # NaN fails too
    times: dict[str, dict[str, dict[str, list[float]]]] = {}
    rows, ratio = [], {}
    for phase, fns in passes.items():
        times[phase] = {n: {} for n in fns}
        for _ in range(args.reps):  # interleaved (ours, diffusers, ours, ...): drift hits both alike
            for name, fn in fns.items():
                if phase == "fwd+bwd":
                    drop_grads()
                for clock, seconds in _timed(fn, device).items():
                    times[phase][name].setdefault(clock, []).append(seconds)
        for clock in times[phase]["ours"]:
            o, d = times[phase]["ours"][clock], times[phase]["diffusers"][clock]
            ratio[phase, clock] = statistics.median(o) / statistics.median(d)
            rows.append([phase, clock, f"{_ms(statistics.median(o))} ({_ms(min(o))})",
                         f"{_ms(statistics.median(d))} ({_ms(min(d))})", f"{ratio[phase, clock]:.3f}x",
                         f"{errs[phase]:.1e}"])
    tokens = (args.height // 2) * (args.width // 2)
    params = sum(p.numel() for p in ours.parameters())
    notes = [
        f"config: hidden {args.hidden} ({args.heads} heads of {args.hidden // args.heads}), {args.layers} dual-stream "
        f"blocks, image {args.batch}x{tokens} tokens ({args.height}x{args.width} latent, 2x2 patches), text "
        f"{args.text_len}x{args.text_dim} ({args.text_pad} masked), {str(dtype).removeprefix('torch.')} on "
        f"{device.type}, {params / 1e6:.1f}M parameters",
        f"timing: {warmup} warm-up + {args.reps} timed repetitions per model and pass, measured alternately "
        "(ours, diffusers, ours, ...); milliseconds, median (min); ratio = ours median / diffusers median; "
        "clock wall = elapsed, cpu = this process's CPU time (robust to other jobs on the cores when 1 thread)",
        "rel err ours vs diffusers (warm-up results): " + ", ".join(f"{k} {v:.1e}" for k, v in checks.items())
        + f" (rtol {rtol:g}: {'ok' if ok else 'MISMATCH, the timings compare different functions'})",
    ]
    return dict(times=times, ratio=ratio, checks=checks, notes=notes, rows=rows, device=device, ok=ok,
                title="Qwen-Image DiT, ours (Megatron-core, local spec) vs diffusers QwenImageTransformer2DModel",
                headers=["pass", "clock", "ours ms median (min)", "diffusers ms median (min)", "ours / diffusers",
                         "rel err"])
