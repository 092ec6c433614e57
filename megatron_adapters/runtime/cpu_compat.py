"""Let Megatron-core run on a machine without CUDA (gloo, CPU tensors), for tests and the demo.

Megatron-core assumes CUDA in a few dozen places (see ../shared/MEGATRON_ON_CPU.md). Each
``Redirection`` below replaces one CUDA-only call with its CPU meaning, says why, and names the
megatron-core modules that make the call, so ``tests/test_cpu_compat.py`` notices when megatron-core
stops needing a redirection (its call sites are gone) or starts needing more (the multi-rank tests
fail). ``enable()`` applies them only when CUDA is absent; on a GPU machine it does nothing.

Nothing outside ``megatron_adapters`` imports this module: ``megatron_adapters.runtime.parallel`` calls
``enable()`` before Megatron builds anything.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

_FACTORIES = ("tensor", "zeros", "ones", "empty", "full", "arange", "rand", "randn", "randint",
              "zeros_like", "ones_like", "empty_like", "full_like")


@dataclass(frozen=True)
class Redirection:
    """One CUDA-only call and what it means on CPU."""

    name: str
    reason: str
    sites: tuple[str, ...]  # megatron.core modules that make the call
    pattern: str  # regular expression matching the call as it appears in those modules
    apply: Callable[[], None]


class _NullStream:
    """Stands in for a CUDA stream: on CPU every op is already ordered, so waits are no-ops."""

    def wait_stream(self, stream: Any) -> None:
        return None

    def wait_event(self, event: Any) -> None:
        return None

    def synchronize(self) -> None:
        return None

    def record_event(self, event: Any = None) -> None:
        return None

    def __enter__(self) -> _NullStream:
        return self

    def __exit__(self, *exc: Any) -> None:
        return None


def _is_cuda(device: Any) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    return isinstance(device, str) and device.startswith("cuda")


def _cpu_factory(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> torch.Tensor:
        if _is_cuda(kwargs.get("device")):
            kwargs["device"] = "cpu"
        kwargs.pop("pin_memory", None)
        return fn(*args, **kwargs)

    wrapper._pdmd_cpu_compat = True  # type: ignore[attr-defined]
    return wrapper


def _redirect_factories() -> None:
    for name in _FACTORIES:
        fn = getattr(torch, name)
        if not getattr(fn, "_pdmd_cpu_compat", False):
            setattr(torch, name, _cpu_factory(fn))


def _redirect_current_device() -> None:
    torch.cuda.current_device = lambda: torch.device("cpu")


def _redirect_synchronize() -> None:
    torch.cuda.synchronize = lambda device=None: None


def _redirect_streams() -> None:
    stream = _NullStream()
    torch.cuda.current_stream = lambda device=None: stream
    torch.cuda.default_stream = lambda device=None: stream


def _redirect_tensor_cuda() -> None:
    torch.Tensor.cuda = lambda self, *args, **kwargs: self


def _redirect_type_strings() -> None:
    original = torch.Tensor.type

    def type_(self, dtype=None, non_blocking=False, **kwargs):
        if dtype is None and not kwargs:
            name = original(self)
            if name.startswith("torch.") and not name.startswith("torch.cuda."):
                return "torch.cuda." + name[len("torch."):]
            return name
        return original(self, dtype, non_blocking, **kwargs)

    torch.Tensor.type = type_


def _redirect_rng() -> None:
    from megatron.core.tensor_parallel import random as mp_random

    torch.cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    torch.cuda.set_rng_state = lambda new_state, device="cuda": torch.set_rng_state(new_state)
    torch.cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))
    mp_random._get_cuda_rng_state = lambda device="cuda", clone=False, graph_safe=False: torch.get_rng_state()
    mp_random._set_cuda_rng_state = (
        lambda new_state, device=-1, graph_safe=False: torch.set_rng_state(new_state)
    )


REDIRECTIONS: tuple[Redirection, ...] = (
    Redirection(
        "tensor factories with device='cuda' or pin_memory=True",
        "schedules, gradient clipping, grad buffers, checkpoint exchange and the default attention mask "
        "allocate with a literal device='cuda' (pinned memory needs CUDA too): allocate on CPU instead",
        ("megatron.core.pipeline_parallel.schedules", "megatron.core.optimizer.clip_grads",
         "megatron.core.transformer.utils", "megatron.core.dist_checkpointing.exchange_utils"),
        r"device=['\"]cuda['\"]",
        _redirect_factories,
    ),
    Redirection(
        "torch.cuda.current_device",
        "used as the device of parameters, buffers and activations in ~20 places: that device is the CPU",
        ("megatron.core.transformer.dot_product_attention", "megatron.core.tensor_parallel.layers",
         "megatron.core.distributed.param_and_grad_buffer"),
        r"torch\.cuda\.current_device\(\)",
        _redirect_current_device,
    ),
    Redirection(
        "torch.cuda.synchronize",
        "waits for queued kernels before p2p/checkpoint steps; CPU ops are synchronous",
        ("megatron.core.pipeline_parallel.p2p_communication", "megatron.core.parallel_state"),
        r"torch\.cuda\.synchronize\(\)",
        _redirect_synchronize,
    ),
    Redirection(
        "torch.cuda.current_stream / default_stream",
        "grad-buffer communication orders itself against the compute stream; CPU has one ordered stream",
        ("megatron.core.distributed.param_and_grad_buffer",),
        r"torch\.cuda\.default_stream\(\)",
        _redirect_streams,
    ),
    Redirection(
        "Tensor.cuda",
        "moves tensors to the GPU before collectives and in the optimizer; on CPU they are already there",
        ("megatron.core.optimizer.optimizer", "megatron.core.dist_checkpointing.exchange_utils"),
        r"\.cuda\(\)",
        _redirect_tensor_cuda,
    ),
    Redirection(
        "CUDA RNG state (tensor-parallel RNG tracker)",
        "the model-parallel RNG tracker forks the CUDA generator (attention always forks it, even with "
        "dropout 0); on CPU the default CPU generator plays that role",
        ("megatron.core.tensor_parallel.random",),
        r"torch\.cuda\.get_rng_state\(\)",
        _redirect_rng,
    ),
    Redirection(
        "Tensor.type() type strings",
        "the optimizers accept parameters only if param.type() == 'torch.cuda.FloatTensor' (or Half/BFloat16): "
        "a dtype check written as a CUDA type name; report CPU tensors under the same names",
        ("megatron.core.optimizer.optimizer", "megatron.core.optimizer.distrib_optimizer"),
        r"type\(\) == 'torch\.cuda\.FloatTensor'",
        _redirect_type_strings,
    ),
)

_ENABLED = False


def needed() -> bool:
    """True where CUDA is absent, i.e. where the redirections must be applied."""
    return not torch.cuda.is_available()


def enable() -> bool:
    """Apply every redirection once, only when CUDA is absent. Returns whether they are active."""
    global _ENABLED
    if _ENABLED:
        return True
    if not needed():
        return False
    for redirection in REDIRECTIONS:
        redirection.apply()
    _ENABLED = True
    return True


def is_enabled() -> bool:
    return _ENABLED
