"""Writing an export's files: diffusers transformer folders, LoRA files, the scheduler, model_index.json and
the components copied from the base pipeline. No Megatron here: inputs are full diffusers state dicts.

Weights are written with safetensors directly (sharded like ``save_pretrained``: 10 GB files and an index)
instead of through a ``WanTransformer3DModel``, so a 14B expert is never held twice in memory.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from pdmd.core.distributed import barrier, is_rank0
from pdmd.core.tensors import DTYPES
from pdmd.export.layout import (
    COMPONENTS,
    EXPORT_INFO,
    SCHEDULER_CLASS,
    ExportError,
    PhaseInfo,
    RunInfo,
    lora_file,
    read_json,
)

WEIGHTS = "diffusion_pytorch_model{suffix}.safetensors"
MAX_SHARD = "10GB"
# diffusers' WanTransformer3DModel._keep_in_fp32_modules: kept fp32 in the files, as diffusers runs them.
KEEP_FP32 = ("rope", "time_embedder", "scale_shift_table", "norm1", "norm2", "norm3")
IGNORED_TEACHER_KEYS = ("norm_added_q",)  # present in some Wan checkpoints, unused by diffusers


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ExportError(f"--dtype {name!r}: choose one of {sorted(DTYPES)}")
    return DTYPES[name]


def _readable(path: Path) -> None:
    """safetensors writes 0600 files; an export is meant to be shared like save_pretrained's (0644 by umask)."""
    import os

    mask = os.umask(0)
    os.umask(mask)
    path.chmod(0o666 & ~mask)


