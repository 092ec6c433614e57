"""The model backend the method drives: what Phased DMD needs from the networks, and nothing else.

megatron_adapters/backend.py's ``MegatronBackend`` implements it over Megatron-core models of one family
(TP/SP, PP, CP, FP8); pdmd/core/method.py and pdmd/train.py use only these members. Roles: ``teacher`` and
``fake`` (routed per sample to the expert owning t), ``student``, ``expert:j`` (the frozen expert of an
earlier phase j); trainable roles are ``student`` and ``fake{e}``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch

from pdmd.core.conditioning import Conditioning

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (v of the samples idx, idx) -> their mean loss


@runtime_checkable
class Backend(Protocol):
    """Networks by role; every call is collective over the model-parallel group of one replica."""

    @property
    def dp_rank(self) -> int: ...

    @property
    def dp_size(self) -> int: ...

    @property
    def device(self) -> torch.device: ...

    @property
    def text_dim(self) -> int:
        """Width of the text embeddings the model takes (checked against the prompt shards)."""
        ...

    def text_input(self, embeds: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The text tensor the method passes around for a batch (the family decides what travels with it)."""
        ...

    def expert_of(self, t: torch.Tensor) -> torch.Tensor:
        """Which teacher expert owns each time (0 = high noise)."""
        ...

    def setup_phase(self, k: int, student_expert: int, earlier: dict[int, tuple[int, str]],
                    renoise_interval: tuple[float, float]) -> None:
        """Make phase k's roles resident (and only those)."""
        ...

    def setup_interleaved(self, regions: dict[int, tuple[int, tuple[float, float]]]) -> None:
        """Every region's student and fakes resident, trained in turn (LightX2V's arrangement)."""
        ...

    def activate(self, k: int) -> None:
        """Make region k's roles the ones the role names mean."""
        ...

    def velocity(self, role: str, x: torch.Tensor, t: torch.Tensor, text: torch.Tensor,
                 cond: Conditioning | None = None) -> torch.Tensor:
        """v(x, t) of ``role`` without grad."""
        ...

    def set_lr(self, lrs: dict[str, float]) -> None:
        """Learning rates of the next updates: ``{"student": lr, "fake": lr}``."""
        ...

    def train_step(self, role: str, x: torch.Tensor, t: torch.Tensor, text: torch.Tensor, loss_fn: LossFn,
                   cond: Conditioning | None = None) -> dict[str, float]:
        """One optimizer step of a trainable role on the batch-mean ``loss_fn``: {"loss", "grad_norm", "skipped"};
        a non-finite loss or gradient on any rank skips the step on every rank (``skipped`` = 1)."""
        ...

    def params_finite(self) -> bool:
        """Every trainable role's parameters and optimizer state are finite (on every rank)."""
        ...

    def save(self, path: str | Path, extra: dict[str, Any]) -> None:
        """Every trainable role's state (and ``extra``) as a reshardable checkpoint."""
        ...

    def load(self, path: str | Path) -> dict[str, Any]:
        """Restore what :meth:`save` wrote; returns its ``extra``."""
        ...

    def save_expert(self, path: str | Path) -> None:
        """The phase's final student (LoRA merged) as a checkpoint loadable at any layout."""
        ...
