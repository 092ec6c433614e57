"""Prompt files: plain text and JSONL, blank lines skipped and counted, errors that say what to fix."""

import json

import pytest

from data.prompts import demo_prompts_path, parse_prompts, read_prompts


def test_text_lines_blank_lines_and_line_numbers(tmp_path):
    f = tmp_path / "p.txt"
    f.write_bytes("a cat\r\n\n   \nline\u2028with separator\ncaf\u00e9  \n".encode())
    got = read_prompts(f)
    assert got.prompts == ["a cat", "line\u2028with separator", "caf\u00e9  "]  # verbatim, only the newline goes
    assert got.lines == [1, 4, 5]
    assert got.blank_lines == 2  # the final newline does not count as a blank line


def test_jsonl_prompt_field_and_blank_prompts(tmp_path):
    f = tmp_path / "p.jsonl"
    rows = [{"prompt": "one", "extra": 1}, {"prompt": "   "}, {"prompt": "two\nlines"}]
    f.write_text("\n".join(json.dumps(r) for r in rows[:2]) + "\n\n" + json.dumps(rows[2]) + "\n", encoding="utf-8")
    got = read_prompts(f)
    assert got.prompts == ["one", "two\nlines"] and got.lines == [1, 4] and got.blank_lines == 2


@pytest.mark.parametrize("line, match", [
    ('{"prompt": "ok"', r"p\.jsonl:2: not valid JSON"),
    ('{"text": "no prompt field"}', r"p\.jsonl:2: expected an object with a string \"prompt\" field"),
    ('["a list"]', r"p\.jsonl:2: expected an object"),
])
def test_jsonl_errors_name_the_line(tmp_path, line, match):
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "fine"}\n' + line + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=match):
        read_prompts(f)


def test_missing_and_non_utf8_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="--prompts"):
        read_prompts(tmp_path / "nope.txt")
    (tmp_path / "latin1.txt").write_bytes("caf\u00e9".encode("latin-1"))
    with pytest.raises(ValueError, match="not UTF-8"):
        read_prompts(tmp_path / "latin1.txt")


def test_order_sensitive_hash():
    a = parse_prompts("x\ny\n", jsonl=False)
    assert a.sha256() == parse_prompts("x\n\ny\n", jsonl=False).sha256()  # blank lines do not change content
    assert a.sha256() != parse_prompts("y\nx\n", jsonl=False).sha256()


def test_shipped_demo_prompts():
    path = demo_prompts_path()
    assert path.is_file(), "data/demo_prompts.txt must ship as package data"
    got = read_prompts(path)
    assert 24 <= len(got) <= 100 and got.blank_lines == 0
    assert len(set(got.prompts)) == len(got.prompts)
