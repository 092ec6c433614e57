"""Reading shards: exactly once per epoch over data-parallel ranks and workers, TP peers identical,
exact resume, per-model collation, pipeline-equal embeddings, and the checks made at open."""

import json
import pickle
import shutil
from collections import Counter
from dataclasses import replace

import pytest
import torch

from data.format import index_hash
from data.loader import PromptDataConfig, PromptLoader
from data.stream import PromptStream
from tests.multirank import run_ranks
from tests.tiny_encoders import build_dataset, tiny_parts, tiny_pipeline

B = 3  # 37 prompts, 2 DP ranks x 3 = 6 a global batch: 7 batches a rank, 5 wrap-around paddings an epoch


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def wan(umt5_shards):
    """conftest's UMT5 shards (37 prompts, 5 a shard, max_length 32); tests copy them before editing."""
    return umt5_shards


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    return build_dataset("qwen2.5-vl", tmp_path_factory.mktemp("qwen"), samples_per_shard=4, max_length=24,
                         dtype="bf16", layout="model")


def cfg(path, **kw):
    return PromptDataConfig(**{"shards": path if isinstance(path, list) else str(path), "batch_size": B, "model": "wan", "max_length": 32, **kw})


def ids(batches):
    return [(b["index"].tolist(), b["is_padding"].tolist()) for b in batches]


def _epochs_on_rank(rank, world_size, shard_dir, tp):
    """One rank of a TP x DP job: two epochs, then a run stopped after 3 batches and resumed."""
    dp_rank, dp_size = rank // tp, world_size // tp
    # fork: the harness spawns ranks, so workers would default to spawn and re-import torch (seconds each)
    loader = PromptLoader(cfg(shard_dir, num_workers=2, worker_start_method="fork"), dp_rank=dp_rank, dp_size=dp_size)
    epochs = [ids(loader), ids(loader)]
    assert loader.state_dict()["epoch"] == 2 and loader.batch == 0
    stopped = PromptLoader(cfg(shard_dir, num_workers=2, worker_start_method="fork"), dp_rank=dp_rank,
                           dp_size=dp_size)
    it = iter(stopped)
    head = [next(it) for _ in range(3)]
    state = stopped.state_dict()
    del it
    resumed = PromptLoader(cfg(shard_dir, num_workers=1, worker_start_method="fork"), dp_rank=dp_rank,
                           dp_size=dp_size)
    resumed.load_state_dict(state)
    default = PromptLoader(cfg(shard_dir))  # no dp given: torch.distributed's rank and world size
    return epochs, ids(head) + ids(resumed), (default.dp_rank, default.dp_size)


@pytest.mark.multirank
def test_two_dp_ranks_two_workers_tp_peers(wan):
    shard_dir, prompts = wan
    tp = 2
    results = run_ranks(_epochs_on_rank, 4, str(shard_dir), tp)  # ranks 0,1: DP 0; ranks 2,3: DP 1
    assert results[0][:2] == results[1][:2] and results[2][:2] == results[3][:2], "TP peers: identical batches"
    for epoch in range(2):
        per_rank = [results[r][0][epoch] for r in (0, 2)]
        assert [len(b) for b in per_rank] == [7, 7] and all(len(i) == B for b in per_rank for i, _ in b)
        real = Counter(i for b in per_rank for idx, pad in b for i, p in zip(idx, pad) if not p)
        assert real == Counter(range(len(prompts))), f"epoch {epoch}: each prompt exactly once"
        assert sum(p for b in per_rank for _, pad in b for p in pad) == 2 * 7 * B - len(prompts)
    assert results[0][0][0] != results[0][0][1], "epochs are shuffled differently"
    for r in (0, 2):
        assert results[r][1] == results[r][0][0], "stopped + resumed (other num_workers) == uninterrupted"
    assert [res[2] for res in results] == [(r, 4) for r in range(4)]


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("mode", ["epoch", "resample"])
def test_resume_gives_the_identical_remainder(wan, mode, num_workers):
    c = cfg(wan[0], mode=mode, num_workers=num_workers, seed=5)
    ref = PromptLoader(c, dp_rank=1, dp_size=2)
    want = ids(b for _, b in zip(range(11), ref.forever()))  # epoch mode: 7 batches an epoch, so 2 epochs
    for stop_at in (1, 5, 8):
        first = PromptLoader(c, dp_rank=1, dp_size=2)
        got = ids(b for _, b in zip(range(stop_at), first.forever()))
        state = json.loads(json.dumps(first.state_dict()))  # checkpoints store it as plain data
        again = PromptLoader(cfg(wan[0], mode=mode, num_workers=2 - num_workers, seed=5), dp_rank=1, dp_size=2)
        again.load_state_dict(state)
        got += ids(b for _, b in zip(range(len(want) - stop_at), again.forever()))
        assert got == want, f"stopped after {stop_at}"


