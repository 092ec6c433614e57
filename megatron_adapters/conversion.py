"""Declarative diffusers <-> Megatron weight conversion, shared by every model we support.

A model contributes a list of ``Rule``s: one Megatron key, the diffusers key(s) it comes from, and
how it is laid out over tensor-parallel ranks:

- ``replicated``: the same tensor on every TP rank;
- ``column``: split along dim 0 (Column-parallel weights and biases, TP-sharded norms);
- ``row``: split along dim 1 (Row-parallel weights; their bias is ``replicated``);
- ``fused``: several diffusers tensors of ``heads * head_dim`` rows interleaved per head
  ([h0: a, b, c; h1: a, b, c; ...]) and then split along dim 0, so each TP rank holds whole heads.

Keys containing ``{i}`` are per block: ``i`` is the global block index on the diffusers side and the
index within this pipeline stage on the Megatron side. Readers load one tensor (or one slice of it)
at a time, so a rank of a 14B model reads only its own part of a sharded safetensors checkpoint.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open


class ConversionError(ValueError):
    """A checkpoint that does not match the model: the message names the key."""


@dataclass(frozen=True)
class Rule:
    megatron: str
    diffusers: tuple[str, ...]
    kind: str  # replicated | column | row | fused
    head_dim: int | None = None  # for fused

    def __post_init__(self) -> None:
        if self.kind not in ("replicated", "column", "row", "fused"):
            raise ValueError(f"unknown rule kind {self.kind!r}")
        if (self.kind == "fused") != (len(self.diffusers) > 1) or (self.kind == "fused" and not self.head_dim):
            raise ValueError(f"rule {self.megatron}: fused rules take several sources and a head_dim")


@dataclass(frozen=True)
class Layout:
    """Which piece this rank holds: TP rank/size, and the blocks [first, first + count) of its stage."""

    tp_rank: int = 0
    tp: int = 1
    first_block: int = 0
    num_blocks: int = 0
    pre_process: bool = True
    post_process: bool = True


def linear_rules(megatron: str, diffusers: str, kind: str) -> list[Rule]:
    """Weight and bias of one linear; a Row-parallel linear's bias is replicated (added after the sum)."""
    bias_kind = "replicated" if kind == "row" else kind
    return [Rule(f"{megatron}.weight", (f"{diffusers}.weight",), kind),
            Rule(f"{megatron}.bias", (f"{diffusers}.bias",), bias_kind)]


def fused_linear_rules(megatron: str, diffusers: tuple[str, ...], head_dim: int) -> list[Rule]:
    """Weight and bias of a per-head fused projection (e.g. q, k, v) from separate diffusers linears."""
    return [Rule(f"{megatron}.{p}", tuple(f"{d}.{p}" for d in diffusers), "fused", head_dim) for p in ("weight", "bias")]


def same_rules(*keys: str) -> list[Rule]:
    """Tensors with the same name on both sides, replicated over TP."""
    return [Rule(k, (k,), "replicated") for k in keys]


# -- readers ----------------------------------------------------------------------------------------
class TensorReader:
    """Read whole tensors or slices along one dim from a mapping of name -> tensor."""

    def __init__(self, tensors: Mapping[str, torch.Tensor]) -> None:
        self._tensors = tensors

    def keys(self) -> set[str]:
        return set(self._tensors)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._tensors[key].shape)

    def read(self, key: str, dim: int | None = None, start: int = 0, stop: int | None = None) -> torch.Tensor:
        t = self._tensors[key]
        if dim is not None:
            t = t.narrow(dim, start, (stop if stop is not None else t.shape[dim]) - start)
        return t.clone()


class SafetensorsReader(TensorReader):
    """A diffusers model folder: one ``*.safetensors`` file or several with an ``*.index.json``."""

    def __init__(self, folder: str | Path) -> None:
        folder = Path(folder)
        indexes = sorted(folder.glob("*.safetensors.index.json"))
        if indexes:
            weight_map = json.loads(indexes[0].read_text())["weight_map"]
            self._files = {k: folder / v for k, v in weight_map.items()}
        else:
            files = sorted(folder.glob("*.safetensors"))
            if not files:
                raise FileNotFoundError(f"no *.safetensors weights in {folder}")
            self._files = {}
            for f in files:
                with safe_open(f, framework="pt") as handle:
                    self._files.update({k: f for k in handle.keys()})  # noqa: SIM118 - safe_open has no iter
        missing = sorted({str(p) for p in self._files.values() if not p.is_file()})
        if missing:
            raise FileNotFoundError(f"the index of {folder} names missing shard files: {missing}")

    def keys(self) -> set[str]:
        return set(self._files)

    def shape(self, key: str) -> tuple[int, ...]:
        with safe_open(self._files[key], framework="pt") as handle:
            return tuple(handle.get_slice(key).get_shape())

    def read(self, key: str, dim: int | None = None, start: int = 0, stop: int | None = None) -> torch.Tensor:
        with safe_open(self._files[key], framework="pt") as handle:
            if dim is None:
                return handle.get_tensor(key)
            sl = handle.get_slice(key)
            index = [slice(None)] * len(sl.get_shape())
            index[dim] = slice(start, stop)
            return sl[tuple(index)]


