"""slurm/wan22_phased.sbatch on a real Slurm cluster: the one-node CPU cluster of scripts/setup_slurm.sh
(scripts/test.sh starts it when run as root), the tiny recipe, two tasks with parallel.tp=2, gloo.

One chain is driven through its life: phase 1's job gets USR1 on its batch shell (what
``--signal=B:USR1@grace`` does before the time limit), checkpoints, exits 75, requeues itself and
resumes; it then submits phase 2's job, which finishes the run. A second submission while the chain is
in flight, and a rerun afterwards, train nothing. Separately: a crash is requeued at most
PDMD_MAX_RETRIES times, and a configuration error is not retried at all. slurm/qwen_image_phased.sbatch
runs the tiny Qwen-Image recipe the same way (two tasks at parallel.tp=2, one job per phase).

Under CI=true a missing cluster fails these tests; elsewhere they skip with the reason.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, read_manifest, read_metrics

# The chain's fixture runs inside the first test that asks for it; its waits are bounded below.
pytestmark = pytest.mark.timeout(1800)
SCRIPT = ROOT / "slurm" / "wan22_phased.sbatch"
QWEN_SCRIPT = ROOT / "slurm" / "qwen_image_phased.sbatch"
SBATCH_SCRIPTS = sorted((ROOT / "slurm").glob("*.sbatch"))
DEFAULT_CONF = Path(os.environ.get("PDMD_SLURM_PREFIX", "/var/lib/pdmd-slurm")) / "slurm.conf"
STEPS = 6  # generator steps per phase: long enough to signal phase 1 in the middle
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                "DEADLINE", "PREEMPTED"}


# ------------------------------------------------------------------ scripts (no cluster needed)

def _contract_vars() -> set[str]:
    """The PDMD_* variables common.sh reads from the environment (its shell-internal ones excluded)."""
    text = (ROOT / "slurm" / "common.sh").read_text()
    names = set(re.findall(r"\bPDMD_[A-Z_]+[A-Z]\b", text))
    internal = {"PDMD_STATE_DIR", "PDMD_SIGNALLED", "PDMD_TERMINATED", "PDMD_SRUN_PID", "PDMD_SCRIPT"}
    # PDMD_NODES_PHASE / PDMD_OVERRIDES_PHASE are documented as PDMD_NODES_PHASE<k>.
    return names - internal


def test_sbatch_scripts_parse_and_document_their_contract():
    assert [p.name for p in SBATCH_SCRIPTS] == ["qwen_image_phased.sbatch", "wan22_phased.sbatch",
                                                "wan22_ti2v_phased.sbatch"]
    for path in [*SBATCH_SCRIPTS, ROOT / "slurm" / "common.sh", ROOT / "scripts" / "setup_slurm.sh"]:
        proc = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
        assert proc.returncode == 0, (path, proc.stderr)
    docs = (ROOT / "docs" / "slurm.md").read_text()
    for path in SBATCH_SCRIPTS:
        text = path.read_text()
        directives = re.findall(r"^#SBATCH (\S+)", text, re.M)
        # Slurm reads #SBATCH lines only before the first command.
        first_command = next(i for i, line in enumerate(text.splitlines()) if line and not line.startswith("#"))
        assert all(i < first_command for i, line in enumerate(text.splitlines()) if line.startswith("#SBATCH"))
        for option in ("--requeue", "--exclusive", "--mem=0", "--gpus-per-node=8", "--ntasks-per-node=8",
                       "--open-mode=append"):
            assert option in directives, (path.name, option)
        assert any(re.fullmatch(r"--signal=B:USR1@\d+", d) for d in directives), path.name
        assert any(d.startswith("--time=") for d in directives) and any(d.startswith("--nodes=") for d in directives)
        header = text[: text.index("\n#SBATCH ")]
        for name in _contract_vars():
            assert name in header, f"{path.name}: the header does not document {name}"
            assert name in docs, f"docs/slurm.md does not document {name}"


# ------------------------------------------------------------------ the batch logic, with fake Slurm commands
# What a GPU cluster would see (srun's and sbatch's command lines and environments), without Slurm.

FAKES = {
    "scontrol": """echo "scontrol $*" >> "$FAKE_DIR/calls"
case "$1 $2" in
    "show job") printf '   Command=%s\\n   StdOut=/logs/pdmd-wan22-%s.out\\n   StdErr=/logs/pdmd-wan22-%s.out\\n' \\
                "$FAKE_SCRIPT" "$3" "$3" ;;
    "show hostnames") printf 'node007\\nnode008\\n' ;;
    "requeue "*) (sleep 0.3; kill -TERM "$PPID") & ;;  # like Slurm: the running job is ended
