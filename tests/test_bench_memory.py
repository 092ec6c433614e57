"""The `memory` benchmark entry: it runs, and what it counts behaves as the roles say it must."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.multirank


def test_memory_entry_counts_resident_roles_below_all_roles():
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "bench.py"), "memory", "--no-record"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line.split("|")[1:-1] for line in proc.stdout.splitlines() if line.startswith("| LoRA") or
            line.startswith("| full")]
    table = {(r[0].strip(), r[1].strip(), r[2].strip()): [float(v) for v in r[3:8]] for r in rows}
    assert len(table) == 6
    for student in ("LoRA r4", "full"):
        allr = table[(student, "all roles (LightX2V)", "all")]
        for k in ("1", "2"):
            mine = table[(student, "resident roles only", k)]
            assert mine[4] < allr[4]  # total
            assert mine[0] <= allr[0] and mine[2] <= allr[2]  # weights, optimizer states
    # a LoRA student shares its teacher's backbone: fewer weights and optimizer states than a full copy
    lora, full = table[("LoRA r4", "resident roles only", "1")], table[("full", "resident roles only", "1")]
    assert lora[0] < full[0] and lora[2] < full[2]
