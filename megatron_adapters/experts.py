"""A run's phase experts (and LoRA adapters) read from Megatron distributed checkpoints into full diffusers
state dicts, at whatever layout they were saved.

Loading goes through the trainer's backend (``MegatronBackend.load_expert``) at the layout of this
process group: the checkpoints are reshardable, so one process (TP=1, one gloo rank on CPU) is enough when
memory allows; under torchrun each rank loads its TP/PP part and rank 0 assembles the diffusers tensors
with ``diffusers_from_shards`` (the same rule table that imports teachers).

LoRA: the expert checkpoint is the merged student; the adapters live in the phase's last step checkpoint
under ``student.model.*.lora_A/lora_B``. ``lora_A`` of a fused projection (self-attention q/k/v, cross
attention k/v) is shared by its parts, so it is written once per diffusers module; ``lora_B`` is split per
head back into to_q/to_k/to_v exactly as the weight is.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist

from megatron_adapters.backend import MegatronBackend
from megatron_adapters.conversion import Rule, diffusers_from_shards, lora_rules
from megatron_adapters.layers.lora import LoRAConfig, apply_lora
from pdmd.core.conditioning import Conditioning
from pdmd.core.config import ConfigError, load_config
from pdmd.core.distributed import is_rank0
from pdmd.core.errors import ExportError, last_line


class PhaseCheckpoints(Protocol):
    """One finished phase of a run, as far as loading it goes."""

    student_expert: int  # the teacher expert the student started from
    expert_dir: Path  # the merged student (Megatron distributed checkpoint)
    last_step_dir: Path | None  # the newest step checkpoint (holds LoRA adapters)
    steps: int


class FinishedRun(Protocol):
    """What loading a run's experts needs (pdmd/export/layout.py's RunInfo is one)."""

    path: Path
    config: dict[str, Any]
    teacher: Path
    phases: tuple[PhaseCheckpoints, ...]

    @property
    def lora(self) -> dict[str, Any] | None: ...

    def expert_folder(self, e: int) -> Path: ...


def run_config(run: FinishedRun, *, tp: int = 1, pp: int = 1, cp: int = 1, sp: bool = False, spec: str = "local",
               latent_shape: tuple[int, ...] | None = None):
    """The run's training config with the teacher path, layout and (for sampling) latent shape replaced."""

    overrides = [f"model.teacher.path={run.teacher}", f"parallel.tp={tp}", f"parallel.pp={pp}", f"parallel.cp={cp}",
                 f"parallel.sequence_parallel={str(bool(sp)).lower()}", f"model.spec={spec}"]
    if latent_shape is not None:
        overrides.append(f"train.latent_shape=[{','.join(str(int(v)) for v in latent_shape)}]")
    try:
        return load_config(run.config, overrides)
    except ConfigError as exc:
        raise ExportError(f"the config saved in {run.path}/manifest.json does not load here: {exc}") from exc