def test_resample_mode_is_endless_and_per_rank(wan):
    a = PromptLoader(cfg(wan[0], mode="resample"), dp_rank=0, dp_size=2)
    b = PromptLoader(cfg(wan[0], mode="resample"), dp_rank=1, dp_size=2)
    first = ids(x for _, x in zip(range(20), a))
    assert len(first) == 20 and first != ids(x for _, x in zip(range(20), b))
    assert not any(p for _, pad in first for p in pad)
    with pytest.raises(TypeError, match="endless"):
        len(a)


def test_wan_batches_equal_the_pipeline_encoding(wan, tmp_path):
    shard_dir, prompts = wan
    loader = PromptLoader(cfg(shard_dir, shuffle=False, batch_size=4), dp_rank=0, dp_size=1)
    tok, te = tiny_parts("umt5")
    pipe = tiny_pipeline("umt5", tok, te)
    batches = list(loader)
    for batch in batches[:3] + batches[-1:]:
        with torch.no_grad():
            ref, neg = pipe.encode_prompt(batch["prompt"], negative_prompt="", max_sequence_length=32)
        assert batch["text_embeds"].shape == ref.shape == (4, 32, 24)  # zero-padded to max_length like Wan
        torch.testing.assert_close(batch["text_embeds"], ref, rtol=0, atol=1e-5)  # batched differently: ~1e-7
        assert batch["text_mask"].sum(1).tolist() == batch["text_lens"].tolist()
    assert [p for b in batches for p in b["prompt"]][:37] == prompts
    torch.testing.assert_close(loader.negative["text_embeds"], neg[:1], rtol=0, atol=1e-5)
    assert loader.negative["text_embeds"].shape == (1, 32, 24) and loader.negative["prompt"] == [""]


def test_qwen_batches_equal_the_pipeline_encoding(qwen):
    shard_dir, prompts = qwen
    loader = PromptLoader(PromptDataConfig(shards=str(shard_dir), batch_size=4, model="qwen-image", shuffle=False,
                                           max_length=24, text_dim=32))
    tok, te = tiny_parts("qwen2.5-vl")
    pipe = tiny_pipeline("qwen2.5-vl", tok, te.to(torch.bfloat16))
    for batch in list(loader)[:4]:
        with torch.no_grad():
            ref, mask = pipe.encode_prompt(batch["prompt"], max_sequence_length=24)
        assert batch["text_embeds"].dtype == torch.bfloat16
        mask = torch.ones(ref.shape[:2], dtype=torch.long) if mask is None else mask
        assert torch.equal(batch["text_mask"], mask)  # padded to the batch's longest, like the pipeline
        torch.testing.assert_close(batch["text_embeds"] * mask[..., None], ref * mask[..., None], rtol=0.02, atol=0.02)
    assert loader.negative["prompt"] == [" "]
    fixed = PromptLoader(PromptDataConfig(shards=str(shard_dir), batch_size=2, model="qwen-image", max_length=24,
                                          pad_to_max_length=True))
    assert next(iter(fixed))["text_embeds"].shape == (2, 24, 32)


