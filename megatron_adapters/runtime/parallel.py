"""Start torch.distributed and Megatron's process groups from torchrun's or Slurm's environment.

One entry point, ``initialize(layout)``: it reads who we are (torchrun: RANK/WORLD_SIZE/LOCAL_RANK;
Slurm srun: SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID with MASTER_ADDR from the job's node list),
validates the layout against the world size (and, when given, the model's sizes) before anything is
built, starts NCCL with CUDA or gloo without, applies the CPU redirections where CUDA is absent, and
initialises Megatron's TP/PP/CP/DP groups and model-parallel RNG.
"""

from __future__ import annotations

import datetime
import os
import re
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from megatron_adapters.runtime import cpu_compat
from pdmd.core.config import CP_COMMS
from pdmd.core.distributed import free_port
from pdmd.core.pipeline_split import pipeline_split, stage_offset


class LayoutError(ValueError):
    """A parallel layout that cannot work with this world size or model; the message names the numbers."""


@dataclass(frozen=True)
class ParallelLayout:
    """Model-parallel sizes. Data parallelism takes whatever is left of the world size."""

    tp: int = 1
    pp: int = 1
    cp: int = 1
    sequence_parallel: bool = False
    vpp: int | None = None  # virtual pipeline stages per rank (interleaved 1F1B)
    pp_layers: tuple[int, ...] | None = None  # blocks per pipeline stage (None: pdmd/core/pipeline_split.py)
    cp_comm: str = "all_gather"  # context-parallel attention: all_gather (K/V) | ulysses (all-to-all over heads)

    @property
    def model_parallel_size(self) -> int:
        return self.tp * self.pp * self.cp


@dataclass(frozen=True)
class LaunchEnv:
    """Who this process is, as the launcher told it."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: str  # "torchrun", "slurm" or "single"


@dataclass
class ParallelContext:
    """What the rest of the code needs to know after initialisation."""

    layout: ParallelLayout
    env: LaunchEnv
    device: torch.device
    backend: str
    tp_rank: int = 0
    pp_rank: int = 0
    cp_rank: int = 0
    dp_rank: int = 0
    dp_size: int = 1
    extra: dict[str, Any] = field(default_factory=dict)

    def model_parallel_kwargs(self) -> dict[str, Any]:
        """Fields of Megatron's ModelParallelConfig that follow from the layout and the backend."""
        on_cpu = self.device.type == "cpu"
        return {
            "tensor_model_parallel_size": self.layout.tp,
            "pipeline_model_parallel_size": self.layout.pp,
            "context_parallel_size": self.layout.cp,
            "virtual_pipeline_model_parallel_size": self.layout.vpp,
            "sequence_parallel": self.layout.sequence_parallel and self.layout.tp > 1,
            # CPU: parameters are created (and split across TP ranks) on the CPU.
            "use_cpu_initialization": on_cpu,
            # gloo matches batched p2p messages out of order under interleaved PP: silently wrong.
            "batch_p2p_comm": self.backend != "gloo",
        }


def expand_first_host(nodelist: str) -> str:
    """First host of a Slurm node list such as ``gpu[003-005,9],cpu1`` (-> ``gpu003``)."""
    nodelist = nodelist.strip()
    if not nodelist:
        raise ValueError("empty Slurm node list (SLURM_JOB_NODELIST)")
    match = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist)
    if match is None:
        raise ValueError(f"cannot parse Slurm node list {nodelist!r}")
    prefix, ranges = match.group(1), match.group(2)
    if ranges is None:
        return prefix
    first = ranges.split(",")[0].split("-")[0]
    return prefix + first


def read_launch_env(environ: dict[str, str] | None = None) -> LaunchEnv:
    """Read rank, world size and rendezvous from torchrun's variables, else Slurm's, else one process."""
    env = dict(os.environ if environ is None else environ)
    if "RANK" in env and "WORLD_SIZE" in env:
        rank, world, local = int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
        launcher = "torchrun"
        addr = env.get("MASTER_ADDR", "127.0.0.1")
        port = int(env.get("MASTER_PORT", 29500))
    elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        rank, world = int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"])
        local = int(env.get("SLURM_LOCALID", 0))
        launcher = "slurm"
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
        if "MASTER_ADDR" in env:
            addr = env["MASTER_ADDR"]
        elif nodelist:
            addr = expand_first_host(nodelist)
        else:
            raise ValueError("Slurm launch without MASTER_ADDR or SLURM_JOB_NODELIST: set MASTER_ADDR")
        # A port derived from the job id keeps two jobs sharing a node from colliding.
        port = int(env.get("MASTER_PORT", 20000 + int(env.get("SLURM_JOB_ID", "0") or 0) % 20000))
    else:
        rank, world, local, launcher = 0, 1, 0, "single"
        addr = env.get("MASTER_ADDR", "127.0.0.1")
        # A free port: two single-process runs (demo, tests, a sampler) on one machine must not collide.
        port = int(env["MASTER_PORT"]) if "MASTER_PORT" in env else free_port(addr)
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"inconsistent launch environment: rank {rank} of world size {world}")
    return LaunchEnv(rank, world, local, addr, port, launcher)


