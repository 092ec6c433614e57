"""Check a converted model against diffusers on the same weights and inputs, at any parallel layout.

Run under torchrun (or srun, or as one process). Global rank 0 builds the diffusers reference model;
every rank builds its stage/shard of ours from the same folder; both run the same seeded inputs
through Megatron's schedule; errors are reduced to rank 0, which prints one line per check and a last
line ``verify_conversion: max_rel_err=<value> PASS`` (or ``FAIL``).

What differs between models (config, inputs, how each side is called) is one small case class per
model; the driver is shared.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.distributed as dist

from pdmd.core.config import CP_COMMS
from pdmd.core.tensors import DTYPES, rel_err


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", choices=list(CASES), required=True)
    p.add_argument("--diffusers", required=True, help="a diffusers pipeline or transformer folder")
    p.add_argument("--subfolder", default=None, help="e.g. transformer or transformer_2 inside a pipeline folder")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--cp", type=int, default=1)
    p.add_argument("--cp-comm", choices=list(CP_COMMS), default=CP_COMMS[0],
                   help="context-parallel attention: gather K/V, or Ulysses' all-to-all over heads")
    p.add_argument("--sp", action="store_true", help="sequence parallel (needs tp > 1)")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    p.add_argument("--rtol", type=float, default=None, help="largest relative error that passes (1e-5 fp32, 2e-2 bf16)")
    p.add_argument("--backward", action="store_true", help="also compare input gradients")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--frames", type=int, default=3, help="latent frames (wan)")
    p.add_argument("--height", type=int, default=16, help="latent height")
    p.add_argument("--width", type=int, default=16, help="latent width")
    p.add_argument("--text-len", type=int, default=32)
    p.add_argument("--text-pad", type=int, default=None,
                   help="qwen-image: padded (masked) text tokens at the end of the last sample (default: a quarter)")
    p.add_argument("--per-token-timesteps", action="store_true", help="wan: TI2V-style timestep per token")
    p.add_argument("--seed", type=int, default=0)


def _folder(args) -> Path:
    folder = Path(args.diffusers) / args.subfolder if args.subfolder else Path(args.diffusers)
    if not (folder / "config.json").is_file():
        hint = ""
        if (folder / "model_index.json").is_file():
            hint = f" (a pipeline folder needs --subfolder {CASES[args.model].subfolders})"
        raise SystemExit(f"verify_conversion: no config.json in {folder}{hint}")
    return folder


class WanCase:
    subfolders = "transformer or transformer_2"

    @staticmethod
    def config(raw: dict):
        # lazy: Megatron loads in seconds; --help stays fast
        from megatron_adapters.families.wan.config import WanConfig

        return WanConfig.from_dict(raw)

    @staticmethod
    def inputs(cfg, args, g: torch.Generator) -> dict[str, torch.Tensor]:
        pt, ph, pw = cfg.patch_size
        tokens = (args.frames // pt) * (args.height // ph) * (args.width // pw)
        inp = {
            "latents": torch.randn(args.batch, cfg.in_channels, args.frames, args.height, args.width, generator=g),
            "timestep": (torch.rand(args.batch, tokens, generator=g) if args.per_token_timesteps
                         else torch.rand(args.batch, generator=g)) * 1000,
            "text": torch.randn(args.batch, args.text_len, cfg.text_dim, generator=g),
            "w": torch.randn(args.batch, cfg.out_channels, args.frames, args.height, args.width, generator=g),
        }
        if cfg.image_dim:
            inp["image"] = torch.randn(args.batch, 257, cfg.image_dim, generator=g)
        return inp

    @staticmethod
    def reference(folder: Path, dtype: torch.dtype):
        from diffusers import WanTransformer3DModel

        return WanTransformer3DModel.from_pretrained(folder, torch_dtype=dtype)

    @staticmethod
    def call_reference(model, inp, latents, dtype):
        image = inp["image"].to(dtype) if "image" in inp else None
        return model(latents, inp["timestep"], inp["text"].to(dtype), encoder_hidden_states_image=image,
                     return_dict=False)[0]

    @staticmethod
    def build(ctx, cfg, folder: Path, dtype: torch.dtype):
        # lazy: Megatron loads in seconds; --help stays fast
        from megatron_adapters.families.wan.config import transformer_config
        from megatron_adapters.families.wan.convert import load_from_diffusers
        from megatron_adapters.families.wan.model import build_wan_model
        from megatron_adapters.families.wan.specs import local_layer_spec

        model = build_wan_model(transformer_config(cfg, ctx.model_parallel_kwargs(), params_dtype=dtype), cfg,
                                local_layer_spec()).to(ctx.device)
        load_from_diffusers(model, folder, cfg)
        return model

    @staticmethod
    def call(model, inp, latents, dtype):
        image = inp["image"].to(dtype) if "image" in inp else None
        return model(latents, inp["timestep"], inp["text"].to(dtype), image=image)

    @staticmethod
    def seq_length(model, inp) -> int:
        return inp["latents"][0, 0].numel() // model.wan.patch_volume


class QwenImageCase:
    subfolders = "transformer"

    @staticmethod
    def config(raw: dict):
        # lazy: Megatron loads in seconds; --help stays fast
        from megatron_adapters.families.qwen_image.config import QwenImageConfig

        return QwenImageConfig.from_dict(raw)

    @staticmethod
    def inputs(cfg, args, g: torch.Generator) -> dict:
        p = cfg.patch_size
        if args.height % p or args.width % p:
            raise SystemExit(f"verify_conversion: latent {args.height}x{args.width} does not divide into {p}x{p} patches")
        grid = (1, args.height // p, args.width // p)
        tokens = grid[1] * grid[2]
        pad = args.text_len // 4 if args.text_pad is None else args.text_pad
        mask = torch.ones(args.batch, args.text_len, dtype=torch.long)
        mask[-1, args.text_len - pad:] = 0
        text = torch.randn(args.batch, args.text_len, cfg.joint_attention_dim, generator=g) * mask[..., None]
        return {
            "latents": torch.randn(args.batch, tokens, cfg.in_channels, generator=g),  # packed 2x2 patches
            "timestep": torch.rand(args.batch, generator=g),  # sigma in [0, 1], as the pipeline passes it
            "text": text,
            "text_mask": mask,
            "img_shapes": grid,
            "w": torch.randn(args.batch, tokens, cfg.out_features, generator=g),
        }

    @staticmethod
    def reference(folder: Path, dtype: torch.dtype):
        from diffusers import QwenImageTransformer2DModel

        return QwenImageTransformer2DModel.from_pretrained(folder, torch_dtype=dtype)

    @staticmethod
    def call_reference(model, inp, latents, dtype):
        return model(hidden_states=latents, encoder_hidden_states=inp["text"].to(dtype),
                     encoder_hidden_states_mask=inp["text_mask"], timestep=inp["timestep"],
                     img_shapes=[[inp["img_shapes"]]] * latents.shape[0], return_dict=False)[0]

    @staticmethod
    def build(ctx, cfg, folder: Path, dtype: torch.dtype):
        # lazy: Megatron loads in seconds; --help stays fast
        from megatron_adapters.families.qwen_image.config import transformer_config
        from megatron_adapters.families.qwen_image.convert import load_from_diffusers
        from megatron_adapters.families.qwen_image.model import build_qwen_image_model
        from megatron_adapters.families.qwen_image.specs import local_layer_spec

        model = build_qwen_image_model(transformer_config(cfg, ctx.model_parallel_kwargs(), params_dtype=dtype), cfg,
                                       local_layer_spec()).to(ctx.device)
        load_from_diffusers(model, folder, cfg)
        return model

    @staticmethod
    def call(model, inp, latents, dtype):
        return model(latents, inp["timestep"], inp["text"].to(dtype), inp["text_mask"], [inp["img_shapes"]])

    @staticmethod
    def seq_length(model, inp) -> int:
        return model.schedule_seq_length(inp["latents"].shape[1], inp["text"].shape[1])


CASES = {"wan": WanCase, "qwen-image": QwenImageCase}


def _reference(case, folder: Path, inp, dtype, backward: bool):
    model = case.reference(folder, dtype).to(inp["latents"].device).eval()
    latents = inp["latents"].to(dtype).clone().requires_grad_(backward)
    with torch.set_grad_enabled(backward):
        out = case.call_reference(model, inp, latents, dtype)
        if backward:
            (out.float() * inp["w"]).sum().backward()
    return out.detach().float(), (latents.grad.float() if backward else None)


def _ours(ctx, case, folder: Path, cfg, inp, dtype, backward: bool):
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    model = case.build(ctx, cfg, folder, dtype)
    for p in model.parameters():
        p.requires_grad_(backward)
    latents = inp["latents"].to(dtype).clone().requires_grad_(backward)
    outputs = []

    def loss_fn(out):
        outputs.append(out.detach().float())
        return (out.float() * inp["w"]).sum(), {}

    def forward_step(_, m):
        return case.call(m, inp, latents, dtype), loss_fn

    get_forward_backward_func()(forward_step_func=forward_step, data_iterator=iter([None]), model=[model],
                                num_microbatches=1, seq_length=case.seq_length(model, inp),
                                micro_batch_size=latents.shape[0], forward_only=not backward)
    out = outputs[0] if outputs else None
    xgrad = None
    if backward and model.pre_process:
        # Each CP rank holds the gradient of its own tokens, scaled by cp (Megatron's loss scaling).
        xgrad = latents.grad.float().clone()
        if ctx.layout.cp > 1:
            dist.all_reduce(xgrad, group=parallel_state.get_context_parallel_group())
            xgrad /= ctx.layout.cp
    return out, xgrad


def run(args: argparse.Namespace) -> int:
    # lazy: Megatron loads in seconds; --help stays fast
    from megatron_adapters.runtime.parallel import (
        ParallelLayout,
        initialize,
    )

    case = CASES[args.model]
    folder = _folder(args)
    cfg = case.config(json.loads((folder / "config.json").read_text()))
    dtype = DTYPES[args.dtype]
    rtol = args.rtol if args.rtol is not None else (1e-5 if dtype == torch.float32 else 2e-2)
    ctx = initialize(ParallelLayout(tp=args.tp, pp=args.pp, cp=args.cp, sequence_parallel=args.sp,
                                    cp_comm=args.cp_comm),
                     num_heads=cfg.num_attention_heads, num_layers=cfg.num_layers)
    torch.manual_seed(args.seed)
    inp = case.inputs(cfg, args, torch.Generator().manual_seed(args.seed))
    inp = {k: v.to(ctx.device) if isinstance(v, torch.Tensor) else v for k, v in inp.items()}
    rank = dist.get_rank()
    ref_out = torch.zeros(inp["w"].shape, device=ctx.device)
    ref_grad = torch.zeros_like(inp["latents"])
    if rank == 0:
        out, grad = _reference(case, folder, inp, dtype, args.backward)
        ref_out.copy_(out)
        if grad is not None:
            ref_grad.copy_(grad)
    dist.broadcast(ref_out, 0)
    dist.broadcast(ref_grad, 0)
    out, xgrad = _ours(ctx, case, folder, cfg, inp, dtype, args.backward)
    errors = torch.full((2,), -1.0, dtype=torch.float64, device=ctx.device)
    if out is not None:
        errors[0] = rel_err(out, ref_out)
    if xgrad is not None:
        errors[1] = rel_err(xgrad, ref_grad)
    dist.all_reduce(errors, op=dist.ReduceOp.MAX)
    worst = errors.max().item()
    passed = worst <= rtol and errors[0] >= 0
    if rank == 0:
        layout = f"tp={args.tp} pp={args.pp} cp={args.cp} ({args.cp_comm}) sp={args.sp} dtype={args.dtype}"
        print(f"verify_conversion: {args.model} {folder} at {layout}, rtol={rtol:g}")
        print(f"  output rel_err={errors[0].item():.3e}")
        if args.backward:
            print(f"  input-grad rel_err={errors[1].item():.3e}")
        print(f"verify_conversion: max_rel_err={worst:.3e} {'PASS' if passed else 'FAIL'}", flush=True)
    return 0 if passed else 1
