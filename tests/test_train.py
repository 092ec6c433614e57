"""The trainer end to end on tiny teachers: both phases complete with the manifest/metrics contracts (Wan2.2
with W&B and previews, and Qwen-Image), a kill -9 in phase 2 resumes to bit-identical experts (sequential
and interleaved schedules, fp32 and bf16), a TP=2 run stopped by SIGUSR1 resumes at TP=1, non-finite steps
stop a phase, and bad configs of either family fail before any model is built."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pdmd.core.config import ConfigError, load_config
from pdmd.core.distributed import free_port
from pdmd.core.method import make_generator
from pdmd.run.rundir import tree_hash
from tests.conftest import ROOT, read_manifest, subprocess_env
from tests.conftest import read_metrics as _metrics

RECIPE = ROOT / "configs" / "tiny_wan22.yaml"
QWEN_RECIPE = ROOT / "configs" / "tiny_qwen_image.yaml"
INTERLEAVED = ["method.schedule=interleaved", "train.checkpoint_every=2", "student.ema=0.5"]  # + the average
pytestmark = pytest.mark.multirank


@pytest.fixture(scope="module")
def tiny(wan_tiny, tmp_path_factory):
    """(a folder for this module's runs, the overrides naming the session's tiny Wan teacher and shards)."""
    return tmp_path_factory.mktemp("train"), wan_tiny.overrides


def _cmd(run_dir: Path, overrides: list[str], nproc: int = 1) -> list[str]:
    train = ["-m", "pdmd.cli", "train", str(RECIPE), "--run-dir", str(run_dir), *overrides]
    if nproc == 1:
        return [sys.executable, *train]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port",
            str(free_port()), *train]


def _env() -> dict[str, str]:
    """A single-process run's own rendezvous port: runs started together must not pick the same one."""
    return subprocess_env(MASTER_PORT=str(free_port()))


def _train(run_dir: Path, overrides: list[str], nproc: int = 1) -> subprocess.CompletedProcess:
    return subprocess.run(_cmd(run_dir, overrides, nproc), capture_output=True, text=True, env=_env(), timeout=300)


def _expert_tensors(run_dir: Path, k: int) -> dict[str, torch.Tensor]:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = run_dir / f"expert{k}.pt"
    dcp_to_torch_save(run_dir / "checkpoints" / f"phase{k}" / "expert", out)
    state = torch.load(out, weights_only=False)  # our own file, written just above
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def _start_and_kill(run_dir: Path, overrides: list[str], when, sig: int, nproc: int = 1, one_rank: bool = False) -> int:
    """Start a run, wait until ``when(metrics)`` holds, send ``sig`` (to one rank only with ``one_rank``),
    return the exit code."""
    proc = subprocess.Popen(_cmd(run_dir, overrides, nproc), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=_env(), start_new_session=True)
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            path = run_dir / "metrics.jsonl"
            if path.is_file() and when(_metrics(run_dir)):
                if sig == signal.SIGKILL:
                    os.killpg(proc.pid, sig)
                elif nproc > 1:  # signal the ranks, as Slurm does: torchrun's agent may SIGKILL slow savers
                    import psutil

                    ranks = sorted(psutil.Process(proc.pid).children(), key=lambda p: p.pid)
                    for child in ranks[-1:] if one_rank else ranks:
                        child.send_signal(sig)
                else:
                    proc.send_signal(sig)
                break
            time.sleep(0.05)
        return proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


class _Started:
    """A `pdmd train` started now and waited for by the test that reads it (output in files: no pipe fills)."""

    def __init__(self, run_dir: Path, overrides: list[str]) -> None:
        self.out, self.err = run_dir.with_name(run_dir.name + ".out"), run_dir.with_name(run_dir.name + ".err")
        with open(self.out, "w") as out, open(self.err, "w") as err:
            self.proc = subprocess.Popen(_cmd(run_dir, overrides), stdout=out, stderr=err, env=_env())

    def result(self) -> subprocess.CompletedProcess:
        code = self.proc.wait(timeout=600)
        return subprocess.CompletedProcess(self.proc.args, code, self.out.read_text(), self.err.read_text())

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def started(tiny):
    """The module's uninterrupted runs, started together when the first is needed (a single-rank run leaves
    one of 2 cores idle): ``full`` (the Wan contract run with previews, the kill -9 test's reference),
    ``interleaved_full`` (the interleaved schedule's reference) and ``nan`` (every step non-finite)."""
    from pdmd.bench.tiny_models import tiny_vae

    root, overrides = tiny
    tiny_vae().save_pretrained(root / "vae")  # previews: logging settings are not part of the run's identity
    extras = {"full": ["logging.sample_every=2", "logging.sample_count=2", f"logging.vae={root / 'vae'}",
                       "logging.console_every=3", "logging.eval_every=2"],
              "interleaved_full": INTERLEAVED,
              # A CFG scale this large overflows fp32: every DMD target is inf/nan, every generator step skipped.
              "nan": ["method.cfg_scale=1e39", "train.checkpoint_every=1", "train.max_bad_steps=2"]}
    runs = {name: _Started(root / name, [*overrides, *extra]) for name, extra in extras.items()}
    yield runs
    for run in runs.values():
        run.stop()


