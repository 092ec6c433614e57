"""`pdmd demo --fast` (the README's first command at smoke size) runs every stage end to end: shards, a
flow-matching teacher that learns the mixture, both distillations through the trainer, the exports, the
scoring against the exact mixture, and the files it promises."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.multirank  # runs the trainer (gloo) in a subprocess


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "pdmd.cli", "demo", "--fast", "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return out, proc.stdout


def test_demo_writes_results_plots_and_exports(demo):
    out, stdout = demo
    for name in ("results.md", "results.json", "task.json", "loss_curves.png", "samples_prompt0.png"):
        assert (out / name).is_file(), name
    for method in ("phased_dmd", "dmd2_sgts"):
        assert (out / "exports" / f"{method}_seed0" / "model_index.json").is_file()
        manifest = json.loads((out / "runs" / f"{method}_seed0" / "manifest.json").read_text())
        assert all(p["status"] == "done" for p in manifest["phases"])
    phases = json.loads((out / "runs" / "phased_dmd_seed0" / "manifest.json").read_text())["phases"]
    assert len(phases) == 2
    assert "| Phased DMD (4 steps, 2 phases) | 4 |" in stdout and "| DMD2+SGTS (4 steps, 1 expert) | 4 |" in stdout


def test_demo_teacher_learns_the_mixture_and_all_methods_are_scored(demo):
    out, _ = demo
    result = json.loads((out / "results.json").read_text())
    methods = result["methods"]
    assert list(methods) == ["teacher 40 steps", "teacher 4 steps", "Phased DMD (4 steps, 2 phases)",
                             "DMD2+SGTS (4 steps, 1 expert)"]
    assert methods["teacher 40 steps"]["coverage"] >= 0.75  # the task is learnable at this budget
    for label, m in methods.items():
        assert 0 <= m["coverage"] <= 1 and 0 <= m["tv"] <= 1 and m["pairwise_ratio"] > 0, label
        assert m["nfe"] == (40 if label == "teacher 40 steps" else 4)
    per = result["per_seed"]["teacher 40 steps"][0]["per_prompt"]
    assert len(per) == 2 and all(sum(p["counts"]) == 64 for p in per)
