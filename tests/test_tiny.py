"""`pdmd tiny`: a newcomer's first distillation with documented commands only. Each kind's folder is a whole
pipeline its diffusers class loads as it is, with shards of the recipe's model; the t2v one trains from the
repository's default paths (relative to the working directory) with the shipped recipe."""

from __future__ import annotations

import json

import pytest

from pdmd.cli import main as pdmd_main
from tests.conftest import ROOT, read_manifest
from tests.tiny_run import DOCS_WITH_CPU_BLOCKS, doc_blocks, readme_commands

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


def test_readme_first_distillation_runs_as_written(readme_run):
    """The README's first-distillation block, line by line, in a fresh working directory that has only the
    recipes (the recipe's relative paths are where `pdmd tiny` writes); `pdmd` is this checkout's CLI. The
    manifest holds absolute paths: the same run is found from another directory. Then the docs' CPU blocks,
    as a shell runs them, in the same directory (tests/tiny_run.py's ``build_readme``, started with the session)."""
    tmp_path, results = readme_run
    commands = readme_commands()
    assert commands[0] == "pdmd tiny" and any("convert_to_diffusers" in c for c in commands)
    for r in results["readme"]:
        assert r["code"] == 0, (r["command"], r["stderr"][-3000:])
        if r["command"].startswith(("pdmd train", "python tools/convert")):  # the known third-party warnings are filtered
            assert "Warning:" not in r["stderr"], (r["command"], r["stderr"][-3000:])
    assert [r["command"] for r in results["readme"]] == commands and results["readme"][-1]["stdout"].strip().endswith("(5, 64, 64, 3)")
    manifest = read_manifest(tmp_path / "runs" / "tiny")
    assert all(p["status"] == "done" for p in manifest["phases"])
    assert manifest["config"]["model"]["teacher"]["path"] == str(tmp_path / "outputs" / "tiny" / "teacher")
    again = results["again"]  # the finished run, from another directory: found, nothing left to do
    assert again["code"] == 0 and "phases done: [1, 2]" in again["stdout"], again["stderr"][-3000:]

    assert [doc for doc, _ in results["docs"]] == [doc for doc in DOCS_WITH_CPU_BLOCKS for _ in doc_blocks(doc)]
    assert all(doc_blocks(doc) for doc in DOCS_WITH_CPU_BLOCKS), "a doc lost its cpu-commands block"
    outputs = {}
    for doc, r in results["docs"]:
        assert r["code"] == 0, (doc, r["command"], r["stdout"][-2000:], r["stderr"][-3000:])
        outputs[doc] = outputs.get(doc, "") + r["stdout"]

    assert all(p["status"] == "done" for p in read_manifest(tmp_path / "runs" / "phased")["phases"])
    assert "phases done: [1, 2]" in outputs["docs/training.md"].splitlines()[-1]
    assert json.loads((tmp_path / "outputs" / "my_shards" / "index.json").read_text())["count"] == 2
    assert "PASS" in outputs["docs/export.md"] and (tmp_path / "samples" / "cat.safetensors").is_file()
    assert outputs["docs/plan.md"].count("layouts: ") == 2  # each command's table of fitting layouts
    assert (tmp_path / "samples" / "fox_0.gif").is_file()

