"""Test-side helpers around the tiny encoders (which live in data/tiny_encoders.py for the demo)."""

from __future__ import annotations

from pathlib import Path

from data.prompts import demo_prompts_path
from data.tiny_encoders import (  # noqa: F401 - re-exported for the tests
    QWEN_DIM,
    UMT5_DIM,
    save_tiny_encoder,
    tiny_parts,
    tiny_pipeline,
    tiny_qwen25vl_model,
    tiny_qwen_tokenizer,
    tiny_t5_tokenizer,
    tiny_umt5_model,
)

LONG_PROMPT = " ".join(["a very long prompt about many things"] * 160)  # ~1100 tokens: past every max_length
UNICODE_PROMPTS = ["Ein Café in München, 猫が窓辺で眠る 🌸", "Ωμέγα — naïve façade, “quoted” text…"]


def odd_prompts() -> list[str]:
    """37 prompts (odd): 33 shipped ones, two unicode, one very long, one with inner spaces kept verbatim."""
    shipped = demo_prompts_path().read_text(encoding="utf-8").splitlines()[:33]
    return [*shipped[:10], UNICODE_PROMPTS[0], *shipped[10:20], LONG_PROMPT, *shipped[20:], UNICODE_PROMPTS[1],
            "  spaces   around  "]


def write_odd_prompt_file(path: str | Path) -> list[str]:
    """The odd prompt list as a text file with a blank line in the middle; returns the prompts in order."""
    prompts = odd_prompts()
    lines = [*prompts[:5], "", *prompts[5:]]
    Path(path).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return prompts


def build_dataset(kind: str, root: str | Path, *, samples_per_shard: int = 5, max_length: int = 32,
                  dtype: str = "fp32", layout: str = "pipeline") -> tuple[Path, list[str]]:
    """Tiny encoder + odd prompt file -> shards, through the command-line tool. Returns (shard dir, prompts)."""
    from tools.make_prompt_shards import main

    root = Path(root)
    enc = save_tiny_encoder(kind, root / f"enc-{kind}", layout)
    prompts = write_odd_prompt_file(root / "prompts.txt")
    out = root / f"shards-{kind}"
    main(["--prompts", str(root / "prompts.txt"), "--out", str(out), "--encoder", kind, "--encoder-path", str(enc),
          "--samples-per-shard", str(samples_per_shard), "--max-length", str(max_length), "--dtype", dtype,
          "--batch-size", "4", "--no-progress"])
    return out, prompts
