"""tools/bench.py step: one generator step and one fake step of the tiny recipe, split by part. The
split must account for the passes the method makes (CFG teacher twice, SGTS rollout length) and never
count a pass twice (backward >= 0, overhead >= 1)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_step_entry_splits_both_steps() -> None:
    doc_before = (ROOT / "docs" / "benchmarks.md").read_text()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):
        env.pop(k, None)
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "bench.py"), "step", "--phase", "1", "--reps", "1",
                           "--no-record"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    rows = re.findall(r"^\| (generator|fake) step \| ([^|]+?) \| (\d*) \| ([\d.]+)x? \| (\d*%?) \|$", out, re.M)
    parts = {(kind, name): (int(n) if n else None, float(v)) for kind, name, n, v, _ in rows}
    # phase 1 of 2 x 2 steps with SGTS: the rollout stops at step 0 or 1 (1 or 2 passes)
    assert parts[("generator", "rollout (no grad)")][0] in (1, 2), out
    assert parts[("generator", "teacher (cond + uncond)")][0] == 2  # CFG 4: conditional and unconditional
    assert parts[("generator", "fake score (no grad)")][0] == 1
    assert parts[("fake", "rollout (no grad)")][0] in (1, 2)
    for kind in ("generator", "fake"):
        who = "student" if kind == "generator" else "fake"
        assert parts[(kind, f"{who} forward")][0] == 1 and parts[(kind, "optimizer")][0] == 1
        assert parts[(kind, f"{who} backward (+ loss, schedule)")][1] > 0
        total = parts[(kind, "**total**")][1]
        named = sum(v for (k, name), (_, v) in parts.items() if k == kind and not name.startswith(("**", "overhead")))
        assert abs(named - total) <= 0.01 * total + 0.3  # every millisecond is attributed once
        assert parts[(kind, "overhead = step / model passes (forwards + backwards)")][1] >= 1.0
    assert "the trainer's own laps" in out and "2 layers" in out
    assert (ROOT / "docs" / "benchmarks.md").read_text() == doc_before  # --no-record
