"""A run's phase experts as full diffusers state dicts for any model family (Qwen-Image's export).

``RunExperts`` (megatron_adapters/export.py) reads the experts through the trainer's backend and assembles
them on rank 0; its conversion rules and model builds are Wan's. This subclass takes both from the
backend's model family (megatron_adapters/families.py), so the same loading, checks and gathering serve
Qwen-Image.
"""

from __future__ import annotations

import torch

from megatron_adapters.export import RunExperts, _stage


class FamilyRunExperts(RunExperts):
    """The run's experts, built and converted by the backend's model family."""

    def expert_diffusers(self, k: int) -> dict[str, torch.Tensor] | None:
        """Phase k's merged expert as a diffusers state dict of the teacher's class (rank 0; None elsewhere)."""
        model = self.load(k)
        state = {key: v.detach().cpu() for key, v in model.state_dict().items() if not key.endswith("_extra_state")}
        expert = self.run.phases[k - 1].student_expert
        return self._gather(_stage(model), state, self.backend.family.rules(expert))

    def _build(self, expert: int, lora: bool) -> torch.nn.Module:
        from megatron_adapters.lora import LoRAConfig, apply_lora

        model = self.backend.build_model(expert)
        if lora:
            cfg = self.run.lora or {}
            apply_lora(model, LoRAConfig(rank=int(cfg["rank"]), alpha=float(cfg["alpha"]), targets=tuple(cfg["targets"])))
        return model
