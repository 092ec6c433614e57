"""tools/gpu_check.sh without a GPU: its syntax, the commands its dry run would run (the CUDA tests, the
block benchmark at A14B layer size, tiny training on CUDA), its refusal without CUDA, the run summary
of tools/gpu_check.py, and that it installs nothing from the network."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tools" / "gpu_check.sh"


def _run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, cwd=ROOT, env=env,
                          timeout=timeout)


def _table(stdout: str) -> dict[str, list[str]]:
    rows = re.findall(r"^\| (\S+) \| (\S+) \| (\d+) \| (.*) \|$", stdout, re.M)
    return {name: [status, secs, detail] for name, status, secs, detail in rows if name != "check"}


def test_syntax():
    assert subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True).returncode == 0


def test_dry_run_shows_every_check(tmp_path):
    proc = _run("--dry-run", "--out", str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    table = _table(out)
    assert list(table) == ["env", "matmul", "cuda-tests", "block", "step", "attention", "train-prep", "train-fp32",
                           "train-bf16", "train-te"]
    assert all(row[0] == "DRY-RUN" for row in table.values())
    assert re.search(r"-m pytest -m cuda .*tests/test_plan\.py", out)  # the files that have cuda tests
    assert ("tools/bench.py block --hidden 5120 --heads 40 --layers 2 --ffn 13824 --frames 21 --height 60 "
            "--width 104 --text-len 512") in out  # A14B layers at 32760 tokens
    assert "--no-record" in out and "tools/bench.py step --reps 3" in out
    assert "tools/bench.py attention --heads 40 --head-dim 128 --tokens 32760 --cp 1 2 4 8" in out
    assert "tools/make_tiny_teacher.py" in out and "tools/make_prompt_shards.py" in out
    for extra in ("wandb.mode=disabled  &&", "model.dtype=bf16 &&", "model.dtype=bf16 model.spec=te &&"):
        assert re.search(r"-m pdmd\.cli train configs/tiny_wan22\.yaml .*" + re.escape(extra), out), extra
    assert list((tmp_path / "out").iterdir()) == []  # a dry run writes nothing


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_refuses_without_cuda(tmp_path):
    proc = _run("--out", str(tmp_path), timeout=240)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "no CUDA device" in proc.stderr
    env = _table(proc.stdout)["env"]
    assert env[0] == "FAIL" and "torch " in env[2] and "Transformer Engine" in env[2]
    assert "missing=" in (tmp_path / "env.log").read_text()


def test_run_summary_flags_non_finite_losses(tmp_path):
    rows = [{"step": 1, "phase1/generator_loss": 0.5, "phase1/fake_loss": 2.0, "phase1/peak_memory_gb": 1.25,
             "phase1/step_time_s": 0.3},
            {"step": 2, "phase1/generator_loss": 0.25, "phase1/fake_loss": 1.5, "phase1/peak_memory_gb": 1.5,
             "phase1/step_time_s": 0.2}]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    cmd = [sys.executable, str(ROOT / "tools" / "gpu_check.py"), "metrics", str(tmp_path)]
    ok = subprocess.run(cmd, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.strip() == ("SUMMARY: 2 steps, last phase1/fake_loss=1.5, phase1/generator_loss=0.25; "
                                 "last step 0.20s; peak 1.50 GiB")
    rows[1]["phase1/generator_loss"] = float("nan")
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    bad = subprocess.run(cmd, capture_output=True, text=True)
    assert bad.returncode == 1 and "NON-FINITE ['phase1/generator_loss']" in bad.stdout


def test_installs_nothing_from_the_network():
    text = SCRIPT.read_text()
    installs = [line for line in text.splitlines() if "pip install" in line and not line.lstrip().startswith("#")]
    assert installs and all("--no-index" in line for line in installs)
    assert "PIP_NO_INDEX=1" in text and "HF_HUB_OFFLINE=1" in text
