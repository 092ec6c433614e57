"""FP8 (Transformer Engine, GPU only): what can be checked on CPU is the configuration gate (TE linears in
bf16; trained roles only behind a passed parity report of this very config), the parity comparison,
and that the tool says why it cannot run without TE. The CUDA test runs the parity check itself."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pdmd.core.config import ConfigError, load_config, parity_key

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "configs" / "tiny_wan22.yaml"


@pytest.fixture(scope="module")
def base(wan_tiny, tmp_path_factory):
    """(a folder for reports, overrides: conftest's tiny Wan teacher, an empty shard folder, TE in bf16)."""
    root = tmp_path_factory.mktemp("fp8")
    (root / "shards").mkdir()
    return root, [f"model.teacher.path={wan_tiny.teacher}", f"data.shards={root / 'shards'}", "model.spec=te",
                  "model.dtype=bf16"]


def _cfg(base, *extra):
    return load_config(RECIPE, [*base[1], *extra])


def test_frozen_roles_in_fp8_need_only_te_and_bf16(base):
    cfg = _cfg(base, "model.fp8.recipe=tensorwise")
    assert cfg.model.fp8.roles == ["teacher", "expert"] and cfg.model.fp8.recipe == "tensorwise"
    with pytest.raises(ConfigError, match="model.spec=te and model.dtype=bf16"):
        load_config(RECIPE, [*base[1][:2], "model.fp8.recipe=delayed"])
    with pytest.raises(ConfigError, match="model.fp8.recipe='mxfp4'"):
        _cfg(base, "model.fp8.recipe=mxfp4")
    with pytest.raises(ConfigError, match="model.fp8.roles"):
        _cfg(base, "model.fp8.roles=[teacher,critic]")


def test_trained_roles_need_a_passed_parity_report_of_this_config(base):
    root, _ = base
    with pytest.raises(ConfigError, match="tools/fp8_parity.py"):
        _cfg(base, "model.fp8.roles=[teacher,student,fake]")
    key = parity_key(_cfg(base))  # the run's identity without FP8 settings
    report = root / "parity.json"
    for passed, config_hash, ok in ((True, key, True), (False, key, False), (True, "0" * 64, False)):
        report.write_text(json.dumps({"passed": passed, "config_hash": config_hash, "recipe": "delayed"}))
        extra = ("model.fp8.roles=[teacher,student,fake]", f"model.fp8.parity_report={report}")
        if ok:
            assert _cfg(base, *extra).model.fp8.roles == ["teacher", "student", "fake"]
        else:
            with pytest.raises(ConfigError, match="not a passed check of this config"):
                _cfg(base, *extra)
    # a report for other method settings does not vouch for this run
    report.write_text(json.dumps({"passed": True, "config_hash": key, "recipe": "delayed"}))
    with pytest.raises(ConfigError, match="not a passed check"):
        _cfg(base, "model.fp8.roles=[student]", f"model.fp8.parity_report={report}", "method.cfg_scale=2.0")


def test_parity_comparison_uses_relative_differences():
    sys.path.insert(0, str(ROOT / "tools"))
    from fp8_parity import compare

    ref = [{"generator_loss": 1.0, "student_grad_norm": 2.0, "fake_loss": 4.0, "fake_grad_norm": 0.5}] * 2
    close = [{"generator_loss": 1.03, "student_grad_norm": 1.95, "fake_loss": 4.1, "fake_grad_norm": 0.51}] * 2
    far = [*close[:1], {**close[1], "fake_grad_norm": 0.6}]
    assert compare(ref, close, 0.05)["passed"]
    out = compare(ref, far, 0.05)
    assert not out["passed"] and out["worst_relative_difference"]["fake_grad_norm"] == pytest.approx(0.2)


def test_fp8_context_is_a_no_op_without_fp8():
    import contextlib
    from types import SimpleNamespace

    from megatron_adapters.runtime.fp8 import fp8_context

    assert isinstance(fp8_context(SimpleNamespace(fp8=None)), contextlib.nullcontext)


def test_parity_tool_says_why_it_cannot_run_here(base):
    from megatron_adapters.layers.specs import te_available

    if te_available()[0]:
        pytest.skip("Transformer Engine is available here: the CUDA test runs the tool")
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "fp8_parity.py"), str(RECIPE), "--out",
                           str(base[0] / "r.json"), *base[1][:2]], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "needs a GPU with Transformer Engine" in proc.stderr


@pytest.mark.cuda
def test_fp8_parity_on_the_tiny_config(tmp_path, request):
    from megatron_adapters.layers.specs import te_available

    ok, why = te_available()
    if not ok:
        pytest.skip(why)
    report = tmp_path / "parity.json"
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "fp8_parity.py"), str(RECIPE), "--out", str(report),
                           "--steps", "3", *request.getfixturevalue("wan_tiny").overrides],
                          capture_output=True, text=True, timeout=600)
    assert report.is_file(), proc.stderr[-3000:]
    result = json.loads(report.read_text())
    assert set(result["worst_relative_difference"]) == {"generator_loss", "student_grad_norm", "fake_loss",
                                                        "fake_grad_norm"}
