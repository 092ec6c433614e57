"""Scalars of a run: one JSON object per logged step in RUN_DIR/metrics.jsonl, and the same to W&B.

Only global rank 0 writes. W&B runs offline unless configured otherwise (``wandb sync`` later); one W&B
run per distillation, resumed by id on restart.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from pdmd.run.rundir import atomic_write_text


class MetricsLogger:
    def __init__(self, path: Path, wandb_cfg, run_id: str, config: dict[str, Any], rank: int = 0) -> None:
        self.path, self.enabled = Path(path), rank == 0
        self.run = None
        if not self.enabled or wandb_cfg.mode == "disabled":
            return
        import wandb

        os.environ.setdefault("WANDB_SILENT", "true")
        self.run = wandb.init(
            mode=wandb_cfg.mode, project=wandb_cfg.project, group=wandb_cfg.group, name=wandb_cfg.name,
            id=run_id, resume="allow", dir=str(self.path.parent), config=config,
        )

    def log(self, step: int, scalars: dict[str, float]) -> None:
        if not self.enabled:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in scalars.items()}
        with open(self.path, "a") as fh:
            fh.write(json.dumps({"step": step, **clean}, sort_keys=True) + "\n")
        if self.run is not None:
            self.run.log({k: v for k, v in scalars.items() if isinstance(v, (int, float))}, step=step)

    def rewind(self, step: int) -> None:
        """Drop metrics.jsonl rows after ``step`` (a resume repeats the steps after its checkpoint). W&B keeps
        its rows: a resumed W&B run ignores steps it has already seen, so its curve shows each step once."""
        if not self.enabled or not self.path.is_file():
            return
        kept = [line for line in self.path.read_text().splitlines(keepends=True)
                if line.strip() and json.loads(line).get("step", 0) <= step]
        atomic_write_text(self.path, "".join(kept))

    def log_histogram(self, step: int, key: str, values) -> None:
        """A distribution (e.g. the re-noise times of a step) to W&B; metrics.jsonl keeps its summary scalars."""
        if self.run is not None:
            import wandb

            self.run.log({key: wandb.Histogram(values.tolist() if hasattr(values, "tolist") else list(values))},
                         step=step)

    def log_media(self, step: int, key: str, paths: list[Path], caption: str = "") -> None:
        """Decoded preview samples (PNG, GIF or MP4 files already written in the run dir) to W&B."""
        if self.run is None or not paths:
            return
        import wandb

        items = [wandb.Image(str(p), caption=caption) if p.suffix == ".png" else wandb.Video(str(p), caption=caption)
                 for p in paths]
        self.run.log({key: items}, step=step)

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None
