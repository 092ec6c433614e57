"""The trainer fails safe (docs/training.md, exit codes): a user error is one line with exit 2 before any
model is built and leaves nothing behind; a diverging run keeps only finite checkpoints, names the last good
one and resumes from it with a lower learning rate (recorded in the manifest); a truncated newest
checkpoint falls back to the one before; Ctrl-C saves like SIGTERM; metrics.jsonl has each step once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pdmd.cli import main as pdmd_main
from pdmd.core.distributed import free_port
from tests.conftest import ROOT, read_manifest, read_metrics, subprocess_env

RECIPE = ROOT / "configs" / "tiny_wan22.yaml"
pytestmark = pytest.mark.multirank


def _train(run_dir: Path, overrides: list[str], recipe: Path = RECIPE) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "pdmd.cli", "train", str(recipe), "--run-dir", str(run_dir), *overrides]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env=subprocess_env(MASTER_PORT=str(free_port())))


def _one_line(err: str) -> bool:
    return "Traceback" not in err and len(err.strip().splitlines()) == 1


def _bad_yaml(tmp: Path) -> Path:
    path = tmp / "bad.yaml"
    path.write_text("model:\n  kind: wan\n   teacher: [\n")
    return path


@pytest.mark.parametrize("case, recipe, extra, words", [
    ("yaml syntax", "bad_yaml", [], "is not valid YAML"),
    ("malformed override", None, ["plan.renoise_clamp=[[0.8"], "an override does not parse"),
    ("cfg scale not a number", None, ["method.cfg_scale=abc"], "method.cfg_scale='abc' must be a number"),
    ("cfg scale nan", None, ["method.cfg_scale=nan"], "must be a finite number"),
    ("seed not a number", None, ["seed=abc"], "seed='abc' must be a whole number"),
    ("phase 0", None, ["--phase", "0"], "--phase 0: use all, auto or a phase number 1..2"),
    ("phase 5", None, ["--phase", "5"], "--phase 5"),
    ("run dir is a file", None, ["RUN_IS_FILE"], "is a file"),
])
def test_user_errors_are_one_line_exit_2_before_any_model(wan_tiny, tmp_path, capsys, case, recipe, extra, words):
    run_dir = tmp_path / "run"
    if "RUN_IS_FILE" in extra:
        run_dir.write_text("not a directory")
        extra = []
    path = _bad_yaml(tmp_path) if recipe == "bad_yaml" else RECIPE
    code = pdmd_main(["train", str(path), "--run-dir", str(run_dir), *wan_tiny.overrides, *extra])
    err = capsys.readouterr().err
    assert code == 2 and words in err and _one_line(err), (case, err)
    assert run_dir.is_file() if case == "run dir is a file" else not run_dir.exists()  # no manifest, no W&B folder


def test_world_writable_run_dir_is_refused(wan_tiny, tmp_path, capsys):
    run_dir = tmp_path / "shared_run"
    run_dir.mkdir()
    os.chmod(run_dir, 0o777)
    code = pdmd_main(["train", str(RECIPE), "--run-dir", str(run_dir), *wan_tiny.overrides])
    err = capsys.readouterr().err
    assert code == 2 and "writable by every user" in err and _one_line(err), err


def test_edited_expert_config_is_refused(wan_tiny, tmp_path):
    """transformer_2/config.json with another ffn_dim: the Megatron config is built from expert 0's."""
    import shutil

    from megatron_adapters.families.registry import family_for

    teacher = tmp_path / "teacher"
    shutil.copytree(wan_tiny.teacher, teacher)
    cfg_path = teacher / "transformer_2" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["ffn_dim"] = cfg["ffn_dim"] * 2
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="transformer_2/config.json has ffn_dim="):
        family_for("wan", teacher, ["transformer", "transformer_2"])


def test_shards_of_another_text_width_stop_before_the_phase_runs(wan_tiny, tmp_path):
    from pdmd.bench.tiny_models import write_tiny_wan22_teacher

    teacher = write_tiny_wan22_teacher(tmp_path / "teacher16", text_dim=16)
    proc = _train(tmp_path / "run", [f"model.teacher.path={teacher}", f"data.shards={wan_tiny.shards}"])
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "embeddings but the model expects text_dim 16" in proc.stderr and "Traceback" not in proc.stderr
    assert read_manifest(tmp_path / "run")["phases"][0]["status"] == "pending"