esac""",
    "squeue": """echo "squeue $*" >> "$FAKE_DIR/calls"
case "$*" in *%l*) echo 4:00:00 ;; *%T*) echo "${FAKE_SQUEUE_STATE:-}" ;; esac""",
    "sbatch": """printf '%s\\n' "$@" > "$FAKE_DIR/sbatch.args"; env > "$FAKE_DIR/sbatch.env"; echo "42;cluster\"""",
    "srun": """printf '%s\\n' "$@" > "$FAKE_DIR/srun.args"; env > "$FAKE_DIR/srun.env"
[ -n "${FAKE_MANIFEST_AFTER:-}" ] && cp "$FAKE_MANIFEST_AFTER" "$PDMD_RUN_DIR/manifest.json"
exit "${FAKE_SRUN_RC:-0}\"""",
}


def _manifest_file(path: Path, statuses: list[str]) -> Path:
    path.write_text(json.dumps({"phases": [{"index": i, "status": st} for i, st in enumerate(statuses, 1)]}))
    return path


def _fake_job(tmp_path: Path, statuses: list[str], active_job: str | None = None,
              **env: str) -> tuple[subprocess.CompletedProcess, Path, Path]:
    """Run wan22_phased.sbatch as Slurm would (job 41, 2 nodes of 8 GPUs) with fake Slurm commands."""
    fake, run_dir = tmp_path / "fake", tmp_path / "run"
    (fake / "bin").mkdir(parents=True)
    for name, body in FAKES.items():
        (fake / "bin" / name).write_text("#!/bin/bash\n" + body + "\n")
        (fake / "bin" / name).chmod(0o755)
    (run_dir / "slurm").mkdir(parents=True)
    _manifest_file(run_dir / "manifest.json", statuses)
    if active_job:
        (run_dir / "slurm" / "active_job").write_text(active_job)
    base = {k: v for k, v in os.environ.items() if not k.startswith(("PDMD_", "SLURM_", "SBATCH_", "OMP_"))}
    base.update({
        "PATH": f"{fake / 'bin'}:{os.environ['PATH']}", "FAKE_DIR": str(fake), "FAKE_SCRIPT": str(SCRIPT),
        "SLURM_JOB_ID": "41", "SLURM_JOB_NAME": "pdmd-wan22", "SLURM_JOB_PARTITION": "gpu",
        "SLURM_JOB_ACCOUNT": "acc", "SLURM_JOB_QOS": "high", "SLURM_NTASKS_PER_NODE": "8",
        "SLURM_GPUS_PER_NODE": "8", "SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_NODELIST": "node[007-008]",
        "SLURM_CPUS_ON_NODE": "128", "SLURM_CONF": "/etc/slurm/slurm.conf",
        "PDMD_CONFIG": "configs/tiny_wan22.yaml", "PDMD_RUN_DIR": str(run_dir), "PDMD_HOST_PYTHON": sys.executable,
        **env,
    })
    proc = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, env=base, cwd=tmp_path, timeout=60)
    return proc, fake, run_dir


def _env_file(path: Path) -> dict[str, str]:
    return dict(line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)


