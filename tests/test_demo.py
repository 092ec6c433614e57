"""`pdmd demo --fast` (the README's first command at smoke size) runs every stage end to end: shards, a
teacher network that learns the mixture, its gate, both distillations through the trainer, the exports,
the scoring against the exact mixture, and the files it promises; `pdmd bench toy --fast --teacher exact
--ablations` does the same from the closed-form teacher with every ablation row, in the same cache, and
writes the JSON contract. The gate itself: pdmd/bench/teacher_gate.py fails an untrained teacher and passes the
exact field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.multirank  # runs the trainer (gloo) in a subprocess


@pytest.fixture(scope="module")
def demo(demo_runs):
    """(the demo's output folder, its stdout); conftest starts it with the session (tests/tiny_run.py)."""
    root, results = demo_runs
    assert results["demo"]["code"] == 0, results["demo"]["stdout"][-2000:] + results["demo"]["stderr"]
    return root / "demo", results["demo"]["stdout"]


@pytest.fixture(scope="module")
def exact_bench(demo_runs):
    """(its output folder, its JSON): the closed-form teacher with every ablation, in a copy of the demo's cache
    (its teacher network and shards)."""
    root, results = demo_runs
    bench = results.get("exact_bench", {"code": "not run (the demo failed)", "stdout": "", "stderr": ""})
    assert bench["code"] == 0, bench["stdout"][-2000:] + bench["stderr"]
    return root / "exact_bench", json.loads((root / "exact_bench" / "exact.json").read_text())


def _one(folder: Path, prefix: str) -> Path:
    """The run (or export) folder of a method and seed: its name ends in the config's hash."""
    found = sorted(folder.glob(f"{prefix}*"))
    assert len(found) == 1, (prefix, found)
    return found[0]


def test_demo_writes_results_plots_and_exports(demo):
    out, stdout = demo
    for name in ("results.md", "results.json", "task.json", "loss_curves.png", "samples_prompt0.png", "metrics.png"):
        assert (out / name).is_file(), name
    (offline,) = (out / "wandb").glob("offline-run-*")  # --wandb offline: the same figures and the table
    images = list(offline.rglob("media/images/figures/*.png"))
    assert len(images) == len(list(out.glob("*.png"))) >= 3 and list(offline.rglob("media/table/results_*.json"))
    for method in ("phased_dmd", "dmd2_sgts"):
        assert (_one(out / "exports", f"{method}_seed0_") / "model_index.json").is_file()
        manifest = json.loads((_one(out / "runs", f"{method}_seed0_") / "manifest.json").read_text())
        assert all(p["status"] == "done" for p in manifest["phases"])
    phases = json.loads((_one(out / "runs", "phased_dmd_seed0_") / "manifest.json").read_text())["phases"]
    assert len(phases) == 2
    assert "| Phased DMD (4 steps, 2 phases) | 4 |" in stdout and "| DMD2+SGTS (4 steps, 1 expert) | 4 |" in stdout


def test_demo_teacher_learns_the_mixture_and_all_methods_are_scored(demo):
    out, _ = demo
    result = json.loads((out / "results.json").read_text())
    methods = result["methods"]
    assert list(methods) == ["exact samples", "teacher network, 50 steps", "teacher network, 4 steps",
                             "Phased DMD (4 steps, 2 phases)", "DMD2+SGTS (4 steps, 1 expert)"]
    assert [m["method"] for m in methods.values()] == ["exact", "teacher_ref", "teacher_4", "phased_dmd", "dmd2_sgts"]
    assert methods["teacher network, 50 steps"]["coverage"] >= 0.75  # the task is learnable at this budget
    assert methods["exact samples"]["precision"] > 0.95 and methods["teacher network, 50 steps"]["spread_ratio_to_ref"] == 1
    for label, m in methods.items():
        assert 0 <= m["coverage"] <= 1 and 0 <= m["tv"] <= 1 and m["pairwise_ratio"] > 0, label
        assert m["nfe"] == {"exact": 0, "teacher_ref": 50}.get(m["method"], 4)
    per = result["per_seed"]["teacher network, 50 steps"][0]["per_prompt"]
    assert len(per) == 2 and all(sum(p["counts"]) == 64 for p in per)
    gate = result["teacher_gate"]
    assert gate["passed"] in (True, False) and len(gate["velocity_error_by_t"]) == 8  # fast: reported, not enforced
    assert set(result["phase1_check"]) == {"phase1_expert", "teacher_steps"}


CONTRACT = ("method", "nfe", "coverage", "tv", "spread_ratio", "spread_ratio_to_ref", "precision", "pairwise_ratio",
            "nll_per_dim")
METHODS = {"exact", "teacher_ref", "teacher_4", "phased_dmd", "dmd2_sgts", "dmd2_sgts_j2plus", "dmd_last_step",
           "phased_dmd_naive"}


def test_exact_teacher_bench_writes_the_json_contract_with_every_ablation(exact_bench):
    out, result = exact_bench
    assert result["settings"]["teacher"] == "exact"
    methods = result["methods"]
    assert {m["method"] for m in methods.values()} == METHODS
    assert methods["Phased DMD, trained teacher"]["method"] == "phased_dmd"
    for label, m in methods.items():
        for key in CONTRACT:
            assert key in m, (label, key)
            if key not in ("method", "nfe"):
                assert f"{key}_seed_std" in m, (label, key)
    assert result["reference"] == "exact teacher, 50 steps"
    assert methods["exact teacher, 50 steps"]["precision"] > 0.9  # the exact field, sampled finely
    assert "passed" in result["teacher_gate"]
    for name in ("phased_dmd_exact", "dmd2_sgts_exact", "dmd2_sgts_j2plus_exact", "dmd_last_step_exact",
                 "phased_dmd_naive_exact"):
        manifest = json.loads((_one(out / "runs", f"{name}_seed0_") / "manifest.json").read_text())
        assert all(p["status"] == "done" for p in manifest["phases"]), name
    trained = [p for p in (out / "runs").glob("phased_dmd_seed0_*")]
    assert len(trained) == 2  # the demo's and the ablation's (with the warm-up): never the same cache
    config = json.loads((_one(out / "runs", "phased_dmd_naive_exact_seed0_") / "manifest.json").read_text())["config"]
    assert config["method"]["fake_loss"] == "naive" and config["model"]["teacher"]["exact"].endswith(".safetensors")
    rows = [json.loads(line) for line in
            (_one(out / "runs", "phased_dmd_exact_seed0_") / "metrics.jsonl").read_text().splitlines()]
    warm = [r for r in rows if any(k.endswith("/fake_warmup_loss") for k in r)]  # --set method.fake_warmup=2
    assert [sorted(k for k in r if k.endswith("fake_warmup_loss")) for r in warm] == [["phase1/fake_warmup_loss"],
                                                                                      ["phase2/fake_warmup_loss"]]
    lrs = [r["phase2/student_lr"] for r in rows if "phase2/student_lr" in r]  # student.lr_decay=linear
    from pdmd.bench.toy import BenchSettings

    lr = BenchSettings.fast().student_lr  # `pdmd bench toy --fast` starts from these
    assert lrs[0] == pytest.approx(lr) and lrs == sorted(lrs, reverse=True) and lrs[-1] == pytest.approx(lr / 8)
    assert {r["phase2/fake_lr"] for r in rows if "phase2/fake_lr" in r} == {1e-4}
    j2 = json.loads((_one(out / "runs", "dmd2_sgts_j2plus_exact_seed0_") / "manifest.json").read_text())["config"]
    assert j2["method"]["sgts_min_step"] == 2 and j2["plan"]["num_phases"] == 1


def test_gate_fails_an_untrained_teacher_and_passes_the_exact_field(tmp_path):
    """pdmd/bench/teacher_gate.py on a 2-prompt task: a random-weight Wan teacher (never trained) fails on every
    criterion it should; the exact velocity sampled finely passes, with zero excess velocity error."""
    import torch

    from pdmd.bench.exact_teacher import ExactTeacher
    from pdmd.bench.mixture import evaluate
    from pdmd.bench.teacher_gate import format_gate, judge, velocity_error_by_t
    from pdmd.bench.tiny_models import write_tiny_wan22_teacher
    from pdmd.bench.toy import BenchSettings, draw, reference_plan, teacher_velocity

    torch.set_num_threads(1)
    s = BenchSettings(prompts=2, samples=64, reference_steps=100)
    task = s.task()
    embeds = torch.randn(2, 8, 24, generator=torch.Generator().manual_seed(0))
    closed_form = ExactTeacher(task, embeds)
    exact = lambda _k, x, t, text: closed_form.velocity(x, t, text)  # noqa: E731
    untrained = teacher_velocity(write_tiny_wan22_teacher(tmp_path / "teacher", text_dim=24, boundary=0.875))
    verdicts = {}
    for name, v in (("exact", exact), ("untrained", untrained)):
        x, idx, _ = draw(v, reference_plan(s), embeds, s, 0)
        per_t = velocity_error_by_t(lambda x, t, text, v=v: v(0, x, t, text), task, embeds, samples_per_bin=64)
        verdicts[name] = judge(evaluate(task, x, idx), per_t)
    assert verdicts["exact"]["passed"], format_gate(verdicts["exact"])
    assert all(r["excess"] < 1e-10 for r in verdicts["exact"]["velocity_error_by_t"])
    bad = verdicts["untrained"]
    assert not bad["passed"] and any("precision" in r for r in bad["reasons"])
    assert all(r["excess"] > 0.05 for r in bad["velocity_error_by_t"])
    assert "FAILED" in format_gate(bad) and "| [0, 0.05) |" in format_gate(bad)


@pytest.mark.parametrize("argv, message", [
    (["--shift", "0"], "shift must be a finite number > 0"),
    (["--renoise-shift", "-1"], "shift must be a finite number > 0"),
    (["--network", "8x16"], "give HEADSxHEAD_DIMxFFN"),
    (["--set", "student.lr"], "is not KEY=VALUE"),
    (["--modes", "1"], "a mixture needs at least 2 modes"),
])
def test_bench_toy_refuses_bad_settings_before_building_anything(tmp_path, capsys, argv, message):
    from pdmd.cli import main

    assert main(["bench", "toy", "--out", str(tmp_path / "bench"), *argv]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "bench").exists()
