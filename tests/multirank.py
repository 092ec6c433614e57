"""Run a function on N gloo ranks in fresh processes and collect what each returns.

Why a harness of our own: pytest cannot fork into a torch.distributed job, and a failure on one rank
usually leaves the others blocked in a collective. Here the first failure is reported with that rank's
traceback, the other ranks are killed after a short grace period, and a job that hangs is killed at
``timeout`` instead of blocking CI.

Usage::

    def body(rank, world_size, x):       # module-level, so spawn can import it
        ...                               # torch.distributed is initialised (gloo)
        return something_picklable

    results = run_ranks(body, 2, x)       # [result_rank0, result_rank1]

Ranks are forked from a forkserver that has imported torch and Megatron once per pytest session: a
spawned rank spends 5-10 s (more on a loaded 2-core machine) importing them before it does anything,
and the suite starts well over a hundred ranks. Each rank is still a fresh process that has run no test
code; it gets the caller's current environment and working directory, and its output is replayed
into the caller's (captured) stdout.
"""

from __future__ import annotations

import os
import pickle
import queue
import sys
import tempfile
import traceback
from collections.abc import Callable
from typing import Any

import torch.multiprocessing as mp

from pdmd.core.distributed import free_port

# Imported once in the forkserver (import errors there are ignored): what rank functions use most.
PRELOAD = ["torch", "torch.distributed", "megatron.core", "megatron_adapters.backend"]


class RankFailure(AssertionError):
    """A rank raised, or the job timed out; the message carries the rank's traceback."""


def _context():
    """The forkserver context; the server starts (and imports PRELOAD) on the first rank started."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    return ctx


def _child(fn, rank, world_size, port, args, kwargs, results, init_pg, environ, log):
    # The forkserver's own environment and output are those of the moment it started: use the caller's.
    fd = os.open(log, os.O_WRONLY | os.O_APPEND)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    os.environ.clear()
    os.environ.update(environ)
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
        OMP_NUM_THREADS="1",
    )
    try:
        import datetime

        import torch
        import torch.distributed as dist

        torch.set_num_threads(1)
        torch.manual_seed(1234)
        if init_pg:
            dist.init_process_group("gloo", rank=rank, world_size=world_size,
                                    timeout=datetime.timedelta(seconds=120))
        out = fn(rank, world_size, *args, **kwargs)
        # Plain pickle copies tensors by value: torch's queue pickler would pass file descriptors that
        # die with this process.
        results.put((rank, "ok", pickle.dumps(out)))
    except BaseException:  # noqa: BLE001 - report everything to the parent
        results.put((rank, "error", traceback.format_exc()))
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        try:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
        except Exception:  # noqa: BLE001
            pass


def run_ranks(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout: float = 240.0,
    init_process_group: bool = True,
    **kwargs: Any,
) -> list[Any]:
    """Run ``fn(rank, world_size, *args, **kwargs)`` on ``world_size`` spawned gloo ranks.

    Returns the per-rank results in rank order. Raises RankFailure with the first failing rank's
    traceback, or naming the ranks that had not finished when ``timeout`` seconds ran out.
    """
    if not 1 <= world_size <= 4:
        raise ValueError(f"world_size={world_size}: tests use 1 to 4 ranks on this machine")
    ctx = _context()
    results = ctx.Queue()
    port = free_port()
    log_fd, log = tempfile.mkstemp(prefix="pdmd_ranks_", suffix=".log")
    os.close(log_fd)
    environ = dict(os.environ)
    procs = [
        ctx.Process(target=_child, args=(fn, r, world_size, port, args, kwargs, results, init_process_group,
                                         environ, log),
                    daemon=False)  # ranks may start children (checkpoint writers, loaders)
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    out: dict[int, Any] = {}
    import time

    deadline = time.monotonic() + timeout
    failure: str | None = None
    try:
        while len(out) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                missing = sorted(set(range(world_size)) - set(out))
                failure = failure or f"timed out after {timeout:.0f}s; ranks still running: {missing}"
                break
            try:
                rank, status, value = results.get(timeout=min(remaining, 1.0))
            except queue.Empty:
                dead = [r for r, p in enumerate(procs) if r not in out and not p.is_alive()
                        and p.exitcode not in (0, None)]
                if dead and failure is None:
                    failure = f"rank(s) {dead} died with exit codes {[procs[r].exitcode for r in dead]}"
                    deadline = min(deadline, time.monotonic() + 5.0)
                continue
            if status == "error" and failure is None:
                failure = f"rank {rank} of {world_size} failed:\n{value}"
                deadline = min(deadline, time.monotonic() + 5.0)  # grace for the others, then kill
            out[rank] = pickle.loads(value) if status == "ok" else value
    finally:
        for p in procs:
            p.join(timeout=0.5 if failure else 10.0)
            if p.is_alive():
                p.kill()
                p.join()
        with open(log, errors="replace") as f:
            sys.stdout.write(f.read())
        os.unlink(log)
    if failure:
        raise RankFailure(failure)
    return [out[r] for r in range(world_size)]