def test_gpu_job_launches_one_task_per_gpu_and_submits_the_next_phase(tmp_path):
    after = _manifest_file(tmp_path / "after.json", ["done", "pending"])
    proc, fake, run_dir = _fake_job(
        tmp_path, ["pending", "pending"], FAKE_MANIFEST_AFTER=str(after), PDMD_CONTAINER_IMAGE="/img/pdmd.sqsh",
        PDMD_OVERRIDES="model.teacher.path=/t plan.boundaries=[1.0,0.5,0.0]", PDMD_OVERRIDES_PHASE1="parallel.tp=4",
        PDMD_OVERRIDES_PHASE2="parallel.tp=8", PDMD_NODES_PHASE2="4", PDMD_SBATCH_ARGS="--constraint=h100")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    srun = (fake / "srun.args").read_text().splitlines()
    mounts = f"{ROOT}:{ROOT},{tmp_path}:{tmp_path}"
    assert srun == ["--nodes=2", "--ntasks-per-node=8", "--cpus-per-task=16", "--kill-on-bad-exit=0", "--wait=120",
                    "--label", "--container-image=/img/pdmd.sqsh", f"--container-mounts={mounts}",
                    f"--container-workdir={tmp_path}", "python", "-m", "pdmd.cli", "train",
                    str(ROOT / "configs" / "tiny_wan22.yaml"), "--run-dir", str(run_dir), "--phase", "auto",
                    "model.teacher.path=/t", "plan.boundaries=[1.0,0.5,0.0]", "parallel.tp=4"]
    env = _env_file(fake / "srun.env")
    assert (env["MASTER_ADDR"], env["MASTER_PORT"]) == ("node007", "20041")
    assert env["CUDA_DEVICE_MAX_CONNECTIONS"] == "1" and env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1"
    assert env["OMP_NUM_THREADS"] == "1" and "CUDA_VISIBLE_DEVICES" not in env
    assert env["PYTHONPATH"].split(":")[0] == str(ROOT)
    sbatch = (fake / "sbatch.args").read_text().splitlines()
    assert sbatch == ["--parsable", "--nodes=4", "--dependency=afterok:41", "--kill-on-invalid-dep=yes",
                      "--job-name=pdmd-wan22", "--partition=gpu", "--account=acc", "--qos=high",
                      "--ntasks-per-node=8", "--gpus-per-node=8", "--time=4:00:00",
                      "--output=/logs/pdmd-wan22-%j.out", "--error=/logs/pdmd-wan22-%j.out", "--constraint=h100",
                      str(SCRIPT)]
    env = _env_file(fake / "sbatch.env")
    assert not [k for k in env if k.startswith(("SLURM_", "SRUN_")) and k != "SLURM_CONF"] and "MASTER_ADDR" not in env
    assert env["PDMD_OVERRIDES_PHASE2"] == "parallel.tp=8" and env["SLURM_CONF"] == "/etc/slurm/slurm.conf"
    assert (run_dir / "slurm" / "active_job").read_text().strip() == "42"
    assert [e["event"] for e in _events(run_dir)] == ["start", "exit", "submitted"]
    assert _events(run_dir)[-1]["next_job"] == "42" and _events(run_dir)[-1]["nodes"] == "4"


def test_cpu_job_preempted_requeues_itself(tmp_path):
    proc, fake, run_dir = _fake_job(tmp_path, ["done", "pending"], PDMD_DEVICE="cpu", FAKE_SRUN_RC="75",
                                    PDMD_PYTHON=sys.executable)
    assert proc.returncode == 75, proc.stdout + proc.stderr
    env = _env_file(fake / "srun.env")
    assert env["CUDA_VISIBLE_DEVICES"] == "" and env["OMP_NUM_THREADS"] == "16"
    assert "scontrol requeue 41" in (fake / "calls").read_text()
    assert [e["event"] for e in _events(run_dir)] == ["start", "exit", "requeue"]
    assert not (fake / "sbatch.args").exists()


@pytest.mark.parametrize("rc, retries, events", [("1", "0", ["start", "exit", "give_up"]),
                                                  ("1", "1", ["start", "exit", "requeue"]),
                                                  ("2", "5", ["start", "exit", "give_up"])])
def test_failures_are_retried_within_the_cap_and_config_errors_never(tmp_path, rc, retries, events):
    proc, fake, run_dir = _fake_job(tmp_path, ["pending", "pending"], FAKE_SRUN_RC=rc, PDMD_MAX_RETRIES=retries,
                                    PDMD_PYTHON=sys.executable)
    assert proc.returncode == int(rc), proc.stdout + proc.stderr
    assert [e["event"] for e in _events(run_dir)] == events
    assert ("scontrol requeue" in (fake / "calls").read_text()) == (events[-1] == "requeue")


@pytest.mark.parametrize("statuses, active, state, event", [(["done", "done"], None, "", "skip"),
                                                             (["pending", "pending"], "40", "RUNNING", "busy"),
                                                             (["done", "pending"], "40", "PENDING", "busy")])
def test_finished_or_busy_run_dirs_launch_nothing(tmp_path, statuses, active, state, event):
    proc, fake, run_dir = _fake_job(tmp_path, statuses, active, FAKE_SQUEUE_STATE=state, PDMD_PYTHON=sys.executable)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert [e["event"] for e in _events(run_dir)] == [event]
    assert not (fake / "srun.args").exists()


# ------------------------------------------------------------------ the cluster

def _slurm_env() -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "PYTHONPATH": str(ROOT)}
    conf = os.environ.get("PDMD_SLURM_CONF") or (str(DEFAULT_CONF) if DEFAULT_CONF.is_file() else None)
    if conf:
        env["SLURM_CONF"] = conf
    for key in [k for k in env if k.startswith(("PDMD_", "SBATCH_", "SLURM_")) and k != "SLURM_CONF"]:
        del env[key]
    return env


