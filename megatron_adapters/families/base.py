"""Model families the trainer's backend can drive: what differs between Wan2.2 and Qwen-Image.

The backend (megatron_adapters/backend.py) owns roles, the pipeline schedule, optimizers and
checkpoints; a family owns everything model-shaped: reading the architecture from the teacher folder,
building one pipeline stage and loading the teacher into it, the conversion rules, and the translation
between the method's view -- latents ``x [B, C, F, H, W]``, time ``t in [0, 1]``, text -- and the
model's inputs and output (:class:`ModelInputs`).

- Wan: the model takes the 5-D latents, ``1000 t`` and zero-padded text; image conditioning changes its
  input channels / per-token timesteps (pdmd/core/conditioning.py).
- Qwen-Image: one frame, 2x2 latent patches packed into ``[B, S, 4C]`` tokens (as QwenImagePipeline packs
  them), ``img_shapes``, sigma = t itself, text plus its padding mask (carried inside the text tensor,
  pdmd/core/packing.py); the output is unpacked back to ``[B, C, 1, H, W]``. The schedule's ``seq_length`` is the
  model's ``schedule_seq_length(S, L)`` so the pipeline p2p shape holds the replicated text too.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pdmd.core.conditioning import Conditioning


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
        self._check_same_architecture()

    def _check_same_architecture(self) -> None:
        """Every expert has the first one's architecture: the Megatron config (widths, heads, layers) is built
        once, from expert 0's, so an expert that differs would be built with the wrong shapes."""
        first = vars(self.configs[0])
        for sub, cfg in zip(self.subfolders[1:], self.configs[1:], strict=True):
            differ = [k for k, v in vars(cfg).items() if first.get(k) != v]
            if differ:
                k = differ[0]
                raise ValueError(f"{self.teacher / sub}/config.json has {k}={vars(cfg)[k]!r} but "
                                 f"{self.teacher / self.subfolders[0]}/config.json has {k}={first.get(k)!r}: every "
                                 "expert of a teacher must have one architecture (is one config.json edited or "
                                 "from another model?)")

    # -- architecture -----------------------------------------------------------------------------
    def read_config(self, folder: Path) -> Any:
        raise NotImplementedError

    @property
    def text_dim(self) -> int:
        """Width of the text embeddings the model takes (what the prompt shards must hold)."""
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