@pytest.fixture(scope="module")
def full_run(tiny, started):
    proc = started["full"].result()
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # a batch log (no terminal): what was built, a step line every logging.console_every steps and the
    # phase's last, the expert's save and hash
    lines = proc.stdout.splitlines()
    assert "phase 1: roles teacher0, student, fake0 built in" in proc.stdout
    assert [line.split(" generator_loss")[0] for line in lines if " step " in line] == [
        f"phase {k} step {n}/4" for k in (1, 2) for n in (3, 4)]
    assert sum(line.startswith(f"phase {k}: expert saved to") for line in lines for k in (1, 2)) == 2
    return tiny[0] / "full"


@pytest.mark.parametrize("family", ["wan", "qwen"])
def test_two_phase_run_completes_with_contracts(request, family):
    """Wan: this module's run (previews, W&B offline); Qwen-Image: conftest's qwen_runs (also exported)."""
    if family == "wan":
        run_dir = request.getfixturevalue("full_run")
    else:
        run_dir = request.getfixturevalue("qwen_runs")["root"] / "run"
    manifest = read_manifest(run_dir)
    assert [p["index"] for p in manifest["phases"]] == [1, 2]
    assert all(p["status"] == "done" for p in manifest["phases"])
    # Wan: the high-noise expert, then the low-noise one; Qwen-Image: one teacher transformer
    assert [p["student_expert"] for p in manifest["phases"]] == ([0, 1] if family == "wan" else [0, 0])
    assert manifest["config"]["model"]["kind"] == ("wan" if family == "wan" else "qwen-image")
    for p in manifest["phases"]:  # earlier experts unchanged by later phases
        assert tree_hash(run_dir / p["expert"]) == p["expert_hash"]
    rows = _metrics(run_dir)
    keys = set().union(*rows)
    for k in (1, 2):
        assert {f"phase{k}/generator_loss", f"phase{k}/fake_loss", f"phase{k}/dmd_grad_norm",
                f"phase{k}/student_grad_norm", f"phase{k}/fake_grad_norm", f"phase{k}/samples_per_s",
                f"phase{k}/t_mean"} <= keys
        assert len([r for r in rows if f"phase{k}/generator_loss" in r]) == 4
    if family == "qwen":
        # phase 1 re-noises in (t_2, 1) = (0.75, 1): Qwen-Image's reverse nested interval
        assert min(r["phase1/t_min"] for r in rows if "phase1/t_min" in r) > 0.75
        return
    assert {f"phase{k}/dmd_normaliser" for k in (1, 2)} <= keys
    # logging.eval_every=2: the preview prompts' diversity across 3 seeds, in latents and decoded pixels
    for k in (1, 2):
        checks = [r for r in rows if f"phase{k}/diversity_latent_cosine" in r]
        assert [r["step"] % 4 for r in checks] == [2, 0] and all(-1 <= r[f"phase{k}/diversity_latent_cosine"] < 1
                                                                 and r[f"phase{k}/diversity_pixel_rms"] > 0 for r in checks)
    offline = list((run_dir / "wandb").glob("offline-run-*"))
    assert offline, "an offline W&B run is written"
    # Previews every 2 steps (2 latent frames decode to 5-frame GIFs), and the same files in W&B's media.
    assert sorted(p.name for p in (run_dir / "samples").iterdir()) == [
        f"phase{k}_step{n}_{i}.gif" for k in (1, 2) for n in (2, 4) for i in (0, 1)]
    assert len(list(offline[0].rglob("media/videos/phase*/*.gif"))) == 8
    assert (run_dir / "checkpoints" / "phase2" / "expert").is_dir()


