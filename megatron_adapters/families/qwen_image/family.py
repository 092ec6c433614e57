"""Qwen-Image as a model family of the backend: one frame, 2x2 latent patches packed into ``[B, S, 4C]``
tokens (as QwenImagePipeline packs them), sigma = t, text plus its padding mask carried inside the text
tensor (pdmd/core/packing.py); the output is unpacked back to ``[B, C, 1, H, W]``."""

from __future__ import annotations

from pathlib import Path

import torch

from megatron_adapters.families.base import ModelFamily, ModelInputs
from megatron_adapters.families.qwen_image.config import QwenImageConfig, transformer_config
from megatron_adapters.families.qwen_image.convert import load_from_diffusers, qwen_image_rules
from megatron_adapters.families.qwen_image.model import build_qwen_image_model
from megatron_adapters.families.qwen_image.specs import layer_spec
from pdmd.core.packing import pack_latents, pack_text, unpack_latents, unpack_text


class QwenImageFamily(ModelFamily):
    kind = "qwen-image"
    class_name = "QwenImageTransformer2DModel"

    def __init__(self, teacher, subfolders) -> None:
        super().__init__(teacher, subfolders)
        cfg = self.configs[0]
        if cfg.in_channels != cfg.patch_size ** 2 * cfg.out_channels:
            raise ValueError(f"the teacher reads {cfg.in_channels} channels per token for {cfg.out_channels} latent "
                             f"channels: Qwen-Image packs {cfg.patch_size}x{cfg.patch_size} patches, so in_channels "
                             f"must be {cfg.patch_size ** 2 * cfg.out_channels} (an edit/conditioned model?)")

    @property
    def text_dim(self) -> int:
        return self.configs[0].joint_attention_dim

    def read_config(self, folder: Path):
        return QwenImageConfig.from_json(folder)

    def tokens(self, latent_shape) -> int:
        _, f, h, w = latent_shape
        p = self.configs[0].patch_size
        if f != 1 or h % p or w % p:
            raise ValueError(f"train.latent_shape={list(latent_shape)}: Qwen-Image makes one frame ([C, 1, H, W]) "
                             f"with H and W multiples of its patch size {p}")
        return (h // p) * (w // p)

    def check_conditioning(self, kind: str | None) -> None:
        if kind not in (None, "none"):
            raise ValueError(f"data.conditioning={kind}: Qwen-Image distillation here is text-to-image only")

    def transformer_config(self, parallel_kwargs, **kwargs):
        return transformer_config(self.configs[0], parallel_kwargs, **kwargs)

    def layer_spec(self, kind: str):
        return layer_spec(kind)

    def build(self, tconfig, expert: int, spec) -> torch.nn.Module:
        return build_qwen_image_model(tconfig, self.configs[expert], spec)

    def load_teacher(self, model, expert: int) -> None:
        load_from_diffusers(model, self.teacher / self.subfolders[expert])

    def rules(self, expert: int) -> list:
        return qwen_image_rules(self.configs[expert])

    def text_input(self, embeds: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return pack_text(embeds, mask)

    def inputs(self, module, x, t, text, cond) -> ModelInputs:
        if cond is not None:
            raise ValueError("Qwen-Image takes no image conditioning here")
        p = self.configs[0].patch_size
        _, _, _, h, w = x.shape
        latents = pack_latents(x, p)
        embeds, mask = unpack_text(text)
        img_shapes = [(1, h // p, w // p)]
        model = getattr(module, "module", module)  # DDP-wrapped roles
        # the p2p tensor between stages is [text; this rank's image tokens]: seq_length counts the text too
        seq_length = model.schedule_seq_length(latents.shape[1], embeds.shape[1])
        return ModelInputs(seq_length, lambda m, idx: m(latents[idx], t[idx], embeds[idx], mask[idx], img_shapes),
                           lambda o: unpack_latents(o, h, w, p))
