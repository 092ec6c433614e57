"""The CPU redirections: each is still needed (megatron-core still makes the call and it fails without
CUDA), and each gives the CPU meaning once enabled. That megatron-core needs no MORE than these is
shown by the multi-rank tests, which run the real stack through them."""

from __future__ import annotations

import importlib
import inspect
import re

import pytest
import torch

from megatron_adapters.runtime import cpu_compat
from tests.multirank import run_ranks

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the redirections only apply without CUDA")

CUDA_ONLY_CALLS = {
    "tensor factories with device='cuda' or pin_memory=True": lambda: torch.zeros(1, device="cuda"),
    "torch.cuda.current_device": lambda: torch.cuda.current_device(),
    "torch.cuda.synchronize": lambda: torch.cuda.synchronize(),
    "torch.cuda.current_stream / default_stream": lambda: torch.cuda.default_stream(),
    "Tensor.cuda": lambda: torch.ones(1).cuda(),
    "CUDA RNG state (tensor-parallel RNG tracker)": lambda: torch.cuda.manual_seed(0) or torch.cuda.get_rng_state(),
    "Tensor.type() type strings": lambda: _require(torch.ones(1).type() == "torch.cuda.FloatTensor"),
}


def _require(ok: bool) -> None:
    if not ok:
        raise TypeError("not a CUDA type name")


@pytest.mark.parametrize("redirection", cpu_compat.REDIRECTIONS, ids=lambda r: r.name)
def test_megatron_still_makes_the_call(redirection):
    assert redirection.reason
    for site in redirection.sites:
        source = inspect.getsource(importlib.import_module(site))
        assert re.search(redirection.pattern, source), (
            f"{site} no longer contains {redirection.pattern!r}: is the redirection "
            f"{redirection.name!r} still needed with this megatron-core?"
        )


def test_every_redirection_has_a_cuda_only_probe():
    assert {r.name for r in cpu_compat.REDIRECTIONS} == set(CUDA_ONLY_CALLS)


def _probe(rank, world_size):
    failures_before = {}
    for name, call in CUDA_ONLY_CALLS.items():
        try:
            call()
            failures_before[name] = None
        except Exception as exc:  # noqa: BLE001 - we want to know that it failed
            failures_before[name] = type(exc).__name__
    assert cpu_compat.enable() and cpu_compat.is_enabled()
    pinned = torch.empty(3, pin_memory=True)
    after = {
        "factory_device": torch.zeros(2, device="cuda").device.type,
        "pinned_device": pinned.device.type,
        "current_device": str(torch.cuda.current_device()),
        "sync": torch.cuda.synchronize(),
        "tensor_cuda": torch.ones(1).cuda().device.type,
        "type_names": (torch.ones(1).type(), torch.ones(1, dtype=torch.bfloat16).type(),
                       torch.ones(1).type(torch.float64).dtype == torch.float64),
    }
    torch.manual_seed(5)
    state = torch.cuda.get_rng_state()
    a = torch.rand(3)
    torch.cuda.set_rng_state(state)
    after["rng_replay"] = torch.equal(a, torch.rand(3))
    # Megatron's tensor-parallel RNG tracker forks and restores the (CPU) generator.
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    get_cuda_rng_tracker().add("model-parallel-rng", 7)
    torch.manual_seed(11)
    before = torch.get_rng_state()
    with get_cuda_rng_tracker().fork():
        inside = torch.rand(2)
    after["tracker_restores"] = torch.equal(before, torch.get_rng_state())
    with get_cuda_rng_tracker().fork():
        after["tracker_advances"] = not torch.equal(inside, torch.rand(2))
    return failures_before, after


def test_redirections_only_when_needed_and_cpu_meaning():
    failures_before, after = run_ranks(_probe, 1, init_process_group=False)[0]
    failed = {name for name, err in failures_before.items() if err}
    assert failed == set(CUDA_ONLY_CALLS), f"these no longer fail without CUDA: {set(CUDA_ONLY_CALLS) - failed}"
    assert after == {
        "factory_device": "cpu",
        "pinned_device": "cpu",
        "current_device": "cpu",
        "sync": None,
        "tensor_cuda": "cpu",
        "type_names": ("torch.cuda.FloatTensor", "torch.cuda.BFloat16Tensor", True),
        "rng_replay": True,
        "tracker_restores": True,
        "tracker_advances": True,
    }
