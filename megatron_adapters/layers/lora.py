"""LoRA on Megatron's tensor-parallel linears, switchable per call.

Why our own and not peft: peft's Megatron LoRA wraps only the plain Megatron linears, has no
sequence-parallel path and no per-call switch; the student here is "teacher + adapters" (one
backbone serves as the real score with adapters off), and its checkpoints must reshard like the rest.

Layout over TP (r = rank):
- Column-parallel base (heads/features split on the output): A [r, in] replicated, B [out/tp, r] split.
- Row-parallel base (input split): A [r, in/tp] split, B [out, r] replicated.
The collectives mirror the base layer's, so TP=2 (with or without SP) computes what TP=1 computes.
Initialisation is TP-invariant: A is drawn as the full matrix from a seed and sliced; B starts at 0.
Checkpoint keys of the base weights do not change (``...linear_qkv.weight``), so a LoRA model loads
the teacher's checkpoint and LoRA checkpoints add ``...lora_A`` / ``...lora_B``.
"""

from __future__ import annotations

import contextlib
import math
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.dist_checkpointing.utils import replace_prefix_for_sharding
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
    reduce_from_tensor_model_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
)
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

# Wan: self/cross attention and FFN; Qwen-Image: both streams' attention (linear_added_* is the text
# stream's) and both MLPs. Modulation projections (img_mod/txt_mod) are not adapted.
DEFAULT_TARGETS = ("linear_qkv", "linear_proj", "linear_q", "linear_kv", "linear_fc1", "linear_fc2",
                   "linear_added_qkv", "linear_added_proj")


@dataclass(frozen=True)
class LoRAConfig:
    rank: int = 64
    alpha: float = 8.0
    targets: tuple[str, ...] = DEFAULT_TARGETS
    seed: int = 0

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"lora.rank={self.rank}: must be >= 1")
        if not self.targets:
            raise ValueError("lora.targets is empty: name the linear layers to adapt, e.g. linear_qkv")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def _parallel_kind(module: torch.nn.Module) -> str | None:
    if isinstance(module, ColumnParallelLinear):
        return "column"
    if isinstance(module, RowParallelLinear):
        return "row"
    name = type(module).__name__  # Transformer Engine's linears, without importing TE here
    if name in ("TEColumnParallelLinear", "TELayerNormColumnParallelLinear"):
        return "column"
    if name == "TERowParallelLinear":
        return "row"
    return None


class LoRAParallelLinear(MegatronModule):
    """base(x) + (alpha / r) * B A x, with TP/SP-correct collectives; ``enabled`` switches the branch."""

    def __init__(self, base: torch.nn.Module, kind: str, cfg: LoRAConfig, name: str) -> None:
        super().__init__(base.config)
        self.base, self.kind, self.scale, self.enabled = base, kind, cfg.scale, True
        tp = parallel_state.get_tensor_model_parallel_world_size()
        tp_rank = parallel_state.get_tensor_model_parallel_rank()
        self.sequence_parallel = bool(getattr(base, "sequence_parallel", False)) and tp > 1
        out_local, in_local = base.weight.shape
        full_in = in_local * tp if kind == "row" else in_local
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + zlib.crc32(name.encode()))
        a_full = torch.empty(cfg.rank, full_in)
        bound = 1.0 / math.sqrt(full_in)  # kaiming_uniform(a=sqrt(5)), as torch.nn.Linear and peft
        a_full.uniform_(-bound, bound, generator=gen)
        dtype, device = base.weight.dtype, base.weight.device
        if kind == "column":
            a, b = a_full, torch.zeros(out_local, cfg.rank)
        else:
            a, b = a_full.chunk(tp, dim=1)[tp_rank], torch.zeros(out_local, cfg.rank)
        self.lora_A = torch.nn.Parameter(a.to(device=device, dtype=dtype).contiguous())
        self.lora_B = torch.nn.Parameter(b.to(device=device, dtype=dtype))
        sharded, replicated = (self.lora_B, self.lora_A) if kind == "column" else (self.lora_A, self.lora_B)
        sharded.tensor_model_parallel, sharded.partition_dim, sharded.partition_stride = True, (0 if kind == "column" else 1), 1
        replicated.tensor_model_parallel = False
        # Under SP the parameter that sees only this rank's tokens gets a partial gradient:
        # finalize_model_grads all-reduces parameters tagged like this over TP.
        (self.lora_A if kind == "column" else self.lora_B).sequence_parallel = self.sequence_parallel
        for p in base.parameters():
            p.requires_grad_(False)

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    def forward(self, x: torch.Tensor):
        out, bias = self.base(x)
        if not self.enabled:
            return out, bias
        a = F.linear(x, self.lora_A)
        if self.kind == "column":
            if self.sequence_parallel:
                a = gather_from_sequence_parallel_region(a, tensor_parallel_output_grad=True)
            else:
                a = copy_to_tensor_model_parallel_region(a)
        elif self.sequence_parallel:
            a = reduce_scatter_to_sequence_parallel_region(a)
        else:
            a = reduce_from_tensor_model_parallel_region(a)
        return out + self.scale * F.linear(a, self.lora_B).to(out.dtype), bias

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None):
        base = self.base.sharded_state_dict(prefix=f"{prefix}base.", sharded_offsets=sharded_offsets, metadata=metadata)
        replace_prefix_for_sharding(base, f"{prefix}base.", prefix)
        axis = {"lora_B": 0} if self.kind == "column" else {"lora_A": 1}
        lora = {"lora_A": self.lora_A, "lora_B": self.lora_B}
        return {**base, **make_sharded_tensors_for_checkpoint(lora, prefix, axis, sharded_offsets)}


def apply_lora(model: torch.nn.Module, cfg: LoRAConfig) -> list[LoRAParallelLinear]:
    """Freeze ``model`` and wrap every targeted parallel linear; returns the wrappers."""
    for p in model.parameters():
        p.requires_grad_(False)
    wrapped = []
    for name, module in list(model.named_modules()):
        if name.rsplit(".", 1)[-1] not in cfg.targets or isinstance(module, LoRAParallelLinear):
            continue
        kind = _parallel_kind(module)
        if kind is None:
            continue
        if kind == "column" and getattr(module, "gather_output", False):
            # The branch below adds B's TP slice to a TP-sliced output; a gathered output needs another path.
            raise ValueError(f"lora.targets: {name} gathers its output over tensor-parallel ranks "
                             "(a modulation projection); LoRA is not supported there, drop it from the targets")
        parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
        wrapper = LoRAParallelLinear(module, kind, cfg, name)
        setattr(parent, name.rsplit(".", 1)[-1], wrapper)
        wrapped.append(wrapper)
    if not wrapped:
        raise ValueError(f"lora.targets {list(cfg.targets)} matched no parallel linear layer of the model")
    return wrapped


def lora_modules(model: torch.nn.Module) -> list[LoRAParallelLinear]:
    return [m for m in model.modules() if isinstance(m, LoRAParallelLinear)]


def set_lora_enabled(model: torch.nn.Module, enabled: bool) -> None:
    for m in lora_modules(model):
        m.enabled = enabled


@contextlib.contextmanager
def lora_disabled(model: torch.nn.Module) -> Iterator[None]:
    """Run the backbone as the frozen teacher: the same weights with adapters switched off."""
    modules = lora_modules(model)
    before = [m.enabled for m in modules]
    for m in modules:
        m.enabled = False
    try:
        yield
    finally:
        for m, flag in zip(modules, before):
            m.enabled = flag
