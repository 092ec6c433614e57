"""Tiny pipelines (Wan2.2 T2V, I2V/TI2V, Qwen-Image) and finished tiny runs with everything exported and sampled
from them, built once per test session (tests/conftest.py's fixtures).

:func:`build` (one process: Megatron is imported once) writes under ROOT: ``base/`` (a whole tiny WanPipeline:
two random experts, tiny UMT5 + tokenizer, tiny AutoencoderKLWan z_dim 4, a UniPC scheduler as the real repos
have), ``run/`` (pdmd train, 2 phases, LoRA student with a large learning rate so the adapters matter), the
exports and `pdmd sample` outputs of :func:`cases`, and ``results.json`` (exit code and output of every
command). :func:`build_image_run` and :func:`build_qwen` do the same for I2V/TI2V and Qwen-Image. Each build
runs in its own process (:class:`Build`), started early by conftest; tests get them through conftest's
fixtures ``tiny_wan_run``, ``tiny_image_runs`` and ``qwen_runs``.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from pdmd.bench.tiny_models import (  # the pipelines `pdmd tiny` writes, shared
    write_base_pipeline,
    write_image_pipeline,
    write_test_image,
)
from tests.conftest import subprocess_env

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["a cat on a sofa", "a red car in the rain"]
PHASE3 = ["plan.num_steps=3", "plan.num_phases=3", "plan.renoise_clamp=[[0.875,1.0],null,null]"]


def cases(root: Path) -> dict[str, list[str]]:
    """name -> argv of `convert` (tools/convert_to_diffusers.py) or `sample` (pdmd sample)."""
    r, b = str(root / "run"), str(root / "base")
    emb, lat = str(root / "embeds.safetensors"), str(root / "latents.safetensors")
    return {
        "export_full": ["convert", "--run", r, "--out", str(root / "export_full"), "--verify"],
        "export_lora": ["convert", "--run", r, "--out", str(root / "export_lora"), "--lora-only", "--verify"],
        "export_wrong_teacher": ["convert", "--run", r, "--out", str(root / "export_bad"), "--teacher", str(root / "wrong")],
        "sample_embeds": ["sample", "--run", r, "--embeds", emb, "--latents", lat, "--out", str(root / "s_embeds.safetensors")],
        "sample_prompts": ["sample", "--run", r, *sum((["--prompt", p] for p in PROMPTS), []), "--seed", "3",
                           "--vae", b, "--out", str(root / "s_prompts.safetensors")],
        "sample_cfg": ["sample", "--run", r, "--embeds", emb, "--latents", lat, "--guidance-scale", "3",
                       "--out", str(root / "s_cfg.safetensors")],
        "export3": ["convert", "--run", str(root / "run3"), "--out", str(root / "export3"), "--verify"],
        "sample3": ["sample", "--run", str(root / "run3"), "--embeds", emb, "--latents", lat,
                    "--out", str(root / "s3.safetensors")],
        "pdmd_export_comfyui": ["export", "--run", r, "--out", str(root / "export_comfyui"), "--lora-only",
                                "--lora-format", "comfyui"],
        # fail-safe: refused with exit 2, one line, nothing lost or half-written
        "export_into_other_runs": ["convert", "--run", r, "--out", str(root / "export3"), "--lora-only"],
        "export_corrupt_expert": ["convert", "--run", str(root / "run_corrupt"), "--out", str(root / "export_corrupt"),
                                  "--no-hash-check"],
        "sample_height_17": ["sample", "--run", r, "--embeds", emb, "--height", "17", "--width", "64",
                             "--num-frames", "5", "--out", str(root / "s_bad.safetensors")],
        "sample_garbage_embeds": ["sample", "--run", r, "--embeds", str(root / "garbage.safetensors"),
                                  "--out", str(root / "s_bad.safetensors")],
        "sample_narrow_embeds": ["sample", "--run", r, "--embeds", str(root / "narrow.safetensors"),
                                 "--latents", lat, "--out", str(root / "s_bad.safetensors")],
    }


def _train(root: Path, name: str, extra: list[str]) -> None:
    from data.encoders import load_prompt_encoder
    from data.prompts import PromptList, demo_prompts_path, read_prompts
    from data.writer import write_prompt_shards
    from pdmd.core.config import load_config
    from pdmd.train import train

    shards = root / "shards"
    if not (shards / "index.json").is_file():
        enc = load_prompt_encoder("umt5", root / "base", dtype="fp32", max_length=32)
        prompts = read_prompts(demo_prompts_path())
        prompts = PromptList(prompts.prompts[:8], prompts.lines[:8])
        write_prompt_shards(prompts, shards, enc, samples_per_shard=8, progress=False)
    cfg = load_config(ROOT / "configs" / "tiny_wan22.yaml", [f"model.teacher.path={root / 'base'}", f"data.shards={shards}", "train.steps=1",
                                    "train.checkpoint_every=1", "method.fake_ratio=1", "student.lr=0.01",
                                    "wandb.mode=disabled", *extra])
    if train(cfg, str(root / name)) != 0:
        raise RuntimeError(f"training {name} failed")


def _call(kind: str, argv: list[str]) -> dict:
    out, err = io.StringIO(), io.StringIO()
    tic = time.perf_counter()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            if kind == "convert":
                from pdmd.export.convert import main

                code = main(argv)
            elif kind == "export":  # `pdmd export`, the same command as a subcommand
                from pdmd.cli import main

                code = main(["export", *argv])
            else:
                from pdmd.cli import main

                code = main(["sample", *argv])
        except BaseException as exc:  # noqa: BLE001 - recorded for the test to show
            import traceback

            code, err = 99, io.StringIO(err.getvalue() + traceback.format_exc() + repr(exc))
    return {"code": code, "stdout": out.getvalue(), "stderr": err.getvalue()[-4000:],
            "seconds": round(time.perf_counter() - tic, 2)}


def build(root: Path) -> None:
    from data.tiny_encoders import UMT5_DIM
    from pdmd.bench.tiny_models import write_tiny_wan22_teacher

    torch.set_num_threads(1)
    root.mkdir(parents=True, exist_ok=True)
    write_base_pipeline(root / "base")
    write_tiny_wan22_teacher(root / "wrong", text_dim=UMT5_DIM, ffn_dim=40)  # same names, other shapes
    g = torch.Generator().manual_seed(1)
    from safetensors.torch import save_file

    save_file({"prompt_embeds": torch.randn(2, 16, UMT5_DIM, generator=g),
               "negative_prompt_embeds": torch.randn(2, 16, UMT5_DIM, generator=g)}, str(root / "embeds.safetensors"))
    save_file({"latents": torch.randn(2, 4, 2, 8, 8, generator=g)}, str(root / "latents.safetensors"))
    timings = {}
    tic = time.perf_counter()
    _train(root, "run", [])
    timings["train"] = round(time.perf_counter() - tic, 2)
    tic = time.perf_counter()
    _train(root, "run3", PHASE3)
    timings["train3"] = round(time.perf_counter() - tic, 2)
    shutil.copytree(root / "run", root / "run_corrupt")  # its phase-1 expert truncated, as a failed copy leaves it
    victim = max((root / "run_corrupt" / "checkpoints" / "phase1" / "expert").glob("*.distcp"), key=lambda f: f.stat().st_size)
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    (root / "garbage.safetensors").write_bytes(b"not a tensor file" * 8)
    save_file({"prompt_embeds": torch.randn(2, 16, UMT5_DIM // 2, generator=g)}, str(root / "narrow.safetensors"))
    results = {name: _call(argv[0], argv[1:]) for name, argv in cases(root).items()}
    results["_timings"] = timings
    (root / "results.json").write_text(json.dumps(results, indent=2))


# configs/tiny_wan22_{i2v,ti2v}.yaml's latent shape [4, 2, 4, 4]: 5 frames of 32 x 32 pixels (8x VAE) for I2V,
# 64 x 64 (16x VAE) for TI2V
IMAGE_RUN_PIXELS = {"i2v": 32, "ti2v": 64}


def image_run_cases(root: Path, kind: str) -> dict[str, list[str]]:
    """name -> argv for a tiny image-conditioned run (:func:`build_image_run`)."""
    r = str(root / "run")
    data = ["--embeds", str(root / "embeds.safetensors"), "--latents", str(root / "latents.safetensors")]
    cases = {
        "export": ["convert", "--run", r, "--out", str(root / "export"), "--verify"],
        "sample_image": ["sample", "--run", r, *data, "--image", str(root / "image.png"),
                         "--out", str(root / "s_image.safetensors")],
        "sample_cond": ["sample", "--run", r, *data, "--cond", str(root / "cond.safetensors"),
                        "--out", str(root / "s_cond.safetensors")],
        "sample_cfg": ["sample", "--run", r, *data, "--image", str(root / "image.png"), "--guidance-scale", "3",
                       "--out", str(root / "s_cfg.safetensors")],
    }
    if kind == "i2v":  # TI2V's two phases share one teacher transformer: no WanPipeline slot for phase 2's adapters
        cases["export_lora"] = ["convert", "--run", r, "--out", str(root / "export_lora"), "--lora-only", "--verify"]
    return cases


def build_image_run(root: Path, kind: str) -> None:
    """A tiny image-conditioned two-phase run (configs/tiny_wan22_{kind}.yaml) from image shards, its exports
    and samples: ``base/`` (a whole tiny WanImageToVideoPipeline, the teacher), ``shards/`` (I2V: two
    buckets), ``run/``, the cases of :func:`image_run_cases` and ``results.json``."""
    from safetensors.torch import save_file

    from data.conditioning import ConditionEncoder, load_vae
    from data.images import Bucket, load_rgb
    from pdmd.core.config import load_config
    from pdmd.train import train
    from tools.make_prompt_shards import main as make_shards

    torch.set_num_threads(1)
    root.mkdir(parents=True, exist_ok=True)
    base = write_image_pipeline(root / "base", kind)
    side = IMAGE_RUN_PIXELS[kind]
    rows = []
    for i, (w, h) in enumerate([(40, 40), (70, 34), (36, 36), (64, 32)]):
        write_test_image(root / "images" / f"{i}.png", w * side // 32, h * side // 32, seed=10 + i)
        rows.append({"prompt": f"a moving picture number {i}", "image": f"{i}.png"})
    (root / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    buckets = f"{side}x{side},{side}x{2 * side}" if kind == "i2v" else f"{side}x{side}"
    if make_shards(["--out", str(root / "shards"), "--encoder", "umt5", "--encoder-path", str(base), "--max-length", "32",
                    "--dtype", "fp32", "--samples-per-shard", "2", "--no-progress", "--conditioning", kind,
                    "--buckets", buckets, "--num-frames", "5", "--device", "cpu", "--vae", str(base),
                    "--prompts", str(root / "pairs.jsonl"), "--images", str(root / "images")]) != 0:
        raise RuntimeError(f"writing the {kind} shards failed")
    # The recipe's 4 steps a phase (tests/test_train_i2v.py reads the run too); I2V with previews at step 4
    previews = ["logging.sample_every=4", f"logging.vae={base}"] if kind == "i2v" else []
    cfg = load_config(ROOT / "configs" / f"tiny_wan22_{kind}.yaml", [
        f"model.teacher.path={base}", f"data.shards={root / 'shards'}", "method.fake_ratio=1", "student.lr=0.01",
        "wandb.mode=disabled", *previews])
    tic = time.perf_counter()
    if train(cfg, str(root / "run")) != 0:
        raise RuntimeError(f"training the tiny {kind} run failed")
    timings = {"train": round(time.perf_counter() - tic, 2)}
    g = torch.Generator().manual_seed(1)
    save_file({"prompt_embeds": torch.randn(2, 16, 24, generator=g),
               "negative_prompt_embeds": torch.randn(2, 16, 24, generator=g)}, str(root / "embeds.safetensors"))
    save_file({"latents": torch.randn(2, *cfg.train.latent_shape, generator=g)}, str(root / "latents.safetensors"))
    image = write_test_image(root / "image.png", 90, 70, seed=3)
    vae, _ = load_vae(base, device="cpu")
    stored = ConditionEncoder(vae, kind, 5).encode(load_rgb(image), Bucket(side, side))
    save_file(stored, str(root / "cond.safetensors"))
    results = {name: _call(argv[0], argv[1:]) for name, argv in image_run_cases(root, kind).items()}
    results["_timings"] = timings
    (root / "results.json").write_text(json.dumps(results, indent=2))


class Build:
    """A build in one fresh single-rank process (Megatron imported once for all its runs and exports; nothing
    of it left in the pytest process). conftest starts the builds the selected tests use at the start of
    the session, so that they run while other tests do; :meth:`wait` is where a fixture needs the result."""

    def __init__(self, what: str, root: Path, code: str, timeout: float) -> None:
        from pdmd.core.distributed import free_port

        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "WANDB_MODE": "disabled",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
        for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS"):
            env.pop(key, None)
        self.what, self.root, self.timeout = what, root, timeout
        self.log = root.with_name(root.name + ".log")  # a file, not a pipe: nobody reads it while it runs
        self.log.parent.mkdir(parents=True, exist_ok=True)
        self.deadline = time.monotonic() + timeout
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen([sys.executable, "-c", code], stdout=log, stderr=subprocess.STDOUT, env=env,
                                         cwd=ROOT)

    def wait(self) -> None:
        try:
            code = self.proc.wait(timeout=max(1.0, self.deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.stop()
            raise RuntimeError(f"building {self.what} took over {self.timeout:.0f} s:\n{self.log.read_text()[-6000:]}") from None
        if code != 0:
            raise RuntimeError(f"building {self.what} failed (exit {code}):\n{self.log.read_text()[-8000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


BUILDS: dict[Path, Build] = {}  # root -> its build, started once per session


def _build(what: str, root: Path, code: str, timeout: float) -> Build:
    if root not in BUILDS:
        BUILDS[root] = Build(what, root, code, timeout)
    return BUILDS[root]


def _image_root(tmp_path_factory) -> Path:
    return tmp_path_factory.getbasetemp() / "pdmd_tiny_image_runs"


IMAGE_KINDS = ("i2v", "ti2v")


def start_tiny_image_runs(tmp_path_factory) -> Build:
    root = _image_root(tmp_path_factory)
    return _build("the tiny image runs", root, "from pathlib import Path; from tests.tiny_run import build_image_run\n"
                  f"for kind in {IMAGE_KINDS!r}: build_image_run(Path({str(root)!r}) / kind, kind)", 900)


def tiny_image_runs(tmp_path_factory) -> dict[str, tuple[Path, dict]]:
    """kind -> the built tiny I2V and TI2V runs (:func:`build_image_run`; once per pytest session, one
    subprocess for both)."""
    root = _image_root(tmp_path_factory)
    if not all((root / k / "results.json").is_file() for k in IMAGE_KINDS):
        start_tiny_image_runs(tmp_path_factory).wait()
    return {k: (root / k, json.loads((root / k / "results.json").read_text())) for k in IMAGE_KINDS}


def start_tiny_run(tmp_path_factory) -> Build:
    root = tmp_path_factory.getbasetemp() / "pdmd_tiny_export"
    return _build("the tiny run", root, f"from pathlib import Path; from tests.tiny_run import build\nbuild(Path({str(root)!r}))",
                  600)


def tiny_run(tmp_path_factory) -> tuple[Path, dict]:
    """The built tiny run (:func:`build`; once per pytest session, in a subprocess)."""
    root = tmp_path_factory.getbasetemp() / "pdmd_tiny_export"
    if not (root / "results.json").is_file():
        start_tiny_run(tmp_path_factory).wait()
    return root, json.loads((root / "results.json").read_text())


# --- Qwen-Image -----------------------------------------------------------------------------------


QWEN_RUNS = {"run": [], "run1": ["plan.num_phases=1", "train.steps=2", "method.fake_ratio=1"]}


def build_qwen(root: Path, teacher: Path, shards: Path) -> None:
    """configs/tiny_qwen_image.yaml trained as each of QWEN_RUNS (student lr 0.01 so that the experts move),
    each exported with --verify (``export_<name>``), and a --lora-only export of ``run`` (with --verify)."""
    from pdmd.core.config import load_config
    from pdmd.train import train

    torch.set_num_threads(1)
    root.mkdir(parents=True, exist_ok=True)
    results: dict = {"_timings": {}}
    for name, extra in QWEN_RUNS.items():
        cfg = load_config(ROOT / "configs" / "tiny_qwen_image.yaml", [
            f"model.teacher.path={teacher}", f"data.shards={shards}", "student.lr=0.01", "wandb.mode=disabled", *extra])
        tic = time.perf_counter()
        if train(cfg, str(root / name)) != 0:
            raise RuntimeError(f"training the tiny Qwen-Image {name} failed")
        results["_timings"][name] = round(time.perf_counter() - tic, 2)
        results[f"export_{name}"] = _call("convert", ["--run", str(root / name), "--out", str(root / f"export_{name}"),
                                                      "--verify"])
    results["export_lora"] = _call("convert", ["--run", str(root / "run"), "--out", str(root / "export_lora"),
                                               "--lora-only", "--verify"])
    (root / "results.json").write_text(json.dumps(results, indent=2))


def start_qwen_runs(tiny, tmp_path_factory) -> Build:
    root = tmp_path_factory.getbasetemp() / "pdmd_qwen_runs"
    return _build("the tiny Qwen-Image runs", root, "from pathlib import Path; from tests.tiny_run import build_qwen\n"
                  f"build_qwen(Path({str(root)!r}), Path({str(tiny.teacher)!r}), Path({str(tiny.shards)!r}))", 900)


def qwen_runs(tiny, tmp_path_factory) -> dict:
    """The built :func:`build_qwen` (``tiny``: conftest's Tiny with the teacher pipeline and shards): ``root``,
    ``base`` and each command's result by name."""
    root = tmp_path_factory.getbasetemp() / "pdmd_qwen_runs"
    if not (root / "results.json").is_file():
        start_qwen_runs(tiny, tmp_path_factory).wait()
    return {"root": root, "base": tiny.teacher, **json.loads((root / "results.json").read_text())}


# --- `pdmd demo --fast` and the exact-teacher bench in its cache ------------------------------------

DEMO = ["demo", "--fast", "--wandb", "offline"]
EXACT_BENCH = ["bench", "toy", "--fast", "--teacher", "exact", "--ablations", "--set", "method.fake_warmup=2",
               "student.lr_decay=linear"]


def _pdmd(out: Path, args: list[str]) -> dict:
    """`pdmd ARGS --out OUT` (the bench also with `--json OUT/exact.json`) in its own process; its exit code and
    output."""
    extra = ["--json", str(out / "exact.json")] if args[0] == "bench" else []
    proc = subprocess.run([sys.executable, "-m", "pdmd.cli", *args, "--out", str(out), *extra], capture_output=True,
                          text=True, env=subprocess_env(), timeout=600)
    return {"code": proc.returncode, "stdout": proc.stdout, "stderr": proc.stderr[-6000:]}


def build_demo(root: Path) -> None:
    """tests/test_demo.py's commands, one after the other, as a user runs them (`pdmd` in its own process): the
    demo in ``demo/``, then the bench in ``exact_bench/``, a copy of the demo's cache (its teacher network and
    shards are reused; the demo's own files stay as the demo left them). ``results.json``: each command's exit
    code and output."""
    results = {"demo": _pdmd(root / "demo", DEMO)}
    if results["demo"]["code"] == 0:
        shutil.copytree(root / "demo", root / "exact_bench")
        results["exact_bench"] = _pdmd(root / "exact_bench", EXACT_BENCH)
    (root / "results.json").write_text(json.dumps(results, indent=2))


def start_demo(tmp_path_factory) -> Build:
    root = tmp_path_factory.getbasetemp() / "pdmd_demo"
    root.mkdir(parents=True, exist_ok=True)
    return _build("pdmd demo and the exact-teacher bench", root,
                  f"from pathlib import Path; from tests.tiny_run import build_demo\nbuild_demo(Path({str(root)!r}))", 1200)


def demo_runs(tmp_path_factory) -> tuple[Path, dict]:
    """(the folder of :func:`build_demo`'s outputs, each command's result), once per session."""
    root = tmp_path_factory.getbasetemp() / "pdmd_demo"
    if not (root / "results.json").is_file():
        start_demo(tmp_path_factory).wait()
    return root, json.loads((root / "results.json").read_text())


# --- the README's first distillation and the docs' CPU blocks, as written ---------------------------

DOCS_WITH_CPU_BLOCKS = ("docs/data.md", "docs/training.md", "docs/export.md", "docs/plan.md")


def readme_commands() -> list[str]:
    """The command block after the README's ``first-distillation`` marker, one command a line."""
    text = (ROOT / "README.md").read_text()
    block = text[text.index("<!-- first-distillation"):].split("```bash\n", 1)[1].split("```", 1)[0]
    return [line.split("  #")[0].strip() for line in block.splitlines() if line.strip()]


def doc_blocks(doc: str) -> list[str]:
    """The ``bash`` blocks of a doc that follow a ``cpu-commands`` marker."""
    parts = (ROOT / doc).read_text().split("<!-- cpu-commands")[1:]
    return [part.split("```bash\n", 1)[1].split("```", 1)[0] for part in parts]


def _outcome(command: str, code: int, out: str, err: str) -> dict:
    return {"command": command, "code": code, "stdout": out, "stderr": err}


def build_readme(root: Path) -> None:
    """In ``root`` (a fresh working directory with only the recipes): the README's first-distillation commands
    one after the other as written (`pdmd` is this checkout's CLI; stops at the first failure), the finished run
    resumed from another directory, then the docs' CPU blocks as a shell runs them (`pdmd` and tools/ as
    installed; independent of one another, so run together, one core each). ``results.json`` (beside root):
    each command's exit code and output."""
    from pdmd.core.distributed import free_port

    root.mkdir(parents=True, exist_ok=True)
    shutil.copytree(ROOT / "configs", root / "configs")
    env = subprocess_env(MASTER_PORT=str(free_port()))
    results: dict = {"readme": [], "again": None, "docs": []}
    for command in readme_commands():
        argv = shlex.split(command)
        if argv[0] == "pdmd":
            argv = [sys.executable, "-m", "pdmd.cli", *argv[1:]]
        elif argv[0] == "python":
            argv = [sys.executable, *(str(ROOT / a) if a.startswith("tools/") else a for a in argv[1:])]
        proc = subprocess.run(argv, cwd=root, capture_output=True, text=True, env=env, timeout=300)
        results["readme"].append(_outcome(command, proc.returncode, proc.stdout, proc.stderr))
        if proc.returncode != 0:
            break
    else:
        (root / "elsewhere").mkdir()
        resume = [sys.executable, "-m", "pdmd.cli", "train", str(root / "configs" / "tiny_wan22.yaml"), "--run-dir",
                  str(root / "runs" / "tiny")]
        proc = subprocess.run(resume, cwd=root / "elsewhere", capture_output=True, text=True, env=env, timeout=300)
        results["again"] = _outcome(shlex.join(resume), proc.returncode, proc.stdout, proc.stderr)
        (root / "bin").mkdir()
        shim = root / "bin" / "pdmd"
        shim.write_text(f'#!/bin/sh\nexec {sys.executable} -m pdmd.cli "$@"\n')
        shim.chmod(0o755)
        (root / "tools").symlink_to(ROOT / "tools")
        shell_env = {**env, "PATH": f"{root / 'bin'}:{Path(sys.executable).parent}:{env['PATH']}"}
        started = [(doc, block, subprocess.Popen(["bash", "-euo", "pipefail", "-c", block], cwd=root, text=True,
                                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                                 env={**shell_env, "MASTER_PORT": str(free_port())}))  # one each
                   for doc in DOCS_WITH_CPU_BLOCKS for block in doc_blocks(doc)]
        for doc, block, popen in started:
            out, err = popen.communicate(timeout=600)
            results["docs"].append([doc, _outcome(block, popen.returncode, out, err)])
    root.with_name(root.name + ".json").write_text(json.dumps(results, indent=2))


def start_readme(tmp_path_factory) -> Build:
    root = tmp_path_factory.getbasetemp() / "pdmd_readme"
    return _build("the README's first distillation and the docs' CPU blocks", root,
                  f"from pathlib import Path; from tests.tiny_run import build_readme\nbuild_readme(Path({str(root)!r}))",
                  1200)


def readme_run(tmp_path_factory) -> tuple[Path, dict]:
    """(the working directory of :func:`build_readme`, each command's result), once per session."""
    root = tmp_path_factory.getbasetemp() / "pdmd_readme"
    results = root.with_name(root.name + ".json")
    if not results.is_file():
        start_readme(tmp_path_factory).wait()
    return root, json.loads(results.read_text())


if __name__ == "__main__":
    build(Path(sys.argv[1]))