def _finite_checkpoint(step_dir: Path) -> bool:
    """Every floating tensor of a step checkpoint (models and optimizer state) is finite."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = step_dir.parent / f"{step_dir.name}.pt"
    dcp_to_torch_save(step_dir, out)
    state = torch.load(out, weights_only=False)  # written just above from our own checkpoint

    def tensors(x):
        if isinstance(x, torch.Tensor):
            yield x
        elif isinstance(x, dict):
            for v in x.values():
                yield from tensors(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                yield from tensors(v)

    return all(torch.isfinite(t).all() for t in tensors(state) if t.is_floating_point())


def test_divergence_keeps_finite_checkpoints_and_resumes_with_a_lower_lr(wan_tiny, tmp_path):
    run_dir = tmp_path / "diverging"
    common = [*wan_tiny.overrides, "train.steps=4", "train.checkpoint_every=1", "train.keep_last=3",
              "train.max_bad_steps=2", "plan.num_phases=1", "plan.num_steps=2", "plan.renoise_clamp=null"]
    proc = _train(run_dir, [*common, "student.lr=1e30", "fake.lr=1e30"])
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert "steps in a row had a non-finite" in proc.stderr and "lower student.lr" in proc.stderr
    phase = read_manifest(run_dir)["phases"][0]
    assert phase["status"] == "failed"
    # lr 1e30 wrecks the first step: nothing after it is a known-good state, so nothing was saved (the old
    # trainer kept checkpoints of steps 1 and 2 whose fakes were all NaN); the message says so
    assert phase["checkpoints"] == [] and "the phase start" in proc.stderr
    for rel in phase["checkpoints"]:  # (and whatever a run keeps is finite)
        assert _finite_checkpoint(run_dir / rel), rel
    # learning rates may change on resume (recorded in the manifest); the run restarts from the phase start
    proc = _train(run_dir, [*common, "student.lr=1e-4", "fake.lr=1e-4"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = read_manifest(run_dir)
    assert manifest["phases"][0]["status"] == "done"
    for rel in manifest["phases"][0]["checkpoints"]:
        assert _finite_checkpoint(run_dir / rel), rel
    changed = manifest["history"][-1]["changed"]
    assert changed["student.lr"] == [1e30, 1e-4] and changed["fake.lr"] == [1e30, 1e-4]
    steps = [r["step"] for r in read_metrics(run_dir)]
    assert steps == sorted(set(steps)), "metrics.jsonl repeats steps after the resume"


def test_only_learning_rates_and_cadence_may_change_on_resume(wan_tiny, tmp_path):
    from pdmd.core.config import load_config
    from pdmd.run.rundir import RunDir

    def check(*extra: str) -> dict:
        cfg = load_config(RECIPE, [*wan_tiny.overrides, *extra])
        return RunDir(tmp_path / "run").create_or_check(cfg.phase_plan().to_config(), cfg.hash(), [0, 1],
                                                        cfg.to_dict(), cfg.content(),
                                                        resume_changes=cfg.resume_changes)

    check("student.lr=1e30")
    manifest = check("student.lr=1e-4", "train.keep_last=5")
    assert manifest["history"][-1]["changed"] == {"student.lr": [1e30, 1e-4], "train.keep_last": [2, 5]}
    with pytest.raises(ValueError, match="another configuration"):  # what defines the result is fixed
        check("student.lr=1e-4", "train.keep_last=5", "method.fake_ratio=3")


def test_truncated_newest_checkpoint_falls_back_and_ctrl_c_saves(wan_tiny, tmp_path):
    """Ctrl-C mid-phase: checkpoint at the step boundary, exit 130; then the newest checkpoint is truncated
    and the rerun names it, resumes from the one before, and finishes with each metrics step once."""
    run_dir = tmp_path / "run"
    common = [*wan_tiny.overrides, "train.steps=6", "train.checkpoint_every=1", "train.keep_last=2",
              "plan.num_phases=1", "plan.num_steps=2", "plan.renoise_clamp=null"]
    cmd = [sys.executable, "-m", "pdmd.cli", "train", str(RECIPE), "--run-dir", str(run_dir), *common]
    env = {k: v for k, v in subprocess_env(MASTER_PORT=str(free_port())).items() if not k.startswith("SLURM")}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    try:
        import time

        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None and len(read_metrics(run_dir)) < 2:
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        err = proc.communicate(timeout=120)[1]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err and "Ctrl-C" in err
    phase = read_manifest(run_dir)["phases"][0]
    assert phase["status"] == "running" and len(phase["checkpoints"]) == 2 and phase["step"] < 6
    newest = run_dir / phase["checkpoints"][0]
    victim = max(newest.glob("*.distcp"), key=lambda f: f.stat().st_size)
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 3])
    done = _train(run_dir, common)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"checkpoint {newest} does not load" in done.stderr and "trying the one before it" in done.stderr
    assert read_manifest(run_dir)["phases"][0]["status"] == "done"
    steps = [r["step"] for r in read_metrics(run_dir)]
    assert steps == list(range(1, 7)), steps


@pytest.mark.parametrize("case", ["empty", "blank", "not utf-8", "no encoder"])
def test_make_prompt_shards_input_errors_exit_2_in_one_line(tmp_path, capsys, case):
    from tools.make_prompt_shards import main

    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes({"empty": b"", "blank": b"\n  \n\t\n", "not utf-8": b"a cat\n\xff\xfe dog\n",
                         "no encoder": b"a cat\n"}[case])
    code = main(["--prompts", str(prompts), "--out", str(tmp_path / "shards"), "--encoder", "umt5",
                 "--encoder-path", str(tmp_path / "missing"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("make_prompt_shards: ") and _one_line(err), (case, err)
    assert not (tmp_path / "shards").exists() or not list((tmp_path / "shards").glob("*.tar"))
