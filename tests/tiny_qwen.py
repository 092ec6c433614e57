"""Tiny random diffusers Qwen-Image transformers and seeded inputs for them (with a padded text mask)."""

from __future__ import annotations

import torch

# RoPE axes sum to the head dim; in_channels = 4 x out_channels (2x2 packed latent patches).
CONFIG = dict(patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16,
              num_attention_heads=2, joint_attention_dim=24, axes_dims_rope=(4, 6, 6))
# Image token grids, all of 12 tokens (splits over cp x tp up to 4): one image with an odd height
# (centred RoPE rows), and two images as Qwen-Image-Edit sends them (target + condition image).
CASES = {"t2i": [(1, 3, 4)], "edit": [(1, 2, 4), (1, 2, 2)]}
TEXT_LEN, PAD = 7, 3  # the second sample's last PAD text tokens are padding


def diffusers_model(seed: int = 0, **overrides):
    from diffusers import QwenImageTransformer2DModel

    torch.manual_seed(seed)
    model = QwenImageTransformer2DModel(**{**CONFIG, **overrides}).eval()
    with torch.no_grad():  # diffusers' init leaves norm weights at 1: make every parameter non-trivial
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model


def inputs(case: str, batch: int = 2, seed: int = 1, cfg: dict | None = None) -> dict:
    cfg = cfg or CONFIG
    g = torch.Generator().manual_seed(seed)
    shapes = CASES[case]
    tokens = sum(f * h * w for f, h, w in shapes)
    mask = torch.ones(batch, TEXT_LEN, dtype=torch.long)  # the pipeline's prompt_embeds_mask is int64
    mask[-1, TEXT_LEN - PAD:] = 0
    text = torch.randn(batch, TEXT_LEN, cfg["joint_attention_dim"], generator=g)
    text[-1, TEXT_LEN - PAD:] = 0.0  # padded embeddings are zeros, as the prompt encoder writes them
    return {
        "latents": torch.randn(batch, tokens, cfg["in_channels"], generator=g),
        "timestep": torch.tensor([0.9375, 0.3125, 0.5])[:batch],  # sigma in [0, 1], as the pipeline passes it
        "text": text,
        "text_mask": mask,
        "img_shapes": shapes,
        "w": torch.randn(batch, tokens, cfg["patch_size"] ** 2 * cfg["out_channels"], generator=g),
    }


def diffusers_forward(model, inp: dict, latents: torch.Tensor) -> torch.Tensor:
    batch = latents.shape[0]
    return model(hidden_states=latents, encoder_hidden_states=inp["text"], encoder_hidden_states_mask=inp["text_mask"],
                 timestep=inp["timestep"], img_shapes=[inp["img_shapes"]] * batch, return_dict=False)[0]


def diffusers_reference(model, inp: dict):
    """Output, input gradient and parameter gradients of loss = sum(out * w). Parameters that only feed
    the last block's discarded text output get no gradient in diffusers: zeros here."""
    model.zero_grad(set_to_none=True)
    latents = inp["latents"].clone().requires_grad_(True)
    out = diffusers_forward(model, inp, latents)
    (out * inp["w"]).sum().backward()
    grads = {k: (p.grad.clone() if p.grad is not None else torch.zeros_like(p)) for k, p in model.named_parameters()}
    return out.detach(), latents.grad.clone(), grads


# -- Megatron side (call inside a spawned rank) ---------------------------------------------------
def build_megatron(ctx, cfg_dict, state_dict, spec=None):
    from megatron_adapters.conversion import TensorReader
    from megatron_adapters.families.qwen_image.config import QwenImageConfig, transformer_config
    from megatron_adapters.families.qwen_image.convert import load_from_diffusers
    from megatron_adapters.families.qwen_image.model import build_qwen_image_model
    from megatron_adapters.families.qwen_image.specs import local_layer_spec

    cfg = QwenImageConfig.from_dict(cfg_dict)
    tc = transformer_config(cfg, ctx.model_parallel_kwargs())
    model = build_qwen_image_model(tc, cfg, spec or local_layer_spec())
    load_from_diffusers(model, TensorReader(state_dict))
    return tc, model


def call(model, inp: dict, latents: torch.Tensor) -> torch.Tensor:
    return model(latents, inp["timestep"], inp["text"], inp["text_mask"], inp["img_shapes"])


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

    seq = model.schedule_seq_length(latents.shape[1], inp["text"].shape[1])
    get_forward_backward_func()(forward_step_func=forward_step, data_iterator=iter([None]), model=[ddp],
                                num_microbatches=1, seq_length=seq, micro_batch_size=latents.shape[0],
                                forward_only=False)
    finalize_model_grads([ddp])
    grads = {k: p.main_grad.clone() for k, p in model.named_parameters() if p.requires_grad}
    return (outputs[0] if outputs else None), (latents.grad.clone() if model.pre_process else None), grads