def test_kill_minus_9_in_phase_2_resumes_to_identical_experts(tiny, full_run):
    root, overrides = tiny
    run_dir = root / "killed"
    code = _start_and_kill(run_dir, overrides,
                           lambda rows: sum("phase2/generator_loss" in r for r in rows) >= 3, signal.SIGKILL)
    assert code != 0
    manifest = read_manifest(run_dir)
    assert manifest["phases"][1]["status"] == "running"
    proc = _train(run_dir, overrides)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for k in (1, 2):
        ours, ref = _expert_tensors(run_dir, k), _expert_tensors(full_run, k)
        assert ours.keys() == ref.keys() and ours
        for name, value in ours.items():
            assert torch.equal(value, ref[name]), (k, name)


def test_usr1_at_tp2_saves_and_resumes_at_tp1(tiny):
    """USR1 reaches one rank only: the ranks agree at the next step boundary and save together."""
    root, overrides = tiny
    run_dir = root / "tp2_then_tp1"
    tp2 = [*overrides, "parallel.tp=2", "train.checkpoint_every=100"]
    code = _start_and_kill(run_dir, tp2, lambda rows: len(rows) >= 1, signal.SIGUSR1, nproc=2, one_rank=True)
    assert code != 0  # torchrun reports the workers' exit code 75 as a failure
    manifest = read_manifest(run_dir)
    phase1 = manifest["phases"][0]
    assert phase1["checkpoints"] and phase1["status"] == "running", manifest
    stopped_at = phase1["step"]
    assert 1 <= stopped_at < 4
    proc = _train(run_dir, [*overrides, "parallel.tp=1", "train.checkpoint_every=100"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    steps = [r["step"] for r in _metrics(run_dir) if "phase1/generator_loss" in r]
    assert steps[-1] == 4 and all(s <= stopped_at for s in steps[:stopped_at])


@pytest.mark.parametrize(
    "family, override, message",
    [
        ("wan", "plan.boundaries=[1.0,0.5,0.7,0.0]", "plan:"),
        ("wan", "method.fake_ratio=0", "method.fake_ratio=0"),
        ("wan", "model.teacher.path=/nonexistent", "model.teacher.path"),
        ("wan", "train.stepz=3", "unknown config key 'train.stepz'"),
        ("wan", "method.dmd_form=score", "method.dmd_form='score'"),
        ("qwen", "model.teacher.subfolders=[transformer,transformer_2]", "model.teacher.subfolders"),
        ("qwen", "train.latent_shape=[4,2,8,8]", "train.latent_shape"),
        ("qwen", "data.model=wan", "data.model"),
        ("qwen", "model.kind=wan", "model.kind"),
    ],
)
def test_bad_config_fails_before_any_model(request, family, override, message):
    if family == "qwen":  # the config never opens the shards: any path satisfies it
        recipe, overrides = QWEN_RECIPE, [f"model.teacher.path={request.getfixturevalue('qwen_tiny').teacher}",
                                          "data.shards=unused"]
    else:
        recipe, overrides = RECIPE, request.getfixturevalue("tiny")[1]
    if override.startswith("plan."):
        overrides = [*overrides, "plan.num_phases=null"]
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(").replace(".", r"\.")):
        load_config(recipe, [*overrides, override])


def test_bad_config_exit_code_and_message(tiny, tmp_path):
    _, overrides = tiny
    proc = _train(tmp_path / "run", [*overrides, "method.fake_ratio=0"])
    assert proc.returncode == 2
    assert "method.fake_ratio=0" in proc.stderr
    assert not (tmp_path / "run").exists()


def test_randomness_same_for_model_parallel_peers_different_across_replicas():
    def draw(dp_rank):
        return torch.randn(4, generator=make_generator(7, 2, 11, "generator", dp_rank))

    assert torch.equal(draw(0), draw(0))  # every TP/PP/CP peer of a replica passes the same dp rank
    assert not torch.equal(draw(0), draw(1))
    assert not torch.equal(torch.randn(4, generator=make_generator(7, 2, 12, "generator", 0)), draw(0))


def test_non_finite_steps_stop_the_phase_with_checkpoints_intact(tiny, started):
    run_dir = tiny[0] / "nan"
    proc = started["nan"].result()
    assert proc.returncode == 3  # diverged: the Slurm scripts do not retry it
    assert "2 steps in a row had a non-finite" in proc.stderr and "the phase start" in proc.stderr
    phase1 = read_manifest(run_dir)["phases"][0]
    # every step was skipped: no checkpoint was written from a state after a skipped step
    assert phase1["status"] == "failed" and phase1["step"] == 0 and phase1["checkpoints"] == []
    assert not (run_dir / "checkpoints" / "phase1").exists() or not list((run_dir / "checkpoints" / "phase1").glob("step*"))
    rows = _metrics(run_dir)
    assert rows[0]["phase1/skipped"] == 1.0 and rows[0]["phase1/generator_loss"] is None


def test_paper_recipe_parses_with_its_settings(tiny):
    _, overrides = tiny
    cfg = load_config(ROOT / "configs" / "wan22_t2v_a14b.yaml", overrides)
    plan = cfg.phase_plan()
    assert [round(1000 * t) for t in plan.timesteps] == [1000, 938, 833, 625]
    assert plan.renoise_interval(1)[0] == pytest.approx(0.875) and plan.renoise_interval(2) == (plan.phase_end(2), 1.0)
    assert (cfg.student.lora.rank, cfg.student.lora.alpha, cfg.student.lr, cfg.fake.lr, cfg.method.fake_ratio) == (
        64, 8.0, 5e-5, 4e-7, 5)


def test_qwen_tiny_recipe_and_paper_recipe_load(qwen_tiny):
    teacher = [f"model.teacher.path={qwen_tiny.teacher}", "data.shards=unused"]
    cfg = load_config(QWEN_RECIPE, teacher)
    paper = load_config(ROOT / "configs" / "qwen_image.yaml", teacher)
    for c in (cfg, paper):  # the paper's Qwen-Image schedule: shift 3 -> 1000, 900, 750, 500; phase 1 in (0.75, 1)
        plan = c.phase_plan()
        assert [round(t * 1000, 6) for t in plan.timesteps] == [1000.0, 900.0, 750.0, 500.0]
        assert plan.renoise_interval(1) == pytest.approx((0.75, 1.0))
    assert paper.model.kind == "qwen-image" and paper.train.latent_shape == [16, 1, 128, 128]


def test_interleaved_schedule_alternates_phases_and_resumes_bit_identically(tiny, started):
    """LightX2V's arrangement: both phases' roles resident, iterations alternate; a kill -9 mid-run and a
    rerun give the experts of an uninterrupted run (the checkpoint holds every region's roles and, with
    student.ema, their averages); its LoRA files export and equal the merged experts."""
    root, overrides = tiny
    inter = [*overrides, *INTERLEAVED]
    full = root / "interleaved_full"
    proc = started["interleaved_full"].result()
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = read_manifest(full)
    assert [(p["status"], p["step"]) for p in manifest["phases"]] == [("done", 4), ("done", 4)]
    order = [1 if "phase1/generator_loss" in r else 2 for r in _metrics(full)]
    assert order == [1, 2] * 4
    killed = root / "interleaved_killed"
    code = _start_and_kill(killed, inter, lambda rows: len(rows) >= 5, signal.SIGKILL)
    assert code != 0
    proc = _train(killed, inter)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for k in (1, 2):
        ours, ref = _expert_tensors(killed, k), _expert_tensors(full, k)
        assert ours.keys() == ref.keys() and all(torch.equal(ours[n], ref[n]) for n in ours), k
    # --lora-only reads each region's averaged adapters from the one checkpoint; --verify loads them with
    # WanPipeline.load_lora_weights and compares with our sampler over the merged experts
    proc = subprocess.run([sys.executable, "-m", "pdmd.cli", "export", "--run", str(full), "--out",
                           str(root / "interleaved_lora"), "--lora-only", "--verify"],
                          capture_output=True, text=True, env=_env(), timeout=300)
    assert proc.returncode == 0 and "PASS" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-3000:]
    proc = _train(root / "interleaved_one", [*inter, "plan.num_phases=1", "plan.renoise_clamp=null"])
    assert proc.returncode == 2 and "method.schedule=interleaved needs plan.num_phases >= 2" in proc.stderr


def test_bf16_run_checkpoints_and_resumes(tiny):
    """bf16 models (every parameter, norms included, in bf16; fp32 main weights in the optimizer) save
    and load the distributed optimizer's checkpoint."""
    root, overrides = tiny
    run_dir = root / "bf16"
    bf16 = [*overrides, "model.dtype=bf16", "train.checkpoint_every=1", "train.steps=3"]
    code = _start_and_kill(run_dir, bf16, lambda rows: len(rows) >= 2, signal.SIGKILL)
    assert code != 0
    proc = _train(run_dir, bf16)
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = read_manifest(run_dir)
    assert [p["status"] for p in manifest["phases"]] == ["done", "done"]
    assert [r["step"] for r in _metrics(run_dir)][-1] == 6
