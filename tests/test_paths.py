"""Paths in recipes (pdmd/core/content.py): a recipe's own relative paths resolve against its folder, the
command line's against the working directory; the manifest stores them absolute; a run is identified by its
inputs' content, so moved data is accepted where it is the same data and refused where it is not; manifests
identified by path strings are migrated on resume; an export's --teacher must be the run's teacher."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from pdmd.core.config import ConfigError, load_config
from pdmd.run.rundir import RunDir
from tests.conftest import ROOT

RECIPE = ROOT / "configs" / "tiny_wan22.yaml"


def _recipe(folder: Path, teacher: str, shards: str) -> Path:
    """The tiny recipe with its two paths replaced, written into ``folder``."""
    text = RECIPE.read_text().replace("../outputs/tiny/teacher", teacher).replace("../outputs/tiny/shards", shards)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "recipe.yaml").write_text(text)
    return folder / "recipe.yaml"


def _start(run_dir: Path, cfg) -> dict:
    return RunDir(run_dir).create_or_check(cfg.phase_plan().to_config(), cfg.hash(), [0, 1], cfg.to_dict(),
                                           cfg.content(), resume_changes=cfg.resume_changes)


@pytest.fixture
def data(wan_tiny, tmp_path) -> Path:
    """A copy of the session's tiny teacher and shards under tmp_path/data (so they can be moved)."""
    shutil.copytree(wan_tiny.teacher, tmp_path / "data" / "teacher")
    shutil.copytree(wan_tiny.shards, tmp_path / "data" / "shards")
    return tmp_path / "data"


def test_recipe_paths_resolve_against_the_recipe_and_overrides_against_the_cwd(data, tmp_path, monkeypatch):
    recipe = _recipe(tmp_path / "recipes", "../data/teacher", "../data/shards")
    monkeypatch.chdir(tmp_path / "data")  # anywhere but the recipe's folder
    cfg = load_config(recipe)
    assert cfg.model.teacher.path == str(data / "teacher") and cfg.data["shards"] == str(data / "shards")
    monkeypatch.setenv("HOME", str(data))
    (data / "vae").mkdir()
    (data / "vae" / "config.json").write_text("{}")
    cfg = load_config(recipe, ["data.shards=shards", "logging.vae=~/vae"])  # typed in the shell: from here
    assert cfg.data["shards"] == str(data / "shards") and cfg.logging.vae == str(data / "vae")
    monkeypatch.setenv("PDMD_TEST_TEACHER", "teacher")  # ${oc.env:...}: also from the shell's directory
    env = _recipe(tmp_path / "recipes_env", "${oc.env:PDMD_TEST_TEACHER}", "../data/shards")
    assert load_config(env).model.teacher.path == str(data / "teacher")
    with pytest.raises(ConfigError, match="no transformer/config.json under " + str(tmp_path / "recipes" / "nowhere")):
        load_config(_recipe(tmp_path / "recipes", "nowhere", "../data/shards"))


def test_moved_data_resumes_when_it_is_the_same_and_is_refused_when_not(data, tmp_path):
    run_dir = tmp_path / "run"
    first = load_config(_recipe(tmp_path / "a", str(data / "teacher"), str(data / "shards")))
    manifest = _start(run_dir, first)
    assert manifest["config"]["model"]["teacher"]["path"] == str(data / "teacher")
    assert set(manifest["content"]) == {"model.teacher.path", "data.shards"} and all(manifest["content"].values())

    moved = tmp_path / "other_mount"
    shutil.move(data, moved)
    again = load_config(_recipe(tmp_path / "b", str(moved / "teacher"), str(moved / "shards")))
    assert again.hash() == first.hash()  # the same inputs: the same run, wherever they are
    manifest = _start(run_dir, again)
    assert manifest["config"]["model"]["teacher"]["path"] == str(moved / "teacher")  # export/sample follow
    assert manifest["history"][-1]["moved"]["data.shards"] == [str(data / "shards"), str(moved / "shards")]

    config = moved / "teacher" / "transformer_2" / "config.json"  # another teacher at the same place
    changed = json.loads(config.read_text())
    changed["num_layers"] += 1
    config.write_text(json.dumps(changed))
    with pytest.raises(ValueError, match="another configuration"):
        _start(run_dir, load_config(_recipe(tmp_path / "b", str(moved / "teacher"), str(moved / "shards"))))


def test_a_manifest_identified_by_path_strings_is_migrated(data, tmp_path, monkeypatch):
    """Runs started before content identity stored the recipe's strings (relative to the directory the run
    was started from) and a hash of them: the same recipe from that directory resumes them."""
    monkeypatch.chdir(tmp_path)
    cfg = load_config(_recipe(tmp_path / "a", "/elsewhere", "/elsewhere"),
                      ["model.teacher.path=data/teacher", "data.shards=data/shards"])
    manifest = _start(tmp_path / "run", cfg)
    old = json.loads(json.dumps(manifest))
    del old["content"]
    old["config_hash"] = "0" * 64
    old["config"]["model"]["teacher"]["path"], old["config"]["data"]["shards"] = "data/teacher", "data/shards"
    (tmp_path / "run" / "manifest.json").write_text(json.dumps(old))
    manifest = _start(tmp_path / "run", cfg)
    assert manifest["config_hash"] == cfg.hash() and manifest["content"] == cfg.content()
    assert manifest["history"][-1]["identity"].startswith("by content")
    old["config"]["train"]["steps"] = 99  # and a different old run is still another run
    (tmp_path / "run" / "manifest.json").write_text(json.dumps(old))
    with pytest.raises(ValueError, match="another configuration"):
        _start(tmp_path / "run", cfg)


def test_export_teacher_override_must_hold_the_runs_teacher(data, tmp_path):
    from pdmd.core.content import teacher_content
    from pdmd.core.errors import ExportError
    from pdmd.export.layout import _teacher_path

    config = {"model": {"teacher": {"path": "/gone/teacher", "subfolders": ["transformer", "transformer_2"]}}}
    recorded = teacher_content(data / "teacher", ["transformer", "transformer_2"])
    shutil.copytree(data / "teacher", tmp_path / "copy")
    assert _teacher_path(config, tmp_path / "run", tmp_path / "copy", recorded) == tmp_path / "copy"
    (tmp_path / "copy" / "transformer" / "config.json").write_text(
        (data / "teacher" / "transformer_2" / "config.json").read_text().replace('"num_layers"', '"num_layers_"'))
    with pytest.raises(ExportError, match="is not the teacher"):
        _teacher_path(config, tmp_path / "run", tmp_path / "copy", recorded)
