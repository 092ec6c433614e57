"""Small tensor helpers every layer shares: the dtype names of recipes and exports, relative error."""

from __future__ import annotations

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}  # model.dtype / --dtype names


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64 (``b`` of zero norm counts as 1e-30, so that two zero tensors agree)."""
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()

