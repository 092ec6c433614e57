"""Where a recipe's files are, and what they are.

Paths in a recipe file resolve against the recipe's own folder; paths from the command line or the
environment (``key=value`` overrides, ``${oc.env:...}``) against the working directory; every path is
stored absolute in the run's manifest. A run's identity holds the *content* of its inputs (the teacher's
configs and weight headers, the shards' index, small files' bytes) instead of the path strings, so a run
resumes, exports and samples from any directory, and data moved to another mount is accepted wherever it
is pointed at, provided it is the same data (docs/training.md, "Paths").
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path
from typing import Any

# Recipe keys that name files or folders, as dotted paths; the first four are part of the run's identity.
IDENTITY_PATHS: tuple[str, ...] = ("model.teacher.path", "model.teacher.exact", "model.fp8.parity_report", "data.shards")
PATH_KEYS: tuple[str, ...] = (*IDENTITY_PATHS, "logging.vae")


def get(tree: dict[str, Any], dotted: str) -> Any:
    """``tree["a"]["b"]`` for ``"a.b"``; None where any level is missing."""
    node: Any = tree
    for name in dotted.split("."):
        if not isinstance(node, dict):
            return None
        node = node.get(name)
    return node


def put(tree: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``tree["a"]["b"] = value`` for ``"a.b"`` where the parent levels exist (a no-op elsewhere)."""
    *parents, key = dotted.split(".")
    node: Any = tree
    for name in parents:
        node = node.get(name) if isinstance(node, dict) else None
    if isinstance(node, dict) and key in node:
        node[key] = value


def absolute(value: Any, base: Path) -> Any:
    """A path string made absolute against ``base`` (``~`` expanded); anything else unchanged."""
    if not isinstance(value, str) or not value:
        return value
    path = os.path.expanduser(value)
    return os.path.normpath(path if os.path.isabs(path) else os.path.join(base, path))


def resolve_paths(tree: dict[str, Any], base: Path, skip_interpolated: bool = False) -> None:
    """Make every PATH_KEYS value of ``tree`` absolute against ``base``, in place. ``skip_interpolated``
    leaves ``${...}`` values alone (they resolve later, from the environment, against the working dir)."""
    for key in PATH_KEYS:
        value = get(tree, key)
        if skip_interpolated and isinstance(value, str) and "${" in value:
            continue
        put(tree, key, absolute(value, base))


def _safetensors_header(path: Path) -> bytes:
    """A safetensors file's JSON header (names, dtypes, shapes, offsets): what the weights are, read in
    microseconds even for a 10 GB shard."""
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        return f.read(min(size, 100_000_000))


def teacher_content(path: str | Path, subfolders: list[str]) -> str | None:
    """The teacher experts' configs and weight headers (plus any weight index), hashed; None if absent."""
    digest = hashlib.sha256()
    for sub in subfolders:
        folder = Path(path) / sub
        if not (folder / "config.json").is_file():
            return None
        config = json.loads((folder / "config.json").read_text())
        config.pop("_diffusers_version", None)  # rewritten by every save_pretrained; not the model
        digest.update(f"{sub}\0{json.dumps(config, sort_keys=True)}\0".encode())
        for file in sorted(folder.glob("*.safetensors")):
            digest.update(f"{file.name}\0{file.stat().st_size}\0".encode() + _safetensors_header(file))
    return digest.hexdigest()


def file_content(path: str | Path) -> str | None:
    """The bytes of a small file (an exact-teacher file, a parity report), hashed; None if absent."""
    path = Path(path)
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def shards_content(path: str | Path) -> str | None:
    """Prompt shards, by their index (which the writer fills with the shards' own hash); None if absent."""
    index = Path(path) / "index.json"
    return hashlib.sha256(index.read_bytes()).hexdigest() if index.is_file() else None


def content_of(config: dict[str, Any]) -> dict[str, str | None]:
    """Each IDENTITY_PATHS key set in ``config`` (a recipe as a plain dict) -> its content hash (None: not
    found there)."""
    out: dict[str, str | None] = {}
    for key in IDENTITY_PATHS:
        value = get(config, key)
        if not value:
            continue
        if key == "model.teacher.path":
            out[key] = teacher_content(value, get(config, "model.teacher.subfolders") or ["transformer"])
        elif key == "data.shards":
            out[key] = shards_content(value)
        else:
            out[key] = file_content(value)
    return out
