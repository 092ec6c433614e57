"""Reading prompt lists: plain text (one prompt per line) or JSONL (one object with a ``prompt`` field a line).

Blank lines are skipped and counted, so a user can see how many lines of their file did not become
samples. Line numbers are kept so a sample can be traced back to its source line.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path


@dataclass
class PromptList:
    """The non-blank prompts of a file, with their 1-based source line numbers."""

    prompts: list[str] = field(default_factory=list)
    lines: list[int] = field(default_factory=list)
    blank_lines: int = 0

    def __len__(self) -> int:
        return len(self.prompts)

    def sha256(self) -> str:
        """Hash of the prompt texts in order: identifies the dataset content independently of blank lines."""
        h = hashlib.sha256()
        for p in self.prompts:
            data = p.encode("utf-8")
            h.update(len(data).to_bytes(8, "little"))
            h.update(data)
        return h.hexdigest()


def demo_prompts_path() -> Path:
    """The tiny prompt list shipped with the package (for the demo and the tests)."""
    return Path(str(resources.files("data").joinpath("demo_prompts.txt")))


def parse_prompts(text: str, *, jsonl: bool, source: str = "<prompts>") -> PromptList:
    """Parse prompt text. ``jsonl``: each non-blank line is a JSON object with a string ``prompt`` field."""
    out = PromptList()
    # Split on "\n" only: str.splitlines() would also split inside a prompt at U+2028, U+0085, ...
    rows = text.split("\n")
    if rows and rows[-1] == "":
        rows.pop()  # the file's final newline ends the last line, it does not start a blank one
    for lineno, raw in enumerate(rows, start=1):
        line = raw.removesuffix("\r")
        if not line.strip():
            out.blank_lines += 1
            continue
        if jsonl:
            prompt = _jsonl_prompt(line, lineno, source)
            if not prompt.strip():
                out.blank_lines += 1
                continue
        else:
            prompt = line
        out.prompts.append(prompt)
        out.lines.append(lineno)
    return out


def read_prompts(path: str | Path) -> PromptList:
    """Read a prompt file; ``.jsonl`` files are JSON lines, anything else is one prompt per line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {path} does not exist: pass --prompts a text file (one prompt "
                                "a line) or a .jsonl file (one {\"prompt\": ...} object a line)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"prompt file {path} is not UTF-8 ({e}); convert it with e.g. "
                         f"`iconv -t utf-8 {path} > prompts.txt`") from e
    return parse_prompts(text, jsonl=path.suffix.lower() == ".jsonl", source=str(path))


def _jsonl_prompt(line: str, lineno: int, source: str) -> str:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{source}:{lineno}: not valid JSON ({e.msg}); each line of a .jsonl prompt file must "
                         "be an object like {\"prompt\": \"a cat\"} (rename the file to .txt for plain prompts)"
                         ) from e
    if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str):
        raise ValueError(f"{source}:{lineno}: expected an object with a string \"prompt\" field, got "
                         f"{line[:80]!r}")
    return obj["prompt"]
