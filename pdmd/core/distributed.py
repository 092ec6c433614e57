"""Process helpers every layer shares: rank 0 and barrier that also work without a process group (one
process: the demo, the tests), and a free rendezvous port."""

from __future__ import annotations

import socket

import torch.distributed as dist

_HANDED_OUT: set[int] = set()


def is_rank0() -> bool:
    """Rank 0 of the default group, or the only process."""
    return not dist.is_initialized() or dist.get_rank() == 0


def barrier() -> None:
    """Wait for every rank (nothing to wait for without a process group)."""
    if dist.is_initialized():
        dist.barrier()


def free_port(addr: str = "127.0.0.1") -> int:
    """A port nothing listens on now and that this process has not handed out before: commands started
    together must not get the same port between the choice and their bind."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((addr, 0))
            port = sock.getsockname()[1]
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port
    raise RuntimeError("no free port that was not handed out before")