@pytest.fixture(scope="module")
def cluster():
    """The environment that reaches the test cluster; fails under CI, skips elsewhere, if there is none."""
    env = _slurm_env()
    why = None
    if "SLURM_CONF" not in env:
        why = f"no Slurm test cluster ({DEFAULT_CONF} missing): run `sudo bash scripts/setup_slurm.sh`"
    else:
        try:
            proc = subprocess.run(["sinfo", "-h", "-N", "-o", "%t"], capture_output=True, text=True, env=env,
                                  timeout=30)
            states = proc.stdout.split()
            if proc.returncode != 0 or not {"idle", "mix", "alloc"} & set(states):
                why = f"Slurm cluster at {env['SLURM_CONF']} not usable: sinfo rc={proc.returncode} " \
                      f"{proc.stdout.strip()!r} {proc.stderr.strip()[-300:]!r}; rerun scripts/setup_slurm.sh"
        except (OSError, subprocess.TimeoutExpired) as exc:
            why = f"Slurm client not usable ({exc}): run `sudo bash scripts/setup_slurm.sh`"
    if why:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"CI needs the Slurm test cluster: {why}")
        pytest.skip(why)
    return env


class Jobs:
    """Submitted job ids, so that teardown cancels whatever is left (by id, ours only)."""

    def __init__(self, env: dict[str, str], workdir: Path) -> None:
        self.env, self.workdir, self.ids = env, workdir, []

    def submit(self, run_dir: Path, overrides: list[str], *extra: str, wait: bool = False, tasks: int = 2,
               script: Path = SCRIPT, config: str = "configs/tiny_wan22.yaml", **contract: str) -> tuple[str, int]:
        env = {**self.env, "PDMD_DEVICE": "cpu", "PDMD_CONFIG": config,
               "PDMD_RUN_DIR": str(run_dir), "PDMD_OVERRIDES": " ".join(overrides),
               "PDMD_PYTHON": sys.executable, **contract}
        cmd = ["sbatch", "--parsable", "--nodes=1", f"--ntasks-per-node={tasks}", "--gpus-per-node=0", "--time=30",
               f"--output={self.workdir}/%x-%j.out", *(["--wait"] if wait else []), *extra, str(script)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=self.workdir, timeout=600)
        assert proc.stdout.strip(), f"sbatch failed: {proc.stderr}"
        job = proc.stdout.strip().split(";")[0]
        self.ids.append(job)
        return job, proc.returncode

    def info(self, job: str) -> dict[str, str]:
        proc = subprocess.run(["scontrol", "-o", "show", "job", job], capture_output=True, text=True,
                              env=self.env, timeout=30)
        return dict(re.findall(r"(\w+)=(\S*)", proc.stdout))

    def log(self, job: str) -> str:
        """The job's output (``--output=%x-%j.out``: the script's job name, then the job id)."""
        paths = list(self.workdir.glob(f"*-{job}.out"))
        return paths[0].read_text() if paths else ""

    def scancel(self, *args: str) -> None:
        subprocess.run(["scancel", *args], check=True, env=self.env, timeout=30)

    def cancel_all(self) -> None:
        live = [j for j in self.ids if self.info(j).get("JobState") not in FINAL_STATES]
        if live:
            subprocess.run(["scancel", *live], env=self.env, timeout=30)


def _events(run_dir: Path) -> list[dict[str, str]]:
    path = run_dir / "slurm" / "jobs.log"
    if not path.is_file():
        return []
    return [dict(re.findall(r"(\w+)=(\S+)", line)) for line in path.read_text().splitlines()]


def _wait(what: str, cond, jobs: Jobs, run_dir: Path, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.5)
    logs = "\n".join(f"--- job {j}\n{jobs.log(j)[-2500:]}" for j in jobs.ids)
    events = (run_dir / "slurm" / "jobs.log").read_text() if (run_dir / "slurm" / "jobs.log").is_file() else ""
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\njobs.log:\n{events}\n{logs}")


@pytest.fixture(scope="module")
def tiny(wan_tiny, tmp_path_factory):
    """(a folder for this module's runs, the overrides naming the session's tiny Wan teacher and shards)."""
    return tmp_path_factory.mktemp("slurm_runs"), wan_tiny.overrides