class RunExperts:
    """The run's phase experts as Megatron models (this rank's part), loaded on demand."""

    def __init__(self, run: FinishedRun, *, tp: int = 1, pp: int = 1, cp: int = 1, sp: bool = False,
                 spec: str = "local", latent_shape: tuple[int, ...] | None = None) -> None:

        self.run = run
        self.backend = MegatronBackend(run_config(run, tp=tp, pp=pp, cp=cp, sp=sp, spec=spec,
                                                     latent_shape=latent_shape))
        self._gloo = None

    @property
    def dtype(self) -> torch.dtype:
        return self.backend.dtype

    def rules(self, k: int) -> list[Rule]:
        """The family's weight rules (Megatron <-> diffusers) of phase k's expert."""
        return self.backend.family.rules(self.run.phases[k - 1].student_expert)

    # -- loading ----------------------------------------------------------------------------------
    def load(self, k: int) -> torch.nn.Module:
        """Phase k's merged expert (kept for :meth:`velocity`)."""
        if k in self.backend.experts:
            return self.backend.experts[k]
        phase = self.run.phases[k - 1]
        try:
            model = self.backend.load_expert(phase.student_expert, phase.expert_dir)
        except BaseException as exc:  # torch's CheckpointException is a BaseException
            if isinstance(exc, KeyboardInterrupt | SystemExit):
                raise
            raise ExportError(self._diagnose(phase.expert_dir, phase.student_expert, "model.", k) or
                              f"phase {k}: loading {phase.expert_dir} failed ({last_line(exc)}): is the checkpoint "
                              "complete? Copy it again or retrain the phase") from exc
        built = _tensor_keys(model.sharded_state_dict(prefix="model."))
        if dist.is_initialized() and dist.get_world_size() > 1:  # each rank builds only its TP/PP part
            every: list[set[str] | None] = [None] * dist.get_world_size()
            dist.all_gather_object(every, built, group=self._gloo_group())
            built = set().union(*every)
        extra = _checkpoint_keys(phase.expert_dir, "model.") - built
        if extra:
            raise ExportError(f"phase {k}: the expert checkpoint has {sorted(extra)[0]!r} ({len(extra)} such keys) that "
                              f"the teacher config {self.run.expert_folder(phase.student_expert)} does not build: "
                              "is --teacher the teacher this run was distilled from?")
        self.backend.experts[k] = model.eval()
        return model

    def _diagnose(self, path: Path, expert: int, prefix: str, k: int, lora: bool = False) -> str | None:
        """Why a checkpoint does not fit the model built from the teacher config (None if no key/shape reason)."""
        model = self._build(expert, lora)
        sharded = model.sharded_state_dict(prefix=prefix)
        meta = _checkpoint_meta(path)
        for sh in sharded.values():
            if not _is_tensor(sh) or (lora and ".lora_" not in sh.key):  # adapters: only they are read
                continue
            if sh.key not in meta:
                return (f"phase {k}: {path} has no {sh.key!r}, which the teacher config "
                        f"{self.run.expert_folder(expert)} needs: is --teacher the run's teacher?")
            if tuple(meta[sh.key]) != tuple(sh.global_shape):
                return (f"phase {k}: {sh.key!r} is {tuple(meta[sh.key])} in {path} but {tuple(sh.global_shape)} for the "
                        f"teacher config {self.run.expert_folder(expert)}: is --teacher the run's teacher?")
        return None

    def _build(self, expert: int, lora: bool) -> torch.nn.Module:
        model = self.backend.build_model(expert)
        if lora:
            cfg = self.run.lora or {}
            apply_lora(model, LoRAConfig(rank=int(cfg["rank"]), alpha=float(cfg["alpha"]), targets=tuple(cfg["targets"])))
        return model

    def lora_state(self, k: int) -> tuple[dict[str, torch.Tensor], tuple[int, int]]:
        """Phase k's adapters from its last step checkpoint: this rank's lora_A/lora_B under local names,
        and this rank's pipeline stage (first block, block count)."""
        from megatron.core import dist_checkpointing

        phase = self.run.phases[k - 1]
        if self.run.lora is None:
            raise ExportError(f"phase {k} trained all parameters (student.lora is null): there are no adapters to "
                              "export; export the merged pipeline instead (without --lora-only)")
        step = phase.last_step_dir
        if step is None or not (step / "metadata.json").is_file():
            raise ExportError(f"phase {k}: its last step checkpoint ({step}) is missing; the LoRA adapters live there "
                              "(the expert checkpoint is merged): export without --lora-only")
        state_file = step / "trainer_state.json"
        if state_file.is_file():
            import json

            saved = json.loads(state_file.read_text()).get("step")
            final = phase.checkpoint_step or phase.steps
            if saved != final:
                raise ExportError(f"phase {k}: {step} is step {saved}, not the phase's final step {final}")
        model = self._build(phase.student_expert, lora=True)
        # the adapters the phase's expert was merged from: the moving average's with student.ema > 0
        prefix = f"{phase.checkpoint_prefix}student.{'ema' if self.run.ema else 'model'}."
        sharded = {key: v for key, v in model.sharded_state_dict(prefix=prefix).items() if ".lora_" in key}
        try:
            loaded = dist_checkpointing.load(sharded, str(step))
        except BaseException as exc:  # torch's CheckpointException is a BaseException
            if isinstance(exc, KeyboardInterrupt | SystemExit):
                raise
            raise ExportError(self._diagnose(step, phase.student_expert, prefix, k, lora=True) or
                              f"phase {k}: reading the adapters from {step} failed (student.lora = {self.run.lora}): "
                              f"{last_line(exc)}") from exc
        # the result also carries the checkpoint's common (non-sharded) state: keep what was asked for
        return {key[len(prefix):]: loaded[key].detach().cpu() for key in sharded}, _stage(model)

    # -- assembling full diffusers tensors on rank 0 ---------------------------------------------
    def _gather(self, stage: tuple[int, int], state: dict[str, torch.Tensor], rules: list[Rule]):
        """Every rank's Megatron tensors to rank 0 (``stage`` = this rank's first block and block count)."""
        from megatron.core import parallel_state as ps

        tp = ps.get_tensor_model_parallel_world_size()
        keep = ps.get_context_parallel_rank() == 0 and ps.get_data_parallel_rank() == 0
        mine = (ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank(), stage,
                state if keep else None)
        if not dist.is_initialized() or dist.get_world_size() == 1:
            items = [mine]
        else:
            items = [None] * dist.get_world_size() if is_rank0() else None
            dist.gather_object(mine, items, dst=0, group=self._gloo_group())
        if not is_rank0():
            return None
        stages: list[tuple[int, int]] = [(0, 0)] * ps.get_pipeline_model_parallel_world_size()
        shards = {}
        for pp_rank, tp_rank, stage, sd in items:
            stages[pp_rank] = stage
            if sd is not None:
                shards[(pp_rank, tp_rank)] = sd
        return diffusers_from_shards(shards, rules, stages, tp)

    def _gloo_group(self):
        """CPU objects travel over gloo whatever the default backend is (NCCL on GPUs)."""
        if self._gloo is None:
            self._gloo = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else dist.group.WORLD
        return self._gloo

    def expert_diffusers(self, k: int) -> dict[str, torch.Tensor] | None:
        """Phase k's merged expert as a diffusers state dict of the teacher's class (rank 0; None elsewhere)."""
        model = self.load(k)
        state = {key: v.detach().cpu() for key, v in model.state_dict().items() if not key.endswith("_extra_state")}
        return self._gather(_stage(model), state, self.rules(k))

    def lora_diffusers(self, k: int) -> dict[str, torch.Tensor] | None:
        """Phase k's adapters in diffusers/peft names (``blocks.0.attn1.to_q.lora_A.weight``), scale folded into B."""
        state, stage = self.lora_state(k)
        scale = float(self.run.lora["alpha"]) / int(self.run.lora["rank"])
        state = {key: v * scale if key.endswith(".lora_B") else v for key, v in state.items()}
        modules = {re.sub(r"^blocks\.\d+\.", "blocks.{i}.", key.rsplit(".", 1)[0]) for key in state}
        try:
            rules = lora_rules(self.rules(k), modules)
        except ValueError as exc:
            raise ExportError(f"phase {k}: {exc}") from exc
        return self._gather(stage, state, rules)

    # -- sampling -----------------------------------------------------------------------------------
    def velocity(self, k: int, x: torch.Tensor, t: torch.Tensor, text: torch.Tensor,
                 cond: Conditioning | None = None) -> torch.Tensor:
        """v of phase k's expert through the trainer's Megatron path (every rank returns it); ``cond`` (image
        conditioning) goes to the backend, which builds the model input and per-token timesteps as in training."""
        self.load(k)
        if cond is None:
            return self.backend.velocity(f"expert:{k}", x, t, text)
        return self.backend.velocity(f"expert:{k}", x, t, text, cond)


def _stage(model: torch.nn.Module) -> tuple[int, int]:
    return model.layer_offset, len(model.blocks)


def _checkpoint_meta(path: Path) -> dict[str, tuple[int, ...]]:
    """Key -> global shape of every tensor in a (torch_dist) Megatron distributed checkpoint."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    meta = FileSystemReader(str(path)).read_metadata().state_dict_metadata
    return {k: tuple(v.size) for k, v in meta.items() if isinstance(v, TensorStorageMetadata)}


def _checkpoint_keys(path: Path, prefix: str) -> set[str]:
    return {k for k in _checkpoint_meta(path) if k.startswith(prefix)}


def _is_tensor(sharded: Any) -> bool:
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    return isinstance(sharded, ShardedTensor)


def _tensor_keys(sharded: dict[str, Any]) -> set[str]:
    return {sh.key for sh in sharded.values() if _is_tensor(sh)}
