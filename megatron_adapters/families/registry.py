"""The model families the backend can drive, by ``model.kind`` (each family's adapter lives in its own
folder: megatron_adapters/families/{wan,qwen_image}/family.py; the interface in families/base.py)."""

from __future__ import annotations

import json
from pathlib import Path

from megatron_adapters.families.base import ModelFamily
from megatron_adapters.families.qwen_image.family import QwenImageFamily
from megatron_adapters.families.wan.family import WanFamily

FAMILIES: dict[str, type[ModelFamily]] = {"wan": WanFamily, "qwen-image": QwenImageFamily}


def family_for(kind: str, teacher: str | Path, subfolders: list[str]) -> ModelFamily:
    if kind not in FAMILIES:
        raise ValueError(f"model.kind={kind!r}: choose one of {sorted(FAMILIES)}")
    return FAMILIES[kind](teacher, subfolders)


def teacher_class(folder: str | Path) -> str | None:
    """The diffusers class a transformer folder's config.json names (None if it names none)."""
    path = Path(folder) / "config.json"
    return json.loads(path.read_text()).get("_class_name") if path.is_file() else None
