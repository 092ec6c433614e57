"""The run directory and its manifest: which phases exist, which are done, where their checkpoints are.

``RUN_DIR/manifest.json`` (written atomically: temp file, fsync, rename) holds the phase plan, the
config hash, the W&B run id and one entry per phase: ``index`` (1-based), ``status``
(pending | running | done | failed), ``step``, ``student_expert``, ``checkpoints`` (latest first) and,
when done, ``expert`` (the final student's checkpoint) with a hash of its files. Rerunning any command
on a run directory resumes it; finished phases are skipped.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pdmd.core.content import PATH_KEYS, get
from pdmd.run.console import progress_bar

MANIFEST = "manifest.json"
STATUSES = ("pending", "running", "done", "failed")


def atomic_write_text(path: Path, text: str) -> None:
    """Write a temp file beside ``path``, fsync, rename: a reader sees the old file or the new one, never half."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True))


def tree_hash(folder: Path, desc: str | None = None) -> str:
    """sha256 over the names and bytes of every file under ``folder`` (sorted); ``desc`` shows a byte progress
    bar on an interactive console (an A14B expert is ~28 GB: minutes)."""
    h = hashlib.sha256()
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    with progress_bar(sum(f.stat().st_size for f in files), desc or "", unit="B", enabled=desc is not None,
                      unit_scale=True, unit_divisor=1024) as bar:
        for f in files:
            h.update(str(f.relative_to(folder)).encode())
            with open(f, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 24), b""):
                    h.update(chunk)
                    bar.update(len(chunk))
    return h.hexdigest()


def tree_size(folder: Path) -> int:
    """Bytes of every file under ``folder``."""
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


