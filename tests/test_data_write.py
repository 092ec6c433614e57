"""Writing shards: WebDataset tars without pickles, trimmed embeddings, negative prompt, index, resumability."""

import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
import webdataset as wds

from data.encoders import UMT5PromptEncoder
from data.format import check_index, embeds_from_bytes
from data.loader import PromptDataConfig, PromptLoader
from data.prompts import parse_prompts, read_prompts
from data.writer import write_prompt_shards
from tests.tiny_encoders import tiny_parts

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def built(umt5_shards):
    """conftest's UMT5 shards, written by tools/make_prompt_shards.py (37 prompts, 5 a shard, max_length 32)."""
    return umt5_shards


class Counting:
    """Wraps a PromptEncoder, records every batch, and can fail on the n-th call (an interrupted job)."""

    def __init__(self, enc, fail_on_call=None):
        self.enc, self.calls, self.fail_on_call = enc, [], fail_on_call

    def __getattr__(self, name):
        return getattr(self.enc, name)

    def encode(self, prompts):
        self.calls.append(list(prompts))
        if self.fail_on_call is not None and len(self.calls) == self.fail_on_call:
            raise KeyboardInterrupt("simulated preemption")
        return self.enc.encode(prompts)


@pytest.fixture(scope="module")
def encoder():
    tok, te = tiny_parts("umt5")
    return UMT5PromptEncoder(tok, te, max_length=32)


def test_index_describes_the_dataset(built):
    out, prompts = built
    index = check_index(json.loads((out / "index.json").read_text()), "index.json")
    assert (index["count"], index["blank_lines"], index["encoder"], index["model"]) == (37, 1, "umt5", "wan")
    assert (index["dim"], index["dtype"], index["max_length"], index["longest"]) == (24, "float32", 32, 32)
    assert [s["count"] for s in index["shards"]] == [5] * 7 + [2]
    assert [s["start"] for s in index["shards"]] == list(range(0, 37, 5))
    assert index["negative"]["prompt"] == "" and index["negative"]["length"] == 1  # WanPipeline's default
    assert index["prompts_sha256"] == read_prompts(out.parent / "prompts.txt").sha256()


def test_shards_are_plain_webdataset_without_pickles(built):
    out, prompts = built
    urls = sorted(str(p) for p in out.glob("shard-*.tar"))
    for url in urls:
        with tarfile.open(url) as tar:
            assert {m.name.split(".", 1)[1] for m in tar.getmembers()} == {"txt", "safetensors", "json"}
    samples = list(wds.WebDataset(urls, shardshuffle=False, empty_check=False))
    assert [s["__key__"] for s in samples] == [f"{i:09d}" for i in range(37)]
    assert [s["txt"].decode() for s in samples] == prompts  # verbatim: unicode, inner spaces, long prompt
    lens = []
    for i, s in enumerate(samples):
        emb, meta = embeds_from_bytes(s["safetensors"]), json.loads(s["json"])
        assert emb.dtype == torch.float32 and emb.shape[1] == 24
        assert meta["index"] == i and meta["length"] == emb.shape[0]
        lens.append(emb.shape[0])
    assert max(lens) == 32 and min(lens) < 16  # trimmed to the true length, not padded to max_length
    assert json.loads(samples[5]["json"])["line"] == 7  # line numbers count the blank line


def test_rerun_skips_finished_shards_and_rewrites_a_missing_one(tmp_path, encoder):
    prompts = parse_prompts("\n".join(f"prompt number {i}" for i in range(11)), jsonl=False)
    first = Counting(encoder)
    index = write_prompt_shards(prompts, tmp_path, first, samples_per_shard=4, batch_size=2, progress=False)
    assert len(first.calls) == 1 + 6  # negative, then 2 + 2 + 2 batches over 3 shards
    again = Counting(encoder)
    assert write_prompt_shards(prompts, tmp_path, again, samples_per_shard=4, batch_size=2, progress=False) == index
    assert again.calls == []
    (tmp_path / "shard-000001.tar").unlink()
    third = Counting(encoder)
    assert write_prompt_shards(prompts, tmp_path, third, samples_per_shard=4, batch_size=2, progress=False) == index
    assert third.calls == [prompts.prompts[4:6], prompts.prompts[6:8]]  # byte-identical shard rewritten


def test_interrupted_build_resumes_where_it_stopped(tmp_path, encoder):
    prompts = parse_prompts("\n".join(f"prompt number {i}" for i in range(11)), jsonl=False)
    whole = write_prompt_shards(prompts, tmp_path / "whole", encoder, samples_per_shard=4, batch_size=2,
                                progress=False)
    with pytest.raises(KeyboardInterrupt):
        write_prompt_shards(prompts, tmp_path / "cut", Counting(encoder, fail_on_call=5), samples_per_shard=4,
                            batch_size=2, progress=False)
    assert not (tmp_path / "cut" / "index.json").exists()
    with pytest.raises(FileNotFoundError, match="no index.json.*re-run it to finish"):
        PromptLoader(PromptDataConfig(shards=str(tmp_path / "cut"), batch_size=2, model="wan"))
    rest = Counting(encoder)
    resumed = write_prompt_shards(prompts, tmp_path / "cut", rest, samples_per_shard=4, batch_size=2, progress=False)
    assert rest.calls == [prompts.prompts[4:6], prompts.prompts[6:8], prompts.prompts[8:10], prompts.prompts[10:]]
    assert resumed["hash"] == whole["hash"]  # the same bytes as an uninterrupted build


def test_changed_settings_and_empty_input_are_refused(tmp_path, encoder):
    prompts = parse_prompts("a\nb\nc\n", jsonl=False)
    write_prompt_shards(prompts, tmp_path, encoder, samples_per_shard=2, progress=False)
    with pytest.raises(ValueError, match=r"other settings \(samples_per_shard: 2 -> 3\).*new --out"):
        write_prompt_shards(prompts, tmp_path, encoder, samples_per_shard=3, progress=False)
    with pytest.raises(ValueError, match="negative_prompt"):
        write_prompt_shards(prompts, tmp_path, encoder, samples_per_shard=2, negative_prompt="ugly", progress=False)
    with pytest.raises(ValueError, match="no prompts to write \\(2 blank lines only\\)"):
        write_prompt_shards(parse_prompts("\n \n", jsonl=False), tmp_path / "e", encoder, progress=False)


def test_command_line_help_runs():
    res = subprocess.run([sys.executable, str(REPO / "tools" / "make_prompt_shards.py"), "--help"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "--encoder-path" in res.stdout and "qwen2.5-vl" in res.stdout
