"""Tiny random diffusers Wan transformers shaped like the real variants, and seeded inputs for them."""

from __future__ import annotations

import torch

BASE = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, text_dim=24, freq_dim=32,
            ffn_dim=48, num_layers=2, rope_max_seq_len=64, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
            eps=1e-6)
VARIANTS = {
    # T2V-A14B expert: 16 latent channels in and out.
    "t2v": dict(BASE, in_channels=4, out_channels=4),
    # I2V: noise + mask + image latent in, plus (Wan2.1-style) CLIP image tokens through image K/V.
    "i2v": dict(BASE, in_channels=12, out_channels=4, image_dim=20, added_kv_proj_dim=32),
    # TI2V-5B: 48 channels, one timestep per token.
    "ti2v": dict(BASE, in_channels=6, out_channels=6),
}
TEXT_LEN = {"t2v": 7, "i2v": 512, "ti2v": 5}  # diffusers' Wan I2V splits image tokens off at 512 text tokens
GRIDS = {"odd": (3, 3, 3), "even": (2, 3, 4)}  # latent frames x (height/2) x (width/2)


def diffusers_model(variant: str, seed: int = 0):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    model = WanTransformer3DModel(**VARIANTS[variant]).eval()
    with torch.no_grad():  # diffusers zero-inits nothing, but make every parameter clearly non-trivial
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model


def inputs(variant: str, grid: str, batch: int = 2, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    cfg = VARIANTS[variant]
    f, h, w = GRIDS[grid]
    latents = torch.randn(batch, cfg["in_channels"], f, 2 * h, 2 * w, generator=g)
    tokens = f * h * w
    if variant == "ti2v":
        timestep = torch.rand(batch, tokens, generator=g) * 1000
        timestep[:, : h * w] = 0.0  # first frame is the clean conditioning image
    else:
        timestep = torch.tensor([937.5, 312.0])[:batch]
    out = {
        "latents": latents,
        "timestep": timestep,
        "text": torch.randn(batch, TEXT_LEN[variant], cfg["text_dim"], generator=g),
        "w": torch.randn(batch, cfg["out_channels"], f, 2 * h, 2 * w, generator=g),
    }
    if variant == "i2v":
        out["image"] = torch.randn(batch, 6, cfg["image_dim"], generator=g)
    return out


def diffusers_reference(model, inp: dict[str, torch.Tensor]):
    """Output, input gradient and parameter gradients of loss = sum(out * w)."""
    model.zero_grad(set_to_none=True)
    latents = inp["latents"].clone().requires_grad_(True)
    out = model(latents, inp["timestep"], inp["text"], encoder_hidden_states_image=inp.get("image"),
                return_dict=False)[0]
    (out * inp["w"]).sum().backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    return out.detach(), latents.grad.clone(), grads


# -- Megatron side (call inside a spawned rank) ---------------------------------------------------
def build_megatron(ctx, cfg_dict, state_dict):
    from megatron_adapters.conversion import TensorReader
    from megatron_adapters.families.wan.config import WanConfig, transformer_config
    from megatron_adapters.families.wan.convert import load_from_diffusers
    from megatron_adapters.families.wan.model import build_wan_model
    from megatron_adapters.families.wan.specs import local_layer_spec

    cfg = WanConfig.from_dict(cfg_dict)
    tc = transformer_config(cfg, ctx.model_parallel_kwargs())
    model = build_wan_model(tc, cfg, local_layer_spec())
    load_from_diffusers(model, TensorReader(state_dict))
    return tc, model


def call(model, inp: dict[str, torch.Tensor], latents: torch.Tensor) -> torch.Tensor:
    return model(latents, inp["timestep"], inp["text"], image=inp.get("image"))


def train_step(tc, model, inp):
    """One forward/backward of loss = sum(out * w) through Megatron's schedule, DDP and
    finalize_model_grads; returns (output or None, input grad or None, trainable params' grads)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads
    from megatron.core.pipeline_parallel import get_forward_backward_func

    ddp = DistributedDataParallel(tc, DistributedDataParallelConfig(), module=model)
    latents = inp["latents"].clone().requires_grad_(True)
    outputs = []

    def loss_fn(out):
        outputs.append(out.detach())
        return (out * inp["w"]).sum(), {}

    def forward_step(_, m):
        return call(m, inp, latents), loss_fn

    tokens = latents.shape[2] * latents.shape[3] * latents.shape[4] // 4
    get_forward_backward_func()(forward_step_func=forward_step, data_iterator=iter([None]), model=[ddp],
                                num_microbatches=1, seq_length=tokens, micro_batch_size=latents.shape[0],
                                forward_only=False)
    finalize_model_grads([ddp])
    grads = {k: p.main_grad.clone() for k, p in model.named_parameters() if p.requires_grad}
    return (outputs[0] if outputs else None), (latents.grad.clone() if model.pre_process else None), grads
