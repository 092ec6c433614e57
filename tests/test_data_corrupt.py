"""A corrupt or truncated shard met mid-run: skipped, counted, logged, reported; too many: a clear failure."""

import logging
import shutil
from collections import Counter

import pytest
import torch

from data.loader import PromptDataConfig, PromptLoader
from data.reader import CorruptShard

B = 3


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def clean(umt5_shards):
    """conftest's UMT5 shards (37 prompts, 5 a shard, max_length 32): copied before they are damaged."""
    return umt5_shards


def damaged(clean_dir, dst):
    """Shard 2 truncated to half its size; shard 5 with one byte flipped in tar padding (parses fine, hash differs)."""
    shutil.copytree(clean_dir, dst)
    s2 = dst / "shard-000002.tar"
    s2.write_bytes(s2.read_bytes()[: s2.stat().st_size // 2])
    s5 = dst / "shard-000005.tar"
    data = bytearray(s5.read_bytes())
    assert data[600] == 0  # in the zero padding after the first member's 36-byte JSON
    data[600] = 1
    s5.write_bytes(bytes(data))
    return dst


def cfg(path, **kw):
    return PromptDataConfig(**{"shards": str(path), "batch_size": B, "model": "wan", "max_length": 32,
                               "max_bad_shard_fraction": 0.25, **kw})


@pytest.mark.parametrize("num_workers", [0, 2])
def test_bad_shards_are_skipped_counted_and_logged(clean, tmp_path, caplog, num_workers):
    shard_dir = damaged(clean[0], tmp_path / "ds")
    batches, seen = [], {}
    caplog.set_level(logging.WARNING, logger="data")
    for rank in range(2):
        reported = []
        loader = PromptLoader(cfg(shard_dir, num_workers=num_workers), dp_rank=rank, dp_size=2,
                              on_corrupt_shard=lambda name, why, out=reported: out.append(name))
        batches += list(loader)
        assert sorted(reported) == sorted(loader.corrupt_shards), "one callback per bad shard and loader"
        seen.update(loader.corrupt_shards)
    assert sorted(seen) == ["shard-000002.tar", "shard-000005.tar"]
    assert "bytes, the index says" in seen["shard-000002.tar"] and "sha256" in seen["shard-000005.tar"]
    assert {r.getMessage().split()[4] for r in caplog.records} == set(seen)  # "data: skipping corrupt shard NAME"
    assert len(batches) == 14 and all(len(b["prompt"]) == B for b in batches)  # ranks stay in step
    real = Counter(i for b in batches for i, p in zip(b["index"].tolist(), b["is_padding"].tolist()) if not p)
    lost = set(range(10, 15)) | set(range(25, 30))
    assert real == Counter(set(range(37)) - lost), "every readable prompt still exactly once"
    padding = Counter(i for b in batches for i, p in zip(b["index"].tolist(), b["is_padding"].tolist()) if p)
    assert sum(padding.values()) == 2 * 7 * B - len(real) and not set(padding) & lost
    assert padding[0] >= len(lost)  # the 10 lost samples were replaced by the filler: sample 0, marked padding


def test_resume_after_a_bad_shard_is_exact(clean, tmp_path):
    shard_dir = damaged(clean[0], tmp_path / "ds")
    want = [b["index"].tolist() for b in PromptLoader(cfg(shard_dir), dp_rank=0, dp_size=1)]
    first = PromptLoader(cfg(shard_dir), dp_rank=0, dp_size=1)
    got = [b["index"].tolist() for _, b in zip(range(5), first)]
    again = PromptLoader(cfg(shard_dir, num_workers=2), dp_rank=0, dp_size=1)
    again.load_state_dict(first.state_dict())
    assert got + [b["index"].tolist() for b in again] == want


def test_more_bad_shards_than_allowed_fail_clearly(clean, tmp_path):
    shard_dir = damaged(clean[0], tmp_path / "ds")
    loader = PromptLoader(cfg(shard_dir, max_bad_shard_fraction=0.1), dp_rank=0, dp_size=1)
    with pytest.raises(CorruptShard, match=r"1 of 8 shards are corrupt .* more than data.max_bad_shard_fraction=0.1"):
        list(loader)


def test_shard_removed_after_open_counts_as_corrupt(clean, tmp_path):
    shard_dir = shutil.copytree(clean[0], tmp_path / "ds")
    loader = PromptLoader(cfg(shard_dir), dp_rank=0, dp_size=1)
    (shard_dir / "shard-000007.tar").unlink()
    assert len(list(loader)) == 13
    assert list(loader.corrupt_shards) == ["shard-000007.tar"] and loader.metrics()["data/corrupt_shards"] == 1
    assert "cannot open" in loader.corrupt_shards["shard-000007.tar"]