# -- diffusers -> Megatron --------------------------------------------------------------------------
def _expand(rules: Iterable[Rule], layout: Layout) -> list[tuple[str, tuple[str, ...], Rule]]:
    """(megatron local key, diffusers keys, rule) for the parameters this rank holds."""
    out = []
    for rule in rules:
        if "{i}" in rule.megatron:
            for local in range(layout.num_blocks):
                g = layout.first_block + local
                out.append((rule.megatron.format(i=local), tuple(k.format(i=g) for k in rule.diffusers), rule))
        else:
            out.append((rule.megatron, rule.diffusers, rule))
    return out


def _chunk(size: int, layout: Layout, what: str) -> tuple[int, int]:
    if size % layout.tp:
        raise ConversionError(f"{what}: size {size} does not split over tp={layout.tp}")
    step = size // layout.tp
    return layout.tp_rank * step, (layout.tp_rank + 1) * step


def megatron_shard(reader: TensorReader, rules: Iterable[Rule], layout: Layout,
                   owned: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
    """The Megatron state dict of one rank, read from a diffusers checkpoint.

    ``owned``: the Megatron keys the rank's model actually has (its stage's modules); rules for
    other keys are skipped. Every diffusers key a rule needs must exist.
    """
    owned_set = set(owned) if owned is not None else None
    available = reader.keys()
    out = {}
    for mkey, dkeys, rule in _expand(rules, layout):
        if owned_set is not None and mkey not in owned_set:
            continue
        for k in dkeys:
            if k not in available:
                raise ConversionError(f"checkpoint is missing {k!r} (needed for {mkey!r})")
        if rule.kind == "replicated":
            out[mkey] = reader.read(dkeys[0])
        elif rule.kind in ("column", "row"):
            dim = 0 if rule.kind == "column" else 1
            start, stop = _chunk(reader.shape(dkeys[0])[dim], layout, dkeys[0])
            out[mkey] = reader.read(dkeys[0], dim, start, stop)
        else:
            parts = []
            for k in dkeys:
                start, stop = _chunk(reader.shape(k)[0], layout, k)
                if (stop - start) % rule.head_dim:
                    raise ConversionError(f"{k}: {reader.shape(k)[0]} rows are not whole heads of {rule.head_dim}")
                t = reader.read(k, 0, start, stop)
                parts.append(t.reshape(-1, rule.head_dim, *t.shape[1:]))
            fused = torch.stack(parts, dim=1)  # [heads, n, head_dim, ...]
            out[mkey] = fused.reshape(-1, *fused.shape[3:])
    return out


def unused_diffusers_keys(reader: TensorReader, rules: Iterable[Rule], num_blocks: int,
                          ignore: Iterable[str] = ()) -> list[str]:
    """Checkpoint keys no rule reads (an unknown key means a model/config mismatch)."""
    used = {k for _, dkeys, _ in _expand(rules, Layout(num_blocks=num_blocks)) for k in dkeys}
    ignored = tuple(ignore)
    return sorted(k for k in reader.keys() - used if not any(part in k for part in ignored))


# -- Megatron -> diffusers --------------------------------------------------------------------------
def diffusers_from_shards(shards: Mapping[tuple[int, int], Mapping[str, torch.Tensor]], rules: Iterable[Rule],
                          stages: list[tuple[int, int]], tp: int) -> dict[str, torch.Tensor]:
    """Reassemble the full diffusers state dict from every rank's Megatron state dict.

    ``shards[(pp_rank, tp_rank)]`` is that rank's state dict; ``stages[pp_rank]`` = (first block,
    number of blocks) of that stage.
    """
    rules = list(rules)
    out: dict[str, torch.Tensor] = {}
    for pp_rank, (first, count) in enumerate(stages):
        layout = Layout(first_block=first, num_blocks=count)
        for mkey, dkeys, rule in _expand(rules, layout):
            pieces = [shards[(pp_rank, r)].get(mkey) for r in range(tp)]
            if pieces[0] is None or dkeys[0] in out:
                continue  # not on this stage, or already taken from an earlier stage (replicas)
            if any(p is None for p in pieces):
                raise ConversionError(f"{mkey!r} is missing on some tensor-parallel ranks of stage {pp_rank}")
            if rule.kind == "replicated":
                out[dkeys[0]] = pieces[0].clone()
            elif rule.kind in ("column", "row"):
                out[dkeys[0]] = torch.cat(pieces, dim=0 if rule.kind == "column" else 1)
            else:
                n = len(dkeys)
                joined = torch.cat([p.reshape(-1, n, rule.head_dim, *p.shape[1:]) for p in pieces], dim=0)
                for j, k in enumerate(dkeys):
                    part = joined[:, j]
                    out[k] = part.reshape(-1, *part.shape[2:]).clone()
    return out


def check_and_load(module: torch.nn.Module, tensors: Mapping[str, torch.Tensor], what: str) -> None:
    """Load ``tensors`` into ``module`` only if they match exactly: every parameter present, no
    unknown key, every shape equal. Nothing is loaded otherwise (never a silent partial load)."""
    expected = {k: v for k, v in module.state_dict().items() if not k.endswith("_extra_state")}
    missing = sorted(set(expected) - set(tensors))
    unknown = sorted(set(tensors) - set(expected))
    if missing:
        raise ConversionError(f"{what}: no value for {missing[0]!r}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    if unknown:
        raise ConversionError(f"{what}: unknown key {unknown[0]!r}" + (f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""))
    for k, v in tensors.items():
        if tuple(v.shape) != tuple(expected[k].shape):
            raise ConversionError(f"{what}: {k!r} has shape {tuple(v.shape)}, the model expects {tuple(expected[k].shape)}")
    with torch.no_grad():
        for k, v in tensors.items():
            expected[k].copy_(v.to(expected[k].dtype))


def load_stage_from_diffusers(model: torch.nn.Module, reader: TensorReader, rules: list[Rule], layout: Layout,
                              num_blocks: int, *, what: str, ignore: Iterable[str] = ()) -> None:
    """Fill one rank's model stage from a diffusers checkpoint, reading only this rank's slices.

    Rejects, before loading anything, a checkpoint with keys no rule explains (``what`` names the
    model in the message), keys a rule needs but the checkpoint lacks, or shapes the model does not have.
    """
    unknown = unused_diffusers_keys(reader, rules, num_blocks, ignore)
    if unknown:
        raise ConversionError(
            f"checkpoint has keys the {what} config does not explain, e.g. {unknown[0]!r} "
            f"({len(unknown)} in all): does config.json belong to these weights?"
        )
    owned = [k for k in model.state_dict() if not k.endswith("_extra_state")]
    check_and_load(model, megatron_shard(reader, rules, layout, owned), f"loading {what} weights")


def lora_rules(weight_rules: list[Rule], modules: set[str]) -> list[Rule]:
    """Rules from our LoRA parameters to diffusers/peft names, derived from a family's weight rules: ``lora_A``
    of a fused or column-parallel module is shared by its parts; ``lora_B`` splits exactly as the weight does."""
    rules: list[Rule] = []
    covered = set()
    for rule in weight_rules:
        module = rule.megatron.removesuffix(".weight")
        if not rule.megatron.endswith(".weight") or module not in modules:
            continue
        covered.add(module)
        targets = [d.removesuffix(".weight") for d in rule.diffusers]
        a_rules = [Rule(f"{module}.lora_A", (f"{d}.lora_A.weight",), "row" if rule.kind == "row" else "replicated")
                   for d in targets]
        b_keys = tuple(f"{d}.lora_B.weight" for d in targets)
        if rule.kind == "fused":
            b_rule = Rule(f"{module}.lora_B", b_keys, "fused", rule.head_dim)
        elif rule.kind == "column":
            b_rule = Rule(f"{module}.lora_B", b_keys, "column")
        elif rule.kind == "row":
            b_rule = Rule(f"{module}.lora_B", b_keys, "replicated")
        else:
            raise ValueError(f"LoRA on {module}, a replicated (not tensor-parallel) weight, has no export rule")
        rules += [*a_rules, b_rule]
    if modules - covered:
        raise ValueError(f"no diffusers name for the LoRA module(s) {sorted(modules - covered)}")
    return rules
