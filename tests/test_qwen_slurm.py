"""slurm/qwen_image_phased.sbatch on the local Slurm test cluster (scripts/setup_slurm.sh) with the tiny
Qwen-Image recipe: two tasks at parallel.tp=2 on gloo, one job per phase (phase 1's job submits phase 2's),
the run finishes with both phases done. Skips (fails under CI) without the cluster, as tests/test_slurm.py."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.test_slurm import FINAL_STATES, _events, cluster  # noqa: F401 - the cluster fixture

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "slurm" / "qwen_image_phased.sbatch"
pytestmark = [pytest.mark.timeout(1200), pytest.mark.slow]


def _state(env: dict[str, str], job: str) -> str:
    proc = subprocess.run(["scontrol", "-o", "show", "job", job], capture_output=True, text=True, env=env, timeout=30)
    return next((w.split("=", 1)[1] for w in proc.stdout.split() if w.startswith("JobState=")), "")


def test_qwen_image_sbatch_runs_the_tiny_recipe_one_job_per_phase(cluster, tmp_path):  # noqa: F811
    from pdmd.tiny_models import write_tiny_qwen_image_teacher
    from tests.tiny_encoders import build_dataset

    teacher = write_tiny_qwen_image_teacher(tmp_path / "teacher")
    shards, _ = build_dataset("qwen2.5-vl", tmp_path / "data")
    run_dir = tmp_path / "run"
    overrides = [f"model.teacher.path={teacher}", f"data.shards={shards}", "parallel.tp=2", "train.steps=2",
                 "method.fake_ratio=1"]
    env = {**cluster, "PDMD_DEVICE": "cpu", "PDMD_CONFIG": "configs/tiny_qwen_image.yaml", "PDMD_RUN_DIR": str(run_dir),
           "PDMD_OVERRIDES": " ".join(overrides), "PDMD_PYTHON": sys.executable}
    cmd = ["sbatch", "--parsable", "--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=0", "--time=30",
           f"--output={tmp_path}/%x-%j.out", str(SCRIPT)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    first = proc.stdout.strip().split(";")[0]
    assert first, f"sbatch failed: {proc.stderr}"
    jobs = [first]
    deadline = time.monotonic() + 900
    try:
        while time.monotonic() < deadline:
            events = _events(run_dir)
            jobs = [first, *(e["next_job"] for e in events if e.get("event") == "submitted")]
            if any(e.get("event") == "finished" for e in events) and all(_state(cluster, j) in FINAL_STATES
                                                                          for j in jobs):
                break
            time.sleep(1)
        logs = "\n".join(p.read_text()[-2000:] for p in tmp_path.glob("*.out"))
        manifest = json.loads((run_dir / "manifest.json").read_text()) if (run_dir / "manifest.json").is_file() else {}
        assert [p["status"] for p in manifest.get("phases", [])] == ["done", "done"], logs
        assert len(set(jobs)) == 2, (jobs, logs)  # phase 2 ran in the job phase 1 submitted
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert {"phase1/generator_loss", "phase2/generator_loss"} <= set().union(*rows)
    finally:
        live = [j for j in jobs if _state(cluster, j) not in FINAL_STATES]
        if live:
            subprocess.run(["scancel", *live], env=cluster, timeout=30)