def test_streams_pickle_for_spawned_workers_and_urls_work(wan):
    shard_dir, _ = wan
    local = PromptLoader(cfg(shard_dir), dp_rank=1, dp_size=2)
    piped = PromptLoader(cfg(shard_dir, url_template=f"pipe:cat {shard_dir}/{{name}}"), dp_rank=1, dp_size=2)
    assert piped.shards[0].url.startswith("pipe:cat ")
    stream = pickle.loads(pickle.dumps(PromptStream(replace(piped._spec, stop=piped.batches_per_epoch))))
    assert ids(stream) == ids(piped) == ids(local)


def test_shard_list_and_brace_pattern_select_a_subset(wan):
    shard_dir, _ = wan
    pattern = str(shard_dir / "shard-{000000..000002}.tar")
    loader = PromptLoader(cfg(pattern, batch_size=5), dp_rank=0, dp_size=1)
    got = sorted(i for idx, pad in ids(loader) for i, p in zip(idx, pad) if not p)
    assert got == list(range(15)) and loader.num_samples == 15
    with pytest.raises(ValueError, match="not listed in"):
        PromptLoader(cfg([str(shard_dir / "shard-000000.tar"), str(shard_dir / "other.tar")]))


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _edit_index(path, fn, resign=True):
    index = json.loads((path / "index.json").read_text())
    fn(index)
    if resign:
        index["hash"] = index_hash(index)
    (path / "index.json").write_text(json.dumps(index))


def test_checks_at_open(wan, tmp_path):
    shard_dir, _ = wan
    with pytest.raises(ValueError, match="text_dim 4096"):
        PromptLoader(cfg(shard_dir, text_dim=4096))
    with pytest.raises(ValueError, match="encoded with umt5 for 'wan'.*--encoder qwen2.5-vl"):
        PromptLoader(cfg(shard_dir, model="qwen-image"))
    with pytest.raises(ValueError, match="longest prompt embedding has 32 tokens.*max_length 16"):
        PromptLoader(cfg(shard_dir, max_length=16))
    with pytest.raises(ValueError, match="differs from data.expected_hash"):
        PromptLoader(cfg(shard_dir, expected_hash="0" * 64))
    with pytest.raises(ValueError, match="unknown key\\(s\\) \\['batchsize'\\]"):
        PromptDataConfig.from_dict({"shards": "x", "batchsize": 2, "model": "wan"})
    with pytest.raises(ValueError, match="data config: mode='epochs'"):
        PromptLoader(cfg(shard_dir, mode="epochs"))
    with pytest.raises(FileNotFoundError, match="not a folder"):
        PromptLoader(cfg(tmp_path / "nowhere"))

    missing = _copy(shard_dir, tmp_path / "missing")
    (missing / "shard-000003.tar").unlink()
    with pytest.raises(FileNotFoundError, match="1 of 8 shards are missing.*shard-000003.tar"):
        PromptLoader(cfg(missing))
    edited = _copy(shard_dir, tmp_path / "edited")
    _edit_index(edited, lambda ix: ix["shards"][0].update(count=4), resign=False)
    with pytest.raises(ValueError, match="hash mismatch.*re-run tools/make_prompt_shards.py"):
        PromptLoader(cfg(edited))
    empty = _copy(shard_dir, tmp_path / "empty")
    _edit_index(empty, lambda ix: ix.update(shards=[], count=0))
    with pytest.raises(ValueError, match="is empty"):
        PromptLoader(cfg(empty))
    neg = _copy(shard_dir, tmp_path / "neg")
    (neg / "negative.safetensors").write_bytes((neg / "negative.safetensors").read_bytes()[:-4])
    with pytest.raises(ValueError, match="negative.safetensors.*does not match"):
        PromptLoader(cfg(neg))


def test_state_refuses_a_different_layout(wan):
    state = PromptLoader(cfg(wan[0]), dp_rank=0, dp_size=2).state_dict()
    assert set(state) >= {"epoch", "batch", "dataset_hash"} and "dp_rank" not in state  # same on every rank
    with pytest.raises(ValueError, match="dp_size: checkpoint 2 vs now 4"):
        PromptLoader(cfg(wan[0]), dp_rank=0, dp_size=4).load_state_dict(state)
    with pytest.raises(ValueError, match="batch_size"):
        PromptLoader(cfg(wan[0], batch_size=2), dp_rank=0, dp_size=2).load_state_dict(state)
