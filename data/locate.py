"""Finding a dataset: its index (checked) and where each shard is, from a folder, an index or a shard list.

Local paths and URLs (anything WebDataset's gopen opens: ``pipe:``, ``http(s)://``, ...) are both
accepted; shard names in the index are relative, so a dataset folder can be moved or served remotely.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

from data.format import INDEX, check_index


@dataclass(frozen=True)
class ShardRef:
    """Where a shard is and what the index says about it."""

    name: str
    url: str
    start: int  # global index of its first sample
    count: int
    sha256: str
    bytes: int
    bucket: str | None = None  # image-conditioned datasets: the resolution bucket all its samples share


def is_url(s: str) -> bool:
    """True for anything gopen must open (a scheme or a pipe), False for a local path."""
    return "://" in s or s.startswith("pipe:")


def join(base: str, name: str) -> str:
    return f"{base.rstrip('/')}/{name}" if is_url(base) else os.path.join(base, name)


def read_bytes(url: str) -> bytes:
    if is_url(url):
        import webdataset as wds

        with wds.gopen(url, "rb") as f:
            return f.read()
    with open(url, "rb") as f:
        return f.read()


def resolve_dataset(spec: str | list[str], url_template: str | None = None) -> tuple[dict[str, Any], list[ShardRef], str]:
    """Find the index for a dataset folder, index.json location or shard list; check it; locate the shards."""
    selected: list[str] | None = None
    if isinstance(spec, (list, tuple)) or str(spec).endswith(".tar") or "{" in str(spec):
        from webdataset.shardlists import expand_urls  # WebDataset's own syntax: braces, "::" lists

        selected = [u for s in ([spec] if isinstance(spec, str) else spec) for u in expand_urls(str(s))]
        if not selected:
            raise ValueError("data config: shards is an empty list: name a dataset folder or some shards")
        base = selected[0].rsplit("/", 1)[0] if "/" in selected[0] else "."
        index_url = join(base, INDEX)
    elif str(spec).endswith(".json"):
        index_url, base = str(spec), str(spec).rsplit("/", 1)[0] if "/" in str(spec) else "."
    else:
        base, index_url = str(spec), join(str(spec), INDEX)
        if not is_url(base) and not os.path.isdir(base):
            raise FileNotFoundError(f"data config: shards={base!r} is not a folder; point it at a folder written by "
                                    "tools/make_prompt_shards.py, its index.json, or a list of its shards")
    try:
        index = json.loads(read_bytes(index_url))
    except FileNotFoundError as e:
        raise FileNotFoundError(f"no {INDEX} at {index_url}: build the dataset with tools/make_prompt_shards.py "
                                "(an interrupted build writes it last: re-run it to finish)") from e
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read {index_url}: {e}; re-run tools/make_prompt_shards.py on its folder") from e
    check_index(index, index_url)
    by_name = {s["name"]: s for s in index["shards"]}
    if selected is None:
        pairs = [(s, url_template.format(name=s["name"]) if url_template else join(base, s["name"]))
                 for s in index["shards"]]
    else:
        names = [u.rsplit("/", 1)[-1] for u in selected]
        unknown = [u for u, n in zip(selected, names) if n not in by_name]
        if unknown:
            raise ValueError(f"shard(s) {unknown[:3]} are not listed in {index_url}: name shards of one dataset")
        if len(set(names)) != len(names):
            raise ValueError("data config: shards lists a shard twice; each shard may appear once")
        pairs = [(by_name[n], u) for n, u in zip(names, selected)]
    refs = [ShardRef(s["name"], url, s["start"], s["count"], s["sha256"], s["bytes"], s.get("bucket"))
            for s, url in pairs]
    return index, refs, base