@pytest.fixture(scope="module")
def jobs(cluster, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("slurm_jobs")
    jobs = Jobs(cluster, workdir)
    yield jobs
    jobs.cancel_all()


@pytest.fixture(scope="module")
def chain(tiny, jobs):
    """Phase 1 preempted through the batch shell and resumed; phase 2 by the job phase 1 submits."""
    root, overrides = tiny
    run_dir = root / "chain"
    overrides = [*overrides, "parallel.tp=2", f"train.steps={STEPS}", "train.checkpoint_every=100"]
    tic = time.monotonic()
    first, _ = jobs.submit(run_dir, overrides)
    _wait("phase 1's first logged step", lambda: any("phase1/generator_loss" in r for r in read_metrics(run_dir)),
          jobs, run_dir)
    jobs.scancel("--batch", "--signal=USR1", first)  # what --signal=B:USR1@grace does before the time limit
    duplicate, _ = jobs.submit(run_dir, overrides)  # a second submission while the chain is in flight

    def finished() -> bool:
        done = any(e.get("event") == "finished" for e in _events(run_dir))
        return done and all(jobs.info(j).get("JobState") in FINAL_STATES for j in jobs.ids)

    _wait("the chain to finish", finished, jobs, run_dir, timeout=900)
    second = next(e["next_job"] for e in _events(run_dir) if e.get("event") == "submitted")
    return {"run_dir": run_dir, "first": first, "second": second, "duplicate": duplicate,
            "overrides": overrides, "steps": STEPS, "seconds": time.monotonic() - tic}


@pytest.fixture(scope="module")
def qwen_chain(qwen_tiny, tiny, jobs):
    """slurm/qwen_image_phased.sbatch with the tiny Qwen-Image recipe, 2 steps a phase, undisturbed."""
    run_dir = tiny[0] / "qwen_chain"
    overrides = [*qwen_tiny.overrides, "parallel.tp=2", "train.steps=2", "method.fake_ratio=1"]
    tic = time.monotonic()
    first, _ = jobs.submit(run_dir, overrides, script=QWEN_SCRIPT, config="configs/tiny_qwen_image.yaml")

    def finished() -> bool:
        done = any(e.get("event") == "finished" for e in _events(run_dir))
        return done and all(jobs.info(j).get("JobState") in FINAL_STATES for j in jobs.ids)

    _wait("the Qwen-Image chain to finish", finished, jobs, run_dir, timeout=900)
    second = next(e["next_job"] for e in _events(run_dir) if e.get("event") == "submitted")
    return {"run_dir": run_dir, "first": first, "second": second, "steps": 2, "seconds": time.monotonic() - tic}


@pytest.mark.slow
@pytest.mark.parametrize("family", ["wan", "qwen"])
def test_chain_runs_each_phase_in_its_own_job(request, family, jobs):
    """Wan: phase 1's job preempted once (USR1) and requeued; Qwen-Image: undisturbed."""
    chain = request.getfixturevalue("chain" if family == "wan" else "qwen_chain")
    run_dir, first, second, steps = chain["run_dir"], chain["first"], chain["second"], chain["steps"]
    assert first != second  # phase 2 ran in the job phase 1 submitted
    manifest = read_manifest(run_dir)
    assert [p["status"] for p in manifest["phases"]] == ["done", "done"]
    rows = read_metrics(run_dir)
    assert len([r for r in rows if "phase1/generator_loss" in r]) == steps
    assert len([r for r in rows if "phase2/generator_loss" in r]) == steps
    starts = [(e["job"], e["phase"]) for e in _events(run_dir) if e.get("event") == "start"]
    requeued = [(first, "1")] if family == "wan" else []
    assert starts == [(first, "1"), *requeued, (second, "2")], starts
    for job in (first, second):
        info = jobs.info(job)
        assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), info
    assert "0: phase 2 step" in jobs.log(second) and "1: " in jobs.log(second)  # two labelled tasks
    print(f"{family} chain took {chain['seconds']:.0f} s")


