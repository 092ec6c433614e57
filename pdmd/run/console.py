"""A quiet console: the third-party warnings every command would otherwise print, each filtered for a
stated reason (only these messages; anything else still shows). Installed by the command entry points."""

from __future__ import annotations

import os
import sys
import warnings
from typing import Any

from pdmd.core.distributed import is_rank0

# (message regex, category, module regex, why it is safe to hide)
KNOWN_WARNINGS: tuple[tuple[str, type[Warning], str, str], ...] = (
    ("Transformer Engine and Apex are not installed", UserWarning, r"megatron\.",
     "expected without a GPU: megatron-core uses its torch fallbacks (docs/architecture.md, CPU redirections)"),
    ("Apex is not installed", UserWarning, r"megatron\.",
     "the same: megatron-core's torch norm is what the CPU path and the local spec use"),
    ("The .grad attribute of a Tensor that is not a leaf Tensor", UserWarning, r"megatron\.core\.optimizer",
     "megatron-core's optimizer probes every parameter's .grad; frozen LoRA bases are views, never trained"),
    (r"`torch\.distributed\.(reduce_scatter_tensor|all_gather_into_tensor)` is deprecated", FutureWarning,
     r"torch\.distributed", "megatron-core calls torch's older collective names; the results are the same"),
    ("full scope is deprecated", UserWarning, r"megatron\.core\.transformer",
     "megatron-core's own default for cuda_graph_scope; we set no CUDA graphs"),
    ("Already found a `peft_config` attribute in the model", UserWarning, r"peft\.",
     "every phase's LoRA is loaded as its own adapter on one transformer (Qwen-Image --lora-only --verify)"),
    (r"`load_state_dict` is deprecated", FutureWarning, r"megatron\.core\.dist_checkpointing",
     "megatron-core's distributed checkpoint loader calls the old torch API; nothing for a user to change"),
)


def progress_bar(total: int | None, desc: str, unit: str = "it", enabled: bool = True, **kwargs: Any):
    """A tqdm bar on rank 0 of an interactive console; disabled (a no-op object) in batch logs and on other
    ranks, where the commands print one-line summaries instead."""
    from tqdm import tqdm  # lazy: every command imports this module; most never show a bar

    return tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, leave=False,
                disable=not (enabled and is_rank0() and sys.stderr.isatty()), **kwargs)


def quiet_known_warnings() -> None:
    """Filter :data:`KNOWN_WARNINGS`; ``PDMD_DEBUG=1`` keeps them."""
    if debugging():
        return
    for message, category, module, _why in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)


def debugging() -> bool:
    """``PDMD_DEBUG=1``: show tracebacks and third-party warnings."""
    return bool(os.environ.get("PDMD_DEBUG"))


def report_user_error(command: str, exc: BaseException) -> int:
    """Inside an ``except``: a user's mistake as one line on stderr and exit code 2 (never retried), or the
    traceback again with ``PDMD_DEBUG=1``."""
    if debugging():
        raise  # noqa: PLE0704 - re-raises the exception being handled by the caller
    print(f"{command}: {exc}", file=sys.stderr)
    return 2