def validate_layout(
    layout: ParallelLayout,
    world_size: int,
    *,
    num_heads: int | None = None,
    num_layers: int | None = None,
    seq_len: int | None = None,
) -> int:
    """Check the layout fits the world and the model; return the data-parallel size."""
    for name, value in (("tp", layout.tp), ("pp", layout.pp), ("cp", layout.cp)):
        if value < 1:
            raise LayoutError(f"parallel.{name}={value}: sizes must be >= 1")
    if world_size % layout.model_parallel_size:
        raise LayoutError(
            f"world size {world_size} is not divisible by tp*pp*cp = {layout.tp}*{layout.pp}*{layout.cp}"
            f" = {layout.model_parallel_size}: change parallel.tp/pp/cp or the number of ranks"
        )
    if num_heads is not None and num_heads % layout.tp:
        raise LayoutError(f"parallel.tp={layout.tp} does not divide the model's {num_heads} attention heads")
    if layout.cp_comm not in CP_COMMS:
        raise LayoutError(f"parallel.cp_comm={layout.cp_comm!r}: choose one of {list(CP_COMMS)}")
    if layout.cp_comm == "ulysses" and num_heads is not None and num_heads % (layout.tp * layout.cp):
        raise LayoutError(f"parallel.cp_comm=ulysses needs tp*cp = {layout.tp * layout.cp} to divide the model's "
                          f"{num_heads} attention heads (each CP rank attends with its share of a TP rank's heads)")
    if num_layers is not None:
        stages = layout.pp * (layout.vpp or 1)
        if (layout.vpp or 1) > 1 and (num_layers % stages or layout.pp_layers is not None):
            raise LayoutError(
                f"the model's {num_layers} layers do not split evenly over pp*vpp = {stages} pipeline stages "
                "(virtual stages need an even split)"
            )
        try:
            pipeline_split(num_layers, layout.pp, layout.pp_layers)
        except ValueError as exc:
            raise LayoutError(str(exc)) from None
    if seq_len is not None:
        shards = layout.cp
        if layout.sequence_parallel and layout.tp > 1:
            shards *= layout.tp
        if seq_len % shards:
            raise LayoutError(
                f"{seq_len} tokens do not split evenly over cp={layout.cp}"
                + (f" x tp={layout.tp} (sequence parallel)" if layout.sequence_parallel else "")
            )
    if layout.vpp is not None and layout.vpp > 1 and layout.pp < 2:
        raise LayoutError(f"parallel.vpp={layout.vpp} needs parallel.pp >= 2 (got {layout.pp})")
    return world_size // layout.model_parallel_size


def initialize(
    layout: ParallelLayout,
    *,
    seed: int = 1234,
    timeout_minutes: float = 10.0,
    num_heads: int | None = None,
    num_layers: int | None = None,
) -> ParallelContext:
    """Start torch.distributed (if not started) and Megatron's parallel state for ``layout``."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    env = read_launch_env()
    world = dist.get_world_size() if dist.is_initialized() else env.world_size
    dp_size = validate_layout(layout, world, num_heads=num_heads, num_layers=num_layers)
    use_cuda = torch.cuda.is_available()
    if use_cuda:
        device = torch.device("cuda", env.local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    else:
        cpu_compat.enable()
        device = torch.device("cpu")
    backend = "nccl" if use_cuda else "gloo"
    if not dist.is_initialized():
        # env:// reuses torchrun's own store when there is one; for Slurm we publish what we derived.
        os.environ.setdefault("MASTER_ADDR", env.master_addr)
        os.environ.setdefault("MASTER_PORT", str(env.master_port))
        dist.init_process_group(
            backend,
            init_method="env://",
            rank=env.rank,
            world_size=env.world_size,
            timeout=datetime.timedelta(minutes=timeout_minutes),
        )
    else:
        backend = dist.get_backend()
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        virtual_pipeline_model_parallel_size=layout.vpp,
        context_parallel_size=layout.cp,
        distributed_timeout_minutes=max(1, int(timeout_minutes)),
    )
    model_parallel_cuda_manual_seed(seed)
    global _PP_LAYERS, _CP_COMM
    _PP_LAYERS, _CP_COMM = layout.pp_layers, layout.cp_comm
    return ParallelContext(
        layout=layout,
        env=env,
        device=device,
        backend=backend,
        tp_rank=parallel_state.get_tensor_model_parallel_rank(),
        pp_rank=parallel_state.get_pipeline_model_parallel_rank(),
        cp_rank=parallel_state.get_context_parallel_rank(),
        dp_rank=parallel_state.get_data_parallel_rank(),
        dp_size=dp_size,
    )


_PP_LAYERS: tuple[int, ...] | None = None  # the initialized layout's parallel.pp_layers
_CP_COMM = "all_gather"  # and its parallel.cp_comm


def cp_comm() -> str:
    """How attention communicates under context parallelism in this process (the initialized layout's)."""
    return _CP_COMM


def stage_layers(num_layers: int) -> tuple[int, int]:
    """(first global block, block count) of this pipeline rank's stage of a ``num_layers`` model: the
    layout's ``pp_layers`` when they are this model's, else pdmd/core/pipeline_split.py's split."""
    from megatron.core import parallel_state

    pp = parallel_state.get_pipeline_model_parallel_world_size()
    given = _PP_LAYERS if _PP_LAYERS is not None and sum(_PP_LAYERS) == num_layers else None
    split = pipeline_split(num_layers, pp, given)
    rank = parallel_state.get_pipeline_model_parallel_rank()
    return stage_offset(split, rank), split[rank]


def shutdown() -> None:
    """Tear down Megatron's groups and the default process group (tests, end of a job)."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