class RunDir:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.manifest_path = self.path / MANIFEST
        self.checkpoints = self.path / "checkpoints"
        self.metrics = self.path / "metrics.jsonl"

    def check_trusted(self) -> None:
        """A run directory is trusted input (its checkpoints hold pickled metadata, as torch.load does): refuse one
        that another user owns or that anyone can write to, where a planted file could run code on load."""
        if os.name != "posix" or not self.path.exists():
            return
        for path in (self.path, self.manifest_path, self.checkpoints):
            if not path.exists():
                continue
            st = path.stat()
            if st.st_uid != os.getuid() and os.getuid() != 0:
                raise ValueError(f"{path} belongs to another user (uid {st.st_uid}): a run directory is loaded like "
                                 "torch.load loads a file; copy it to a directory of yours first")
            if st.st_mode & 0o002:
                raise ValueError(f"{path} is writable by every user: a run directory is loaded like torch.load loads "
                                 f"a file; `chmod o-w {path}` first")

    def exists(self) -> bool:
        return self.manifest_path.is_file()

    def read(self) -> dict[str, Any]:
        try:
            return json.loads(self.manifest_path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"cannot read {self.manifest_path}: {exc}") from exc

    def write(self, manifest: dict[str, Any]) -> None:
        atomic_write_json(self.manifest_path, manifest)

    def create_or_check(self, plan_config: dict, config_hash: str, student_experts: list[int],
                        config: dict, content: dict[str, str | None],
                        resume_changes: Callable[[dict, dict | None], dict | None] | None = None) -> dict[str, Any]:
        """A new manifest, or the existing one if it belongs to the same run (same plan, same identity: the
        config with its inputs' ``content``, pdmd/core/content.py). ``resume_changes(saved_config,
        saved_content)`` may accept a changed config (learning rates after a divergence) or inputs that moved
        (same content, new paths): either is recorded under the manifest's ``history`` and the new config
        (with its paths) becomes the run's."""
        if self.exists():
            manifest = self.read()
            saved_config, saved_content = manifest.get("config") or {}, manifest.get("content")
            changes = {}
            if (manifest["config_hash"] != config_hash or saved_content is None) and resume_changes is not None:
                changes = resume_changes(saved_config, saved_content)
            if changes is None or (manifest["config_hash"] != config_hash and resume_changes is None):
                raise ValueError(
                    f"{self.path} was started with another configuration (hash {manifest['config_hash'][:12]} vs "
                    f"{config_hash[:12]}): resume it with the same recipe and overrides (saved in its manifest "
                    "under 'config'; only learning rates and checkpoint/log cadence may change on resume, and "
                    "inputs may move if their content is the same), or use a new --run-dir")
            moved = {key: [get(saved_config, key), get(config, key)] for key in PATH_KEYS
                     if get(saved_config, key) != get(config, key)}
            if changes or moved or saved_content is None:
                event: dict[str, Any] = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"),
                                         "phase_steps": {e["index"]: e["step"] for e in manifest["phases"]}}
                if changes:
                    event["changed"] = changes
                if moved:
                    event["moved"] = moved
                if saved_content is None:
                    event["identity"] = "by content (this manifest was identified by path strings)"
                if manifest["config_hash"] != config_hash:
                    event["config_hash"] = [manifest["config_hash"], config_hash]
                manifest.setdefault("history", []).append(event)
                manifest["config_hash"], manifest["config"] = config_hash, config
                manifest["content"] = content
                self.write(manifest)
            return manifest
        self.path.mkdir(parents=True, exist_ok=True)
        self.checkpoints.mkdir(exist_ok=True)
        manifest = {
            "version": 1,
            "plan": plan_config,
            "config_hash": config_hash,
            "config": config,
            "content": content,
            "wandb_id": uuid.uuid4().hex[:16],
            "phases": [
                {"index": k, "status": "pending", "step": 0, "student_expert": e, "checkpoints": [], "expert": None,
                 "expert_hash": None}
                for k, e in enumerate(student_experts, start=1)
            ],
        }
        self.write(manifest)
        return manifest

    def phase_dir(self, k: int) -> Path:
        return self.checkpoints / f"phase{k}"

    def step_dir(self, k: int, step: int) -> Path:
        return self.phase_dir(k) / f"step{step:07d}"

    def expert_dir(self, k: int) -> Path:
        return self.phase_dir(k) / "expert"

    def update_phase(self, k: int, **fields: Any) -> dict[str, Any]:
        manifest = self.read()
        entry = manifest["phases"][k - 1]
        if "status" in fields and fields["status"] not in STATUSES:
            raise ValueError(f"unknown phase status {fields['status']!r}")
        entry.update(fields)
        self.write(manifest)
        return manifest

    def record_checkpoint(self, k: int, step: int, keep_last: int) -> None:
        """Add phase k's step checkpoint (latest first) and delete all but the newest ``keep_last``."""
        manifest = self.read()
        entry = manifest["phases"][k - 1]
        path = str(self.step_dir(k, step).relative_to(self.path))
        ckpts = [path] + [c for c in entry["checkpoints"] if c != path]
        for old in ckpts[keep_last:]:
            shutil.rmtree(self.path / old, ignore_errors=True)
        entry["checkpoints"], entry["step"] = ckpts[:keep_last], step
        self.write(manifest)

    def next_pending(self) -> int | None:
        """The first phase not done (for ``--phase auto``), or None when all are done."""
        for entry in self.read()["phases"]:
            if entry["status"] != "done":
                return entry["index"]
        return None

    def check_phase_ready(self, k: int) -> None:
        """Phase k can start only after phases 1..k-1 are done (their experts are its rollout)."""
        manifest = self.read()
        if not 1 <= k <= len(manifest["phases"]):
            raise ValueError(f"--phase {k}: this run has phases 1..{len(manifest['phases'])}")
        for entry in manifest["phases"][: k - 1]:
            if entry["status"] != "done":
                raise ValueError(f"phase {k} needs phase {entry['index']} done first (it is {entry['status']}): "
                                 f"run --phase {entry['index']} or --phase auto")
            expert = self.path / entry["expert"]
            if tree_hash(expert, desc=f"checking phase {entry['index']}'s expert") != entry["expert_hash"]:
                raise ValueError(f"the expert checkpoint of phase {entry['index']} at {expert} changed since it was "
                                 "written (hash mismatch): restore it or rerun that phase")
