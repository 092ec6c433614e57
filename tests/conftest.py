"""Fixtures and helpers shared by the test modules.

Every tiny build (teacher folders, prompt shards, trained runs with their exports) is a session fixture
here, built once per pytest session under pytest's basetemp, whichever module asks first. Tests only
read them: a test that changes a run, a teacher or shards copies it first (``shutil.copytree``) or writes
under its own ``tmp_path``. See tests/README.md for what each build holds and who uses it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------ helpers


def subprocess_env(**extra: str) -> dict[str, str]:
    """The environment of a command a test runs (``pdmd train``, tools): one torch thread, this checkout
    importable, W&B offline."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "WANDB_MODE": "offline", **extra}


def read_metrics(run_dir: Path) -> list[dict]:
    """The rows of a run's metrics.jsonl (none before the first logged step)."""
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def read_manifest(run_dir: Path) -> dict:
    return json.loads((Path(run_dir) / "manifest.json").read_text())


# ------------------------------------------------------------------ session builds

@dataclass(frozen=True)
class Tiny:
    """A tiny teacher folder and prompt shards for it: what a tiny recipe's run needs."""

    teacher: Path
    shards: Path
    prompts: list[str]

    @property
    def overrides(self) -> list[str]:
        return [f"model.teacher.path={self.teacher}", f"data.shards={self.shards}"]


@pytest.fixture(scope="session")
def wan_tiny(tmp_path_factory) -> Tiny:
    """The tiny Wan2.2 teacher of configs/tiny_wan22.yaml (two random experts, UMT5's text width) and
    UMT5 shards of the odd prompt list (37 prompts, 5 a shard, max_length 32, fp32)."""
    from pdmd.bench.tiny_models import write_tiny_wan22_teacher
    from tests.tiny_encoders import UMT5_DIM, build_dataset

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("wan_tiny")
    teacher = write_tiny_wan22_teacher(root / "teacher", text_dim=UMT5_DIM)
    shards, prompts = build_dataset("umt5", root / "data")
    return Tiny(teacher, shards, prompts)


@pytest.fixture(scope="session")
def umt5_shards(wan_tiny) -> tuple[Path, list[str]]:
    """(shard folder, prompts in order) of :func:`wan_tiny`, for the data tests."""
    return wan_tiny.shards, wan_tiny.prompts


@pytest.fixture(scope="session")
def qwen_tiny(tmp_path_factory) -> Tiny:
    """A whole tiny QwenImagePipeline (the teacher of configs/tiny_qwen_image.yaml and the base its
    exports copy) and Qwen2.5-VL shards of the odd prompt list."""
    from pdmd.bench.tiny_models import write_qwen_base_pipeline
    from tests.tiny_encoders import build_dataset

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("qwen_tiny")
    base = write_qwen_base_pipeline(root / "base")
    shards, prompts = build_dataset("qwen2.5-vl", root / "data")
    return Tiny(base, shards, prompts)


@pytest.fixture(scope="session")
def tiny_wan_run(tmp_path_factory) -> tuple[Path, dict]:
    """tests/tiny_run.py's finished tiny Wan run, its exports and samples, and every command's result."""
    from tests.tiny_run import tiny_run

    torch.set_num_threads(1)
    return tiny_run(tmp_path_factory)


@pytest.fixture(scope="session")
def tiny_image_runs(tmp_path_factory) -> dict[str, tuple[Path, dict]]:
    """kind -> the finished tiny I2V and TI2V runs (tests/tiny_run.py), their exports and samples."""
    from tests.tiny_run import tiny_image_runs

    torch.set_num_threads(1)
    return tiny_image_runs(tmp_path_factory)


@pytest.fixture(scope="session")
def qwen_runs(qwen_tiny, tmp_path_factory) -> dict:
    """Two tiny Qwen-Image runs of configs/tiny_qwen_image.yaml (a large student lr so that the experts
    move): ``run`` (two phases) and ``run1`` (one phase), each exported with --verify."""
    from tests.tiny_run import qwen_runs

    return qwen_runs(qwen_tiny, tmp_path_factory)


@pytest.fixture(scope="session")
def demo_runs(tmp_path_factory) -> tuple[Path, dict]:
    """`pdmd demo --fast` and `pdmd bench toy --fast --teacher exact --ablations` in a copy of its cache
    (tests/tiny_run.py): (the folder holding ``demo/`` and ``exact_bench/``, each command's exit code and output)."""
    from tests.tiny_run import demo_runs

    return demo_runs(tmp_path_factory)


@pytest.fixture(scope="session")
def readme_run(tmp_path_factory) -> tuple[Path, dict]:
    """The README's first distillation and the docs' CPU blocks, run as written in a fresh working directory
    (tests/tiny_run.py's ``build_readme``): (that directory, each command's exit code and output)."""
    from tests.tiny_run import readme_run

    return readme_run(tmp_path_factory)


@pytest.fixture(scope="session", autouse=True)
def _start_trained_builds(request, tmp_path_factory):
    """Start the trained builds that the selected tests ask for now, each in its own process, so that they
    run while other tests do (most tests leave one of 2 cores idle); their fixtures wait for them. Builds
    still running at the end of the session (a -x stop) are killed."""
    from tests import tiny_run

    wanted = set().union(*(item.fixturenames for item in request.session.items))
    if "tiny_wan_run" in wanted:
        tiny_run.start_tiny_run(tmp_path_factory)
    if "tiny_image_runs" in wanted:
        tiny_run.start_tiny_image_runs(tmp_path_factory)
    if "qwen_runs" in wanted:
        tiny_run.start_qwen_runs(request.getfixturevalue("qwen_tiny"), tmp_path_factory)
    if "demo_runs" in wanted:
        tiny_run.start_demo(tmp_path_factory)
    if "readme_run" in wanted:
        tiny_run.start_readme(tmp_path_factory)
    yield
    for build in tiny_run.BUILDS.values():
        build.stop()
