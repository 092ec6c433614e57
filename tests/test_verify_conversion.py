"""tools/verify_conversion.py as users run it: torchrun, a diffusers folder, a layout, one last line."""

from __future__ import annotations

import subprocess
import sys

import pytest

from pdmd.core.distributed import free_port
from tests import tiny_qwen, tiny_wan
from tests.conftest import ROOT, subprocess_env

pytestmark = pytest.mark.multirank
SIZES = ["--frames", "2", "--height", "8", "--width", "8", "--text-len", "7"]


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("wan_pipeline")
    tiny_wan.diffusers_model("t2v").save_pretrained(folder / "transformer_2")
    (folder / "model_index.json").write_text("{}")
    return folder


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("qwen_image_pipeline")
    tiny_qwen.diffusers_model().save_pretrained(folder / "transformer")
    (folder / "model_index.json").write_text("{}")
    return folder


def _cmd(nproc: int, *args: str, model: str = "wan") -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port",
            str(free_port()), str(ROOT / "tools" / "verify_conversion.py"), "--model", model, *args]


def _run(nproc: int, *args: str, model: str = "wan") -> subprocess.CompletedProcess:
    return subprocess.run(_cmd(nproc, *args, model=model), capture_output=True, text=True, env=subprocess_env(),
                          timeout=150)


@pytest.fixture(scope="module")
def one_rank(pipeline_dir, qwen_dir, tmp_path_factory):
    """The single-rank commands, started together on first use (one rank leaves one of 2 cores idle):
    name -> a function that waits for its CompletedProcess."""
    cases = {
        "tolerance": _cmd(1, "--diffusers", str(pipeline_dir), "--subfolder", "transformer_2", "--dtype", "bf16",
                          "--rtol", "1e-9", *SIZES),
        "wan_no_subfolder": _cmd(1, "--diffusers", str(pipeline_dir), *SIZES),
        "qwen_no_subfolder": _cmd(1, "--diffusers", str(qwen_dir), *QWEN_SIZES, model="qwen-image"),
    }
    logs = tmp_path_factory.mktemp("verify_logs")
    procs = {}
    for name, cmd in cases.items():
        with open(logs / f"{name}.out", "w") as out, open(logs / f"{name}.err", "w") as err:
            procs[name] = subprocess.Popen(cmd, stdout=out, stderr=err, env=subprocess_env())

    def result(name: str) -> subprocess.CompletedProcess:
        code = procs[name].wait(timeout=300)
        return subprocess.CompletedProcess(cases[name], code, (logs / f"{name}.out").read_text(),
                                           (logs / f"{name}.err").read_text())

    yield result
    for proc in procs.values():
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_tp2_sp_with_backward_passes(pipeline_dir):
    proc = _run(2, "--diffusers", str(pipeline_dir), "--subfolder", "transformer_2", "--tp", "2", "--sp",
                "--backward", *SIZES)
    last = proc.stdout.strip().splitlines()[-1]
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert last.startswith("verify_conversion: max_rel_err=") and last.endswith(" PASS")
    assert float(last.split("=")[1].split()[0]) <= 1e-5
    assert "input-grad rel_err=" in proc.stdout


def test_tolerance_not_met_is_fail_with_exit_1(one_rank):
    proc = one_rank("tolerance")
    assert proc.returncode == 1
    assert proc.stdout.strip().splitlines()[-1].endswith(" FAIL")


def test_pipeline_folder_without_subfolder_says_what_to_do(one_rank):
    proc = one_rank("wan_no_subfolder")
    assert proc.returncode != 0
    assert "needs --subfolder transformer or transformer_2" in proc.stdout + proc.stderr


QWEN_SIZES = ["--height", "6", "--width", "8", "--text-len", "7", "--batch", "2"]  # 12 image tokens


@pytest.mark.parametrize("layout", [["--tp", "2", "--sp"], ["--pp", "2"], ["--cp", "2", "--cp-comm", "ulysses"]],
                         ids=["tp2_sp", "pp2", "cp2_ulysses"])
def test_qwen_image_with_padded_text_passes(qwen_dir, layout):
    proc = _run(2, "--diffusers", str(qwen_dir), "--subfolder", "transformer", *layout, "--backward", *QWEN_SIZES,
                model="qwen-image")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("verify_conversion: max_rel_err=") and last.endswith(" PASS")
    assert float(last.split("=")[1].split()[0]) <= 1e-5
    assert "input-grad rel_err=" in proc.stdout


def test_qwen_image_pipeline_folder_names_its_subfolder(one_rank):
    proc = one_rank("qwen_no_subfolder")
    assert proc.returncode != 0
    assert "needs --subfolder transformer)" in proc.stdout + proc.stderr
