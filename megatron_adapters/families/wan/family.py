"""Wan2.2 as a model family of the backend: 5-D latents, ``1000 t``, zero-padded text; image conditioning
changes its input channels and per-token timesteps (pdmd/core/conditioning.py)."""

from __future__ import annotations

from pathlib import Path

import torch

from megatron_adapters.families.base import ModelFamily, ModelInputs
from megatron_adapters.families.wan.config import WanConfig, transformer_config
from megatron_adapters.families.wan.convert import load_from_diffusers, wan_rules
from megatron_adapters.families.wan.model import build_wan_model
from megatron_adapters.families.wan.specs import layer_spec


class WanFamily(ModelFamily):
    kind = "wan"
    class_name = "WanTransformer3DModel"

    @property
    def text_dim(self) -> int:
        return self.configs[0].text_dim

    def read_config(self, folder: Path):
        return WanConfig.from_json(folder)

    def tokens(self, latent_shape) -> int:
        _, f, h, w = latent_shape
        pt, ph, pw = self.configs[0].patch_size
        if f % pt or h % ph or w % pw:
            raise ValueError(f"train.latent_shape={list(latent_shape)} does not divide into patches "
                             f"{self.configs[0].patch_size}")
        return (f // pt) * (h // ph) * (w // pw)

    def check_conditioning(self, kind: str | None) -> None:
        """The teacher's input channels say whether it reads an image (I2V: noise + 4 mask + image latents)."""
        wan = self.configs[0]
        extra = wan.in_channels - wan.out_channels
        if kind in (None, "none", "ti2v") and extra:
            raise ValueError(f"the teacher reads {wan.in_channels} input channels for {wan.out_channels} output ones: "
                             "an image-to-video (I2V) model; set data.conditioning=i2v and use shards written with "
                             "tools/make_prompt_shards.py --conditioning i2v")
        if kind == "i2v" and extra <= 4:
            raise ValueError(f"data.conditioning=i2v but the teacher reads {wan.in_channels} input channels for "
                             f"{wan.out_channels} output ones (I2V-A14B: 36 for 16); is this a text-to-video teacher?")

    def transformer_config(self, parallel_kwargs, **kwargs):
        return transformer_config(self.configs[0], parallel_kwargs, **kwargs)

    def layer_spec(self, kind: str):
        return layer_spec(kind)

    def build(self, tconfig, expert: int, spec) -> torch.nn.Module:
        return build_wan_model(tconfig, self.configs[expert], spec)

    def load_teacher(self, model, expert: int) -> None:
        load_from_diffusers(model, self.teacher / self.subfolders[expert])

    def rules(self, expert: int) -> list:
        return wan_rules(self.configs[expert])

    def inputs(self, module, x, t, text, cond) -> ModelInputs:
        patch = self.configs[0].patch_size
        pt, ph, pw = patch
        tokens = (x.shape[2] // pt) * (x.shape[3] // ph) * (x.shape[4] // pw)  # buckets differ in size
        if cond is not None:  # image conditioning: the model's input and, for TI2V, per-token timesteps
            x, t = cond.model_input(x).to(x.dtype), cond.timesteps(t, patch)
        return ModelInputs(tokens, lambda m, idx: m(x[idx], t[idx] * 1000.0, text[idx]), lambda o: o)