@pytest.mark.slow
def test_usr1_checkpoints_requeues_and_resumes_where_it_stopped(chain, jobs):
    run_dir, first = chain["run_dir"], chain["first"]
    events = [e for e in _events(run_dir) if e["job"] == first]
    assert [e["event"] for e in events] == ["start", "exit", "requeue", "start", "exit", "submitted"], events
    assert (events[1]["rc"], events[1].get("signal")) == ("75", "USR1")
    assert [e["restart"] for e in events] == ["0", "0", "0", "1", "1", "1"]
    assert jobs.info(first)["Restarts"] == "1"
    stopped = re.findall(r"phase 1: signal \d+ received, checkpoint at step (\d+) saved", jobs.log(first))
    assert len(stopped) == 2 and stopped[0] == stopped[1], stopped  # both tasks, the same step
    assert 1 <= int(stopped[0]) < STEPS
    # The step count continues after the requeue: every step once, in order.
    steps = [r["step"] for r in read_metrics(run_dir) if "phase1/generator_loss" in r]
    assert steps == list(range(1, STEPS + 1)), steps


@pytest.mark.slow
def test_submitting_while_the_chain_runs_trains_nothing(chain, jobs):
    run_dir, duplicate = chain["run_dir"], chain["duplicate"]
    events = [e for e in _events(run_dir) if e["job"] == duplicate]
    assert [e["event"] for e in events] in (["busy"], ["skip"]), events
    assert (jobs.info(duplicate)["JobState"], jobs.info(duplicate)["ExitCode"]) == ("COMPLETED", "0:0")


@pytest.mark.slow
def test_rerun_on_a_finished_run_is_idempotent(chain, jobs):
    run_dir = chain["run_dir"]
    before = {p: p.read_bytes() for p in (run_dir / "manifest.json", run_dir / "metrics.jsonl")}
    tree = sorted(str(p.relative_to(run_dir)) for p in (run_dir / "checkpoints").rglob("*"))
    job, rc = jobs.submit(run_dir, chain["overrides"], wait=True)
    assert rc == 0, jobs.log(job)
    assert [e["event"] for e in _events(run_dir) if e["job"] == job] == ["skip"]
    assert "srun" not in jobs.log(job)
    assert {p: p.read_bytes() for p in before} == before
    assert sorted(str(p.relative_to(run_dir)) for p in (run_dir / "checkpoints").rglob("*")) == tree
    assert not [e for e in _events(run_dir) if e["job"] == job and e.get("event") == "submitted"]


@pytest.mark.slow
def test_crash_is_requeued_at_most_max_retries_times(tiny, jobs):
    root, overrides = tiny
    # A teacher whose weights are garbage: the config is valid, loading the model crashes (exit 1).
    broken = root / "broken_teacher"
    teacher = Path(overrides[0].split("=", 1)[1])
    for sub in ("transformer", "transformer_2"):
        (broken / sub).mkdir(parents=True)
        (broken / sub / "config.json").write_bytes((teacher / sub / "config.json").read_bytes())
        (broken / sub / "diffusion_pytorch_model.safetensors").write_bytes(b"\x08\x00\x00\x00not a safetensors")
    (broken / "model_index.json").write_bytes((teacher / "model_index.json").read_bytes())
    run_dir = root / "crash"
    job, _ = jobs.submit(run_dir, [f"model.teacher.path={broken}", overrides[1]], tasks=1, PDMD_MAX_RETRIES="1")
    _wait("the crashing job to give up", lambda: jobs.info(job).get("JobState") in FINAL_STATES, jobs, run_dir)
    info = jobs.info(job)
    assert (info["JobState"], info["Restarts"]) == ("FAILED", "1"), info
    events = _events(run_dir)
    assert [e["event"] for e in events] == ["start", "exit", "requeue", "start", "exit", "give_up"], events
    assert events[1]["rc"] == events[4]["rc"] == info["ExitCode"].split(":")[0] not in ("0", "2", "75")
    assert events[-1]["reason"] == "crash"


@pytest.mark.slow
def test_config_error_is_not_retried(tiny, jobs):
    root, overrides = tiny
    run_dir = root / "bad_config"
    job, _ = jobs.submit(run_dir, [*overrides, "train.steps=0"], tasks=1)
    _wait("the misconfigured job to end", lambda: jobs.info(job).get("JobState") in FINAL_STATES, jobs, run_dir)
    info = jobs.info(job)
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("FAILED", "2:0", "0"), info
    assert [e["event"] for e in _events(run_dir)] == ["start", "exit", "give_up"]
    assert "train.steps=0" in jobs.log(job)
    assert not (run_dir / "manifest.json").exists()


def test_setup_slurm_is_idempotent_and_fast(cluster):
    if os.geteuid() != 0:
        pytest.skip("scripts/setup_slurm.sh needs root")
    tic = time.monotonic()
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "setup_slurm.sh")], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "cluster up" in proc.stdout and "starting" not in proc.stdout and "installing" not in proc.stdout
    assert time.monotonic() - tic < 10
