"""Smoke test of tools/bench.py: the ``block`` entry runs at a tiny size, prints its table and finds our
Wan model equal to diffusers'; the record it would append names the machine, versions and command."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "tools" / "bench.py"
TINY = ["--hidden", "32", "--heads", "2", "--layers", "2", "--ffn", "48", "--frames", "2", "--height", "4",
        "--width", "4", "--channels", "4", "--text-len", "5", "--text-dim", "24", "--reps", "1", "--no-record"]


def _load_bench():
    """tools/bench.py as a module (tools/ is not a package)."""
    if "pdmd_tools_bench" not in sys.modules:
        spec = importlib.util.spec_from_file_location("pdmd_tools_bench", BENCH)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
    return sys.modules["pdmd_tools_bench"]


def test_block_entry_prints_table_and_models_agree() -> None:
    doc_before = (ROOT / "docs" / "benchmarks.md").read_text()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):  # a single process of its own
        env.pop(k, None)
    proc = subprocess.run([sys.executable, str(BENCH), "block", *TINY], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)  # cold imports on a busy 2-core machine
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "| pass | clock | ours ms median (min) | diffusers ms median (min) | ours / diffusers | rel err |" in out
    rows = {(m[0], m[1]): m for m in re.findall(r"^\| (fwd|fwd\+bwd) \| (wall|cpu) \| (.*) \| (.*) \| ([\d.]+)x \| (\S+) \|$",
                                                  out, re.M)}
    assert set(rows) == {("fwd", "wall"), ("fwd", "cpu"), ("fwd+bwd", "wall"), ("fwd+bwd", "cpu")}, out
    assert all(float(r[5]) < 1e-4 for r in rows.values()), out
    errs = re.search(r"output (\S+), input grad (\S+), param grads \(worst\) (\S+) \(rtol", out)
    assert errs is not None, out
    assert all(float(e) < 1e-4 for e in errs.groups()), out
    assert "2 layers" in out and "8 tokens" in out
    assert (ROOT / "docs" / "benchmarks.md").read_text() == doc_before  # --no-record


def test_record_section_names_date_machine_versions_command(tmp_path: Path) -> None:
    bench = _load_bench()
    result = bench.Result(title="a title", headers=["pass", "time"], rows=[["fwd", "1.0"]], notes=["config: x"])
    text = bench.section("block", result, ["block", "--reps", "3"], result.device)
    assert re.search(r"- date: \d{4}-\d\d-\d\d \d\d:\d\d UTC, commit \S+", text)
    assert f"- machine: {bench.cpu_model()}, " in text and "torch thread" in text
    for name in ("torch", "megatron-core", "diffusers"):
        assert f"{name} " in text
    assert "python tools/bench.py block --reps 3`" in text
    assert "| fwd | 1.0 |" in text and "- config: x" in text
    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Benchmarks\n\nintro\n")
    bench.record(text, doc)
    bench.record(text, doc)
    assert doc.read_text() == "# Benchmarks\n\nintro\n\n" + text + "\n" + text


def test_attention_entry_times_both_cp_kinds_on_cpu() -> None:
    """The per-rank attention core of each CP kind (the GPU run records it at A14B size): both kinds per cp,
    the shapes each rank runs, a refusal where the heads do not split."""
    bench = _load_bench()
    result = bench.run_attention(bench.parse_args(["attention", "--heads", "4", "--head-dim", "8", "--tokens", "64",
                                                   "--cp", "1", "2", "8", "--reps", "1", "--no-record"]))
    assert result.ok
    kinds = [(r[0], r[1]) for r in result.rows]
    assert kinds == [("1", "all_gather"), ("1", "ulysses"), ("2", "all_gather"), ("2", "ulysses"), ("8", "-")]
    assert result.rows[2][2] == "[4 heads, 32 queries, 64 keys]" and result.rows[3][2] == "[2 heads, 64 queries, 64 keys]"


@pytest.mark.parametrize("entry", ["block", "qwen-block", "data", "attention"])
def test_entries_are_registered(entry: str) -> None:
    bench = _load_bench()
    assert entry in bench.ENTRIES
    args = bench.parse_args([entry, "--no-record"])
    assert args.entry == entry and args.threads == 1 and args.no_record