def _cast(key: str, value: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    keep = value.is_floating_point() and value.dtype == torch.float32 and any(
        part in key.split(".") for part in KEEP_FP32)
    return value.contiguous() if keep or not value.is_floating_point() else value.to(dtype).contiguous()


def check_against_teacher(state: Mapping[str, torch.Tensor], teacher_folder: Path, what: str) -> None:
    """The exported keys and shapes must be exactly the teacher transformer's (a layout mismatch otherwise)."""
    shapes = safetensors_shapes(teacher_folder)
    expected = {k for k in shapes if not any(p in k for p in IGNORED_TEACHER_KEYS)}
    missing, unknown = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unknown:
        key = (missing or unknown)[0]
        raise ExportError(f"{what}: {'no value for' if missing else 'unexpected key'} {key!r} compared with the teacher "
                          f"transformer {teacher_folder} ({len(missing)} missing, {len(unknown)} unexpected): the run's "
                          "checkpoint and this teacher config do not match")
    for k, v in state.items():
        if tuple(v.shape) != shapes[k]:
            raise ExportError(f"{what}: {k!r} has shape {tuple(v.shape)}, the teacher {teacher_folder} has "
                              f"{shapes[k]}: the run's checkpoint and this teacher config do not match")


def safetensors_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    """Key -> shape of every tensor in a diffusers model folder (one file or several), without reading data."""
    from safetensors import safe_open

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ExportError(f"no *.safetensors weights in {folder}")
    shapes: dict[str, tuple[int, ...]] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as handle:
            for k in handle.keys():  # noqa: SIM118 - safe_open has no __iter__
                shapes[k] = tuple(handle.get_slice(k).get_shape())
    return shapes


def write_transformer(folder: Path, state: Mapping[str, torch.Tensor], config_dir: Path, dtype: torch.dtype) -> None:
    """A diffusers WanTransformer3DModel folder: the teacher's config.json and the weights, sharded at 10 GB."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    config = json.loads((config_dir / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    tensors = {k: _cast(k, v, dtype) for k, v in state.items()}
    split = split_torch_state_dict_into_shards(tensors, filename_pattern=WEIGHTS, max_shard_size=MAX_SHARD)
    for old in folder.glob("diffusion_pytorch_model*"):
        old.unlink()
    for filename, keys in split.filename_to_tensors.items():
        save_file({k: tensors[k] for k in keys}, str(folder / filename), metadata={"format": "pt"})
        _readable(folder / filename)
    if split.is_sharded:
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
                 "weight_map": split.tensor_to_filename}
        (folder / (WEIGHTS.format(suffix="") + ".index.json")).write_text(json.dumps(index, indent=2, sort_keys=True))


def write_lora(path: Path, state: Mapping[str, torch.Tensor], dtype: torch.dtype, info: dict[str, str],
               fmt: str = "diffusers", model: str = "wan") -> None:
    """A LoRA file, scale folded into B: ``diffusers`` names (``transformer.<module>.lora_A.weight``, what
    ``load_lora_weights`` writes and reads) or ``comfyui`` names (the original checkpoint's modules under
    ``diffusion_model.``, ``lora_down.weight`` / ``lora_up.weight`` / ``alpha``: what ComfyUI and the LoRAs
    people share use; diffusers converts them on load). Wan's original modules have their own names
    (``blocks.0.self_attn.q``); Qwen-Image's original checkpoint uses diffusers' (``transformer_blocks.0.attn.to_q``)."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "diffusers":
        tensors = {f"transformer.{k}": v.to(dtype).contiguous() for k, v in state.items()}
    elif fmt == "comfyui":
        tensors = comfyui_lora(state, dtype, original_wan_module if model == "wan" else lambda module: module)
    else:
        raise ExportError(f"--lora-format {fmt}: choose diffusers or comfyui")
    save_file(tensors, str(path), metadata={"format": "pt", **{f"pdmd_{k}": str(v) for k, v in info.items()}})
    _readable(path)


def write_phase_loras(stage: Path, run: RunInfo, phase: PhaseInfo, state: Mapping[str, torch.Tensor],
                      dtype: torch.dtype, formats: Sequence[str], model: str = "wan") -> None:
    """Phase ``phase``'s adapters in every requested format (``lora_file`` names), tagged with their origin."""
    origin = {"run": str(run.path.resolve()), "phase": str(phase.index), "base": run.subfolders[phase.student_expert]}
    for fmt in formats:
        write_lora(stage / lora_file(phase.index, fmt), state, dtype, origin, fmt, model)


# diffusers WanTransformer3DModel module -> the original Wan checkpoint's (wan/modules/model.py) module
WAN_ORIGINAL_MODULES = (
    (r"attn1\.to_q", "self_attn.q"), (r"attn1\.to_k", "self_attn.k"), (r"attn1\.to_v", "self_attn.v"),
    (r"attn1\.to_out\.0", "self_attn.o"), (r"attn2\.to_q", "cross_attn.q"), (r"attn2\.to_k", "cross_attn.k"),
    (r"attn2\.to_v", "cross_attn.v"), (r"attn2\.to_out\.0", "cross_attn.o"), (r"attn2\.add_k_proj", "cross_attn.k_img"),
    (r"attn2\.add_v_proj", "cross_attn.v_img"), (r"ffn\.net\.0\.proj", "ffn.0"), (r"ffn\.net\.2", "ffn.2"),
)


def original_wan_module(module: str) -> str | None:
    """diffusers' WanTransformer3DModel module name -> the original Wan checkpoint's (None: no such module)."""
    import re

    found = re.match(r"(blocks\.\d+)\.(.+)", module)
    if found is None:
        return None
    block, rest = found.groups()
    original = next((new for old, new in WAN_ORIGINAL_MODULES if re.fullmatch(old, rest)), None)
    return None if original is None else f"{block}.{original}"


def comfyui_lora(state: Mapping[str, torch.Tensor], dtype: torch.dtype,
                 original: Callable[[str], str | None]) -> dict[str, torch.Tensor]:
    """diffusers-named LoRA tensors (``<module>.lora_A.weight``) under ``diffusion_model.<original module>``,
    as ``lora_down`` / ``lora_up`` with ``alpha`` = rank, since the scale is already folded into ``lora_up``."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        module, kind = key.rsplit(".lora_", 1)
        name = original(module)
        if name is None:
            raise ExportError(f"no original checkpoint name for the LoRA module {module!r} (--lora-format comfyui)")
        if kind.startswith("A"):
            out[f"diffusion_model.{name}.lora_down.weight"] = value.to(dtype).contiguous()
            out[f"diffusion_model.{name}.alpha"] = torch.tensor(float(value.shape[0]), dtype=dtype)
        else:
            out[f"diffusion_model.{name}.lora_up.weight"] = value.to(dtype).contiguous()
    return out


def write_scheduler(out: Path, config: dict[str, Any]) -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler

    FlowMatchEulerDiscreteScheduler.from_config(config).save_pretrained(out / "scheduler")
    saved = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    if saved.get("_class_name") != SCHEDULER_CLASS:
        raise ExportError(f"scheduler written as {saved.get('_class_name')}, expected {SCHEDULER_CLASS}")


def base_components(base: Path | None) -> dict[str, Path]:
    """The base pipeline's text encoder, tokenizer and VAE folders that exist."""
    if base is None:
        return {}
    if not base.is_dir():
        raise ExportError(f"--base-pipeline {base}: no such directory")
    return {name: base / name for name in COMPONENTS if (base / name).is_dir()}


def copy_components(found: Mapping[str, Path], out: Path) -> list[str]:
    """Copy the base pipeline's parts into the export (replacing earlier copies); returns their names."""
    for name, src in found.items():
        dst = out / name
        if dst.exists():
            shutil.rmtree(dst)
        shutil.copytree(src, dst)
    return sorted(found)


def dtype_kwarg(dtype: torch.dtype) -> dict[str, torch.dtype]:
    """``dtype=`` for diffusers' from_pretrained where it exists (0.36+), else ``torch_dtype=``."""
    from diffusers.utils import deprecation_utils

    return {"dtype": dtype} if hasattr(deprecation_utils, "_resolve_dtype") else {"torch_dtype": dtype}


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def check_out(out: Path, run_path: Path, overwrite: bool) -> None:
    """--out may be new, empty, or an earlier export of the same run (replaced); anything else only with
    --overwrite, so that two runs' files never mix in one folder."""
    if not out.exists():
        return
    if not out.is_dir():
        raise ExportError(f"--out {out} is a file: give a folder")
    if not any(out.iterdir()) or overwrite:
        return
    info = read_json(out / EXPORT_INFO)
    if info is None:
        raise ExportError(f"--out {out} exists and is not an export: choose a new or empty folder, or pass --overwrite")
    if info.get("run") != str(run_path.resolve()):
        raise ExportError(f"--out {out} holds an export of another run ({info.get('run')}): choose a new folder, or "
                          "pass --overwrite to replace it")


@contextmanager
def staged_folder(out: Path, run_path: Path, overwrite: bool) -> Iterator[Path]:
    """Write an export into a hidden sibling of ``out`` and move it into place only once complete: a failed
    export leaves ``out`` as it was (rank 0 writes; every rank enters and leaves together)."""
    check_out(out, run_path, overwrite)
    stage = out.parent / f".{out.name}.partial"
    if is_rank0():
        shutil.rmtree(stage, ignore_errors=True)
        stage.mkdir(parents=True)
    barrier()
    try:
        yield stage
    except BaseException:
        if is_rank0():
            shutil.rmtree(stage, ignore_errors=True)
        raise
    if is_rank0():
        old = out.parent / f".{out.name}.replaced"
        shutil.rmtree(old, ignore_errors=True)
        if out.exists():
            os.replace(out, old)
        os.replace(stage, out)
        shutil.rmtree(old, ignore_errors=True)
    barrier()
