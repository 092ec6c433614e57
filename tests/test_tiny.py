"""`pdmd tiny`: a newcomer's first distillation with documented commands only. Each kind's folder is a whole
pipeline its diffusers class loads as it is, with shards of the recipe's model; the t2v one trains from the
repository's default paths (relative to the working directory) with the shipped recipe."""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pdmd.cli import main as pdmd_main
from pdmd.core.distributed import free_port
from tests.conftest import ROOT, read_manifest, subprocess_env

PIPELINES = {"t2v": "WanPipeline", "i2v": "WanImageToVideoPipeline", "ti2v": "WanImageToVideoPipeline",
             "qwen-image": "QwenImagePipeline"}
RECIPES = {"t2v": "tiny_wan22", "i2v": "tiny_wan22_i2v", "ti2v": "tiny_wan22_ti2v", "qwen-image": "tiny_qwen_image"}


@pytest.mark.parametrize("kind", sorted(PIPELINES))
def test_tiny_folder_loads_as_is_and_fits_its_recipe(kind, tmp_path, capsys):
    import diffusers

    from pdmd.core.config import load_config

    out = tmp_path / kind
    assert pdmd_main(["tiny", "--kind", kind, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"pdmd train configs/{RECIPES[kind]}.yaml" in printed
    pipe = getattr(diffusers, PIPELINES[kind]).from_pretrained(out / "teacher")  # no =None arguments
    assert pipe.text_encoder is not None and pipe.vae is not None and pipe.tokenizer is not None
    cfg = load_config(ROOT / "configs" / f"{RECIPES[kind]}.yaml",
                      [f"model.teacher.path={out / 'teacher'}", f"data.shards={out / 'shards'}"])
    from data.loader import PromptDataConfig, PromptLoader

    batch = next(iter(PromptLoader(PromptDataConfig.from_dict({**cfg.data, "batch_size": 2}), dp_rank=0, dp_size=1)))
    assert batch["text_embeds"].shape[0] == 2
    assert pdmd_main(["tiny", "--kind", kind, "--out", str(out)]) == 2  # an existing folder needs --force


def _readme_commands() -> list[str]:
    """The command block after the README's ``first-distillation`` marker, one command a line."""
    text = (ROOT / "README.md").read_text()
    block = text[text.index("<!-- first-distillation"):].split("```bash\n", 1)[1].split("```", 1)[0]
    return [line.split("  #")[0].strip() for line in block.splitlines() if line.strip()]


DOCS_WITH_CPU_BLOCKS = ("docs/data.md", "docs/training.md", "docs/export.md", "docs/plan.md")


def _doc_blocks(doc: str) -> list[str]:
    """The ``bash`` blocks of a doc that follow a ``cpu-commands`` marker."""
    parts = (ROOT / doc).read_text().split("<!-- cpu-commands")[1:]
    return [part.split("```bash\n", 1)[1].split("```", 1)[0] for part in parts]


def test_readme_first_distillation_runs_as_written(tmp_path):
    """The README's first-distillation block, line by line, in a fresh working directory that has only the
    recipes (the recipe's relative paths are where `pdmd tiny` writes); `pdmd` is this checkout's CLI. The
    manifest holds absolute paths: the same run is found from another directory."""
    shutil.copytree(ROOT / "configs", tmp_path / "configs")
    env = subprocess_env(MASTER_PORT=str(free_port()))
    commands = _readme_commands()
    assert commands[0] == "pdmd tiny" and any("convert_to_diffusers" in c for c in commands)
    for command in commands:
        argv = shlex.split(command)
        if argv[0] == "pdmd":
            argv = [sys.executable, "-m", "pdmd.cli", *argv[1:]]
        elif argv[0] == "python":
            argv = [sys.executable, *(str(ROOT / a) if a.startswith("tools/") else a for a in argv[1:])]
        proc = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, env=env, timeout=300)
        assert proc.returncode == 0, (command, proc.stderr[-3000:])
        if command.startswith(("pdmd train", "python tools/convert")):  # the known third-party warnings are filtered
            assert "Warning:" not in proc.stderr, (command, proc.stderr[-3000:])
    assert proc.stdout.strip().endswith("(5, 64, 64, 3)")
    manifest = read_manifest(tmp_path / "runs" / "tiny")
    assert all(p["status"] == "done" for p in manifest["phases"])
    assert manifest["config"]["model"]["teacher"]["path"] == str(tmp_path / "outputs" / "tiny" / "teacher")
    (tmp_path / "elsewhere").mkdir()  # the finished run, from another directory: found, nothing left to do
    again = subprocess.run([sys.executable, "-m", "pdmd.cli", "train", str(tmp_path / "configs" / "tiny_wan22.yaml"),
                            "--run-dir", str(tmp_path / "runs" / "tiny")], cwd=tmp_path / "elsewhere",
                           capture_output=True, text=True, env=env, timeout=300)
    assert again.returncode == 0 and "phases done: [1, 2]" in again.stdout, again.stderr[-3000:]

    # then the docs' CPU blocks, as a shell runs them, in the same directory (`pdmd` and tools/ as installed)
    (tmp_path / "bin").mkdir()
    shim = tmp_path / "bin" / "pdmd"
    shim.write_text(f'#!/bin/sh\nexec {sys.executable} -m pdmd.cli "$@"\n')
    shim.chmod(0o755)
    (tmp_path / "tools").symlink_to(ROOT / "tools")
    shell_env = {**env, "PATH": f"{tmp_path / 'bin'}:{Path(sys.executable).parent}:{env['PATH']}"}
    started = []  # the docs' blocks are independent of one another: run together (one core each)
    for doc in DOCS_WITH_CPU_BLOCKS:
        blocks = _doc_blocks(doc)
        assert blocks, f"{doc} has no cpu-commands block"
        started += [(doc, block, subprocess.Popen(["bash", "-euo", "pipefail", "-c", block], cwd=tmp_path, text=True,
                                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                                  env={**shell_env, "MASTER_PORT": str(free_port())}))  # one each
                    for block in blocks]
    outputs = {}
    for doc, block, proc in started:
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, (doc, block, out[-2000:], err[-3000:])
        outputs[doc] = outputs.get(doc, "") + out

    assert all(p["status"] == "done" for p in read_manifest(tmp_path / "runs" / "phased")["phases"])
    assert "phases done: [1, 2]" in outputs["docs/training.md"].splitlines()[-1]
    assert json.loads((tmp_path / "outputs" / "my_shards" / "index.json").read_text())["count"] == 2
    assert "PASS" in outputs["docs/export.md"] and (tmp_path / "samples" / "cat.safetensors").is_file()
    assert outputs["docs/plan.md"].count("layouts: ") == 2  # each command's table of fitting layouts
    assert (tmp_path / "samples" / "fox_0.gif").is_file()

