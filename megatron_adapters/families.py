"""Model families the trainer's backend can drive: what differs between Wan2.2 and Qwen-Image.

The backend (megatron_adapters/backend.py) owns roles, the pipeline schedule, optimizers and
checkpoints; a family owns everything model-shaped: reading the architecture from the teacher folder,
building one pipeline stage and loading the teacher into it, the conversion rules, and the translation
between the method's view -- latents ``x [B, C, F, H, W]``, time ``t in [0, 1]``, text -- and the
model's inputs and output (:class:`ModelInputs`).

- Wan: the model takes the 5-D latents, ``1000 t`` and zero-padded text; image conditioning changes its
  input channels / per-token timesteps (pdmd/conditioning.py).
- Qwen-Image: one frame, 2x2 latent patches packed into ``[B, S, 4C]`` tokens (as QwenImagePipeline packs
  them), ``img_shapes``, sigma = t itself, text plus its padding mask (carried inside the text tensor,
  pdmd/model_io.py); the output is unpacked back to ``[B, C, 1, H, W]``. The schedule's ``seq_length`` is the
  model's ``schedule_seq_length(S, L)`` so the pipeline p2p shape holds the replicated text too.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pdmd.conditioning import Conditioning
from pdmd.model_io import pack_latents, pack_text, unpack_latents, unpack_text


@dataclass
class ModelInputs:
    """One ``_run``'s inputs as the model takes them."""

    seq_length: int  # what Megatron's schedule derives the p2p shape from
    call: Callable[[torch.nn.Module, torch.Tensor], torch.Tensor]  # (module, sample indices) -> model output
    to_velocity: Callable[[torch.Tensor], torch.Tensor]  # last stage's output -> [b, C, F, H, W]


class ModelFamily:
    """Base: one or more teacher experts of one architecture (``configs[e]`` for expert e)."""

    kind = ""
    class_name = ""  # the diffusers transformer class of the teacher's config.json

    def __init__(self, teacher: str | Path, subfolders: list[str]) -> None:
        self.teacher, self.subfolders = Path(teacher), list(subfolders)
        self.configs = [self.read_config(self.teacher / sub) for sub in self.subfolders]

    # -- architecture -----------------------------------------------------------------------------
    def read_config(self, folder: Path) -> Any:
        raise NotImplementedError

    @property
    def num_heads(self) -> int:
        return self.configs[0].num_attention_heads

    @property
    def num_layers(self) -> int:
        return self.configs[0].num_layers

    @property
    def out_channels(self) -> int:
        """Channels of the latents the method sees (the noise, and the velocity)."""
        return self.configs[0].out_channels

    def tokens(self, latent_shape: list[int] | tuple[int, ...]) -> int:
        """Tokens that are split over CP (x TP with SP) for latents [C, F, H, W]; ValueError if they do not patch."""
        raise NotImplementedError

    def check_conditioning(self, kind: str | None) -> None:
        """Refuse image conditioning the teacher cannot read (before anything is built)."""

    # -- building ---------------------------------------------------------------------------------
    def transformer_config(self, parallel_kwargs: dict[str, Any], **kwargs: Any):
        raise NotImplementedError

    def layer_spec(self, kind: str):
        raise NotImplementedError

    def build(self, tconfig, expert: int, spec) -> torch.nn.Module:
        """This pipeline rank's stage of expert ``expert`` with random weights."""
        raise NotImplementedError

    def load_teacher(self, model: torch.nn.Module, expert: int) -> None:
        raise NotImplementedError

    def rules(self, expert: int) -> list:
        """The diffusers <-> Megatron conversion table of expert ``expert``."""
        raise NotImplementedError

    # -- the method's view <-> the model's --------------------------------------------------------
    def text_input(self, embeds: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The text tensor the method passes around for a batch's embeddings and mask."""
        return embeds

    def inputs(self, module: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, text: torch.Tensor,
               cond: Conditioning | None) -> ModelInputs:
        """How ``module`` (this stage of a role, maybe DDP-wrapped) is called on the batch."""
        raise NotImplementedError


class WanFamily(ModelFamily):
    kind = "wan"
    class_name = "WanTransformer3DModel"

    def read_config(self, folder: Path):
        from megatron_adapters.wan.config import WanConfig

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
        from megatron_adapters.wan.config import transformer_config

        return transformer_config(self.configs[0], parallel_kwargs, **kwargs)

    def layer_spec(self, kind: str):
        from megatron_adapters.wan.specs import layer_spec

        return layer_spec(kind)

    def build(self, tconfig, expert: int, spec) -> torch.nn.Module:
        from megatron_adapters.wan.model import build_wan_model

        return build_wan_model(tconfig, self.configs[expert], spec)

    def load_teacher(self, model, expert: int) -> None:
        from megatron_adapters.wan.convert import load_from_diffusers

        load_from_diffusers(model, self.teacher / self.subfolders[expert])

    def rules(self, expert: int) -> list:
        from megatron_adapters.wan.convert import wan_rules

        return wan_rules(self.configs[expert])

    def inputs(self, module, x, t, text, cond) -> ModelInputs:
        patch = self.configs[0].patch_size
        pt, ph, pw = patch
        tokens = (x.shape[2] // pt) * (x.shape[3] // ph) * (x.shape[4] // pw)  # buckets differ in size
        if cond is not None:  # image conditioning: the model's input and, for TI2V, per-token timesteps
            x, t = cond.model_input(x).to(x.dtype), cond.timesteps(t, patch)
        return ModelInputs(tokens, lambda m, idx: m(x[idx], t[idx] * 1000.0, text[idx]), lambda o: o)


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

    def read_config(self, folder: Path):
        from megatron_adapters.qwen_image.config import QwenImageConfig

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
        from megatron_adapters.qwen_image.config import transformer_config

        return transformer_config(self.configs[0], parallel_kwargs, **kwargs)

    def layer_spec(self, kind: str):
        from megatron_adapters.qwen_image.specs import layer_spec

        return layer_spec(kind)

    def build(self, tconfig, expert: int, spec) -> torch.nn.Module:
        from megatron_adapters.qwen_image.model import build_qwen_image_model

        return build_qwen_image_model(tconfig, self.configs[expert], spec)

    def load_teacher(self, model, expert: int) -> None:
        from megatron_adapters.qwen_image.convert import load_from_diffusers

        load_from_diffusers(model, self.teacher / self.subfolders[expert])

    def rules(self, expert: int) -> list:
        from megatron_adapters.qwen_image.convert import qwen_image_rules

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


FAMILIES: dict[str, type[ModelFamily]] = {"wan": WanFamily, "qwen-image": QwenImageFamily}


def family_for(kind: str, teacher: str | Path, subfolders: list[str]) -> ModelFamily:
    if kind not in FAMILIES:
        raise ValueError(f"model.kind={kind!r}: choose one of {sorted(FAMILIES)}")
    return FAMILIES[kind](teacher, subfolders)


def teacher_class(folder: str | Path) -> str | None:
    """The diffusers class a transformer folder's config.json names (None if it names none)."""
    path = Path(folder) / "config.json"
    return json.loads(path.read_text()).get("_class_name") if path.is_file() else None
